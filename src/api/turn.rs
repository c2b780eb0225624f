//! TURN credentials in coturn's REST scheme (`use-auth-secret`): the username is
//! `<expiry unix time>:<user id>` and the credential is base64(HMAC-SHA1(secret, username)).

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;

/// Configured TURN service.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    pub secret: String,
    pub uris: Vec<String>,
    pub ttl_secs: u64,
}

/// The credential for a TURN REST username.
pub fn credential(secret: &str, username: &str) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Credentials for `uid`, valid until `now + ttl`.
pub fn credentials(turn: &TurnConfig, uid: &str, now_unix: u64) -> Value {
    let username = format!("{}:{uid}", now_unix + turn.ttl_secs);
    json!({
        "credential": credential(&turn.secret, &username),
        "password": credential(&turn.secret, &username),
        "username": username,
        "ttl": turn.ttl_secs,
        "uris": turn.uris,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_a_fixed_vector() {
        // RFC 2202 test case 2: HMAC-SHA1("Jefe", "what do ya want for nothing?")
        // = effcdf6ae5eb2fa2d27416d5f184df9c259a7c79, here base64-encoded.
        assert_eq!(
            credential("Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }

    #[test]
    fn username_carries_expiry_and_user() {
        let turn = TurnConfig {
            secret: "s".into(),
            uris: vec!["turn:turn.example:3478".into()],
            ttl_secs: 3600,
        };
        let c = credentials(&turn, "42", 1_000);
        assert_eq!(c["username"], "4600:42");
        assert_eq!(c["ttl"], 3600);
        assert_eq!(c["credential"], credential("s", "4600:42"));
        assert_eq!(c["uris"][0], "turn:turn.example:3478");
    }
}
