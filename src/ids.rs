//! Identifiers shared by every layer: user, conversation and client ids are 1–64 characters of
//! `[A-Za-z0-9_-]` (DESIGN "Identity"). Frontends written for Django send integers, so ids are
//! accepted as JSON strings or non-negative integers and normalised to strings.

use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Longest id we accept, in bytes (all allowed characters are ASCII).
pub const MAX_ID_LEN: usize = 64;

/// Whether `s` is a well-formed id.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Normalises a JSON id (string or non-negative integer) to its string form, if well formed.
pub fn id_from_json(value: &Value) -> Option<String> {
    let s = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_u64()?.to_string(),
        _ => return None,
    };
    is_valid_id(&s).then_some(s)
}

/// Like [`id_from_json`] but keeps any short string, for echoing a client's reference back in
/// an error event even when it is malformed.
pub fn id_from_json_or_str(value: &Value) -> Option<String> {
    id_from_json(value).or_else(|| value.as_str().map(|s| s.chars().take(64).collect()))
}

/// A unique id for a message callbus publishes (used by clients to de-duplicate the copy they get
/// on both `chat/{cid}` and their notifications topic): 32 hex digits, a random 64-bit prefix
/// drawn once per process and a counter. Unique, not secret; a random draw per message was a
/// system call on every relayed message.
pub fn new_message_id() -> String {
    static PREFIX: OnceLock<[u8; 8]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(PREFIX.get_or_init(random_bytes::<8>));
    bytes[8..].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    hex(&bytes)
}

/// `N` random bytes as lowercase hex.
pub fn random_hex<const N: usize>() -> String {
    hex(&random_bytes::<N>())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all; fall back to time-based
    // bytes rather than panic, since these need uniqueness, not secrecy.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8;
        }
    }
    bytes
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// The current time as RFC 3339 with milliseconds, e.g. `2026-11-23T21:41:26.123Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_ids() {
        assert!(is_valid_id("42"));
        assert!(is_valid_id("alice_B-7"));
        assert!(is_valid_id(&"a".repeat(64)));
    }

    #[test]
    fn invalid_ids() {
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a.b"));
        assert!(!is_valid_id("#"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn ids_from_json() {
        assert_eq!(id_from_json(&json!("17")).as_deref(), Some("17"));
        assert_eq!(id_from_json(&json!(17)).as_deref(), Some("17"));
        assert_eq!(id_from_json(&json!(-1)), None);
        assert_eq!(id_from_json(&json!(1.5)), None);
        assert_eq!(id_from_json(&json!("a b")), None);
        assert_eq!(id_from_json(&json!(null)), None);
    }

    #[test]
    fn message_ids_are_unique_hex() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_message_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
        let token = random_hex::<8>();
        assert_eq!(token.len(), 16);
        assert_ne!(token, random_hex::<8>());
    }
}
