//! Identifiers shared by every layer: user, conversation and client ids are 1–64 characters of
//! `[A-Za-z0-9_-]` (DESIGN "Identity"). Frontends written for Django send integers, so ids are
//! accepted as JSON strings or non-negative integers and normalised to strings.

use serde_json::Value;
use std::cell::Cell;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let mut out = Vec::with_capacity(32);
    write_message_id(&mut out);
    String::from_utf8(out).unwrap_or_default() // hex digits
}

/// Appends a [`new_message_id`] to `out`.
pub fn write_message_id(out: &mut Vec<u8>) {
    static PREFIX: OnceLock<[u8; 8]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(PREFIX.get_or_init(random_bytes::<8>));
    bytes[8..].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    write_hex(out, &bytes);
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
    let mut out = Vec::with_capacity(bytes.len() * 2);
    write_hex(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default() // hex digits
}

fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]);
    }
}

/// The current time as RFC 3339 with milliseconds, e.g. `2026-11-23T21:41:26.123Z`.
pub fn now_rfc3339() -> String {
    let mut out = Vec::with_capacity(24);
    write_rfc3339_millis(&mut out, SystemTime::now());
    String::from_utf8(out).unwrap_or_default() // ASCII
}

/// Appends `time` as RFC 3339 with milliseconds. Every relayed message carries one, so the
/// date and time to the second are formatted once per second per thread and the milliseconds
/// appended.
pub fn write_rfc3339_millis(out: &mut Vec<u8>, time: SystemTime) {
    thread_local! {
        /// The last second formatted: seconds since the epoch, `YYYY-MM-DDTHH:MM:SS.`.
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    let prefix = SECOND.with(|second| {
        let (cached, prefix) = second.get();
        if cached == secs {
            return Some(prefix);
        }
        let whole = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs));
        let mut text = String::with_capacity(20);
        // `YYYY-MM-DDTHH:MM:SSZ`; humantime refuses years past 9999 (with an error a String's
        // writer passes on, where `to_string` would panic).
        let formatted = write!(text, "{whole}").is_ok() && text.len() == 20;
        let mut prefix = [b'.'; 20];
        prefix[..19].copy_from_slice(text.as_bytes().get(..19).filter(|_| formatted)?);
        second.set((secs, prefix));
        Some(prefix)
    });
    let Some(prefix) = prefix else {
        return out.extend_from_slice(b"9999-12-31T23:59:59.999Z");
    };
    out.extend_from_slice(&prefix);
    let digit = |n: u32| b'0' + (n % 10) as u8;
    out.extend_from_slice(&[digit(millis / 100), digit(millis / 10), digit(millis), b'Z']);
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

    #[test]
    fn times_are_written_as_humantime_writes_them() {
        let base = UNIX_EPOCH + Duration::from_secs(1_796_356_799); // 2026-12-04T04:39:59Z
                                                                    // Within a second, across it, far back, before the epoch (as the epoch) and far ahead.
        let offsets_ms = [0, 1, 9, 10, 99, 100, 999, 1000, 1001, 86_400_000];
        let mut times: Vec<SystemTime> = offsets_ms
            .iter()
            .map(|&ms| base + Duration::from_millis(ms))
            .collect();
        times.extend([UNIX_EPOCH, UNIX_EPOCH + Duration::from_millis(1)]);
        for time in times {
            let mut out = Vec::new();
            write_rfc3339_millis(&mut out, time);
            let expected = humantime::format_rfc3339_millis(time).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        let before_epoch = UNIX_EPOCH - Duration::from_secs(5);
        let mut out = Vec::new();
        write_rfc3339_millis(&mut out, before_epoch);
        assert_eq!(&out[..], b"1970-01-01T00:00:00.000Z");
        out.clear(); // past what RFC 3339 writes (year 10000): the last time it can
        write_rfc3339_millis(&mut out, UNIX_EPOCH + Duration::from_secs(253_402_300_800));
        assert_eq!(&out[..], b"9999-12-31T23:59:59.999Z");
        assert_eq!(now_rfc3339().len(), 24);
    }
}
