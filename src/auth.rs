//! Identity: HS256 JWTs (DESIGN "Identity"). The same verifier serves MQTT CONNECT (token as the
//! password) and HTTP (`Authorization: Bearer`).

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::is_valid_id;
use crate::sync::lock;

/// What a token's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An end user of the app (default).
    #[default]
    User,
    /// The main application's backend: manages conversations, pushes notifications.
    Service,
    /// Read-only debugging: may subscribe to anything, publish nothing.
    Admin,
}

/// The claims callbus reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default)]
    pub role: Role,
}

/// A verified token holder. One is kept per connection, so its four texts share one
/// allocation (four `String`s were five allocations and 104 bytes before any text).
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id, username, first name and last name, one after another.
    text: Box<str>,
    /// Where the user id, the username and the first name end in `text`.
    ends: [u32; 3],
    pub role: Role,
}

impl Identity {
    /// An identity from its parts (a username defaults to the user id where a token has none).
    pub fn new(
        user_id: &str,
        username: &str,
        first_name: &str,
        last_name: &str,
        role: Role,
    ) -> Self {
        let parts = [user_id, username, first_name, last_name];
        let text: String = parts.concat();
        let end = |n: usize| parts[..n].iter().map(|p| p.len()).sum::<usize>();
        // A token's texts are bounded by the token's size (far below 4 GiB).
        let at = |n: usize| u32::try_from(end(n)).unwrap_or(u32::MAX);
        Self {
            text: text.into_boxed_str(),
            ends: [at(1), at(2), at(3)],
            role,
        }
    }

    fn part(&self, start: u32, end: u32) -> &str {
        self.text
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    pub fn user_id(&self) -> &str {
        self.part(0, self.ends[0])
    }

    pub fn username(&self) -> &str {
        self.part(self.ends[0], self.ends[1])
    }

    pub fn first_name(&self) -> &str {
        self.part(self.ends[1], self.ends[2])
    }

    pub fn last_name(&self) -> &str {
        self.part(self.ends[2], self.text.len() as u32)
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id())
            .field("username", &self.username())
            .field("first_name", &self.first_name())
            .field("last_name", &self.last_name())
            .field("role", &self.role)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("token subject is not a valid user id")]
    BadSubject,
}

/// Signs and verifies tokens with one HS256 secret. Cheap to clone (the keys are shared).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Keys>,
}

struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Tokens verified by [`Authenticator::verify_cached`], by their text.
    verified: Mutex<HashMap<Box<str>, Verified>>,
}

/// A token already found valid: who holds it and until when.
struct Verified {
    identity: Identity,
    exp: u64,
}

/// Seconds a token is still taken past its `exp` (clock skew).
const LEEWAY: u64 = 5;

/// Verified tokens remembered at most (a few hundred bytes each); past it the expired go, and
/// if that is not enough, all of them.
const VERIFIED_MAX: usize = 4096;

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator { .. }")
    }
}

impl Authenticator {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            inner: Arc::new(Keys {
                encoding: EncodingKey::from_secret(secret),
                decoding: DecodingKey::from_secret(secret),
                validation,
                verified: Mutex::default(),
            }),
        }
    }

    /// Verifies a token and returns who holds it.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.decode(token).map(|v| v.identity)
    }

    /// Like [`Authenticator::verify`], remembering tokens found valid, for callers that send
    /// the same token again and again (REST clients: a service backend sends one token with
    /// every request). Checking a JWT costs a keyed hash, base64 and a JSON parse, a tenth of
    /// a whole call flow's CPU; a remembered token costs a lookup and its expiry check.
    pub fn verify_cached(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_cached_at(token, unix_now())
    }

    fn verify_cached_at(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let mut verified = lock(&self.inner.verified);
        if let Some(v) = verified.get(token) {
            if v.exp.saturating_add(LEEWAY) < now {
                verified.remove(token);
                return Err(AuthError::Expired);
            }
            return Ok(v.identity.clone());
        }
        drop(verified);
        let v = self.decode(token)?;
        let identity = v.identity.clone();
        let mut verified = lock(&self.inner.verified);
        if verified.len() >= VERIFIED_MAX {
            verified.retain(|_, v| v.exp.saturating_add(LEEWAY) >= now);
            if verified.len() >= VERIFIED_MAX {
                verified.clear();
            }
        }
        verified.insert(token.into(), v);
        Ok(identity)
    }

    fn decode(&self, token: &str) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let keys = &*self.inner;
        let data =
            decode::<Claims>(token, &keys.decoding, &keys.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                }
            })?;
        // RFC 7515 4.1.11: a token whose `crit` names extensions must be refused by whoever
        // does not understand them, and callbus understands none. (`jku`, `jwk`, `x5u` and
        // the like are never followed: keys come from configuration only.)
        if data.header.crit.is_some() {
            return Err(AuthError::Invalid);
        }
        let c = data.claims;
        if !is_valid_id(&c.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(Verified {
            exp: c.exp,
            identity: Identity::new(
                &c.sub,
                c.username.as_deref().unwrap_or(&c.sub),
                c.first_name.as_deref().unwrap_or_default(),
                c.last_name.as_deref().unwrap_or_default(),
                c.role,
            ),
        })
    }

    /// Issues a token for `sub` valid for `ttl_secs`.
    pub fn issue(
        &self,
        sub: &str,
        username: Option<&str>,
        role: Role,
        ttl_secs: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            sub: sub.to_owned(),
            exp: unix_now() + ttl_secs,
            username: username.map(str::to_owned),
            first_name: None,
            last_name: None,
            role,
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests use this for expired or odd tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        encode(&Header::new(Algorithm::HS256), claims, &self.inner.encoding)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let auth = Authenticator::new(b"secret");
        let token = auth.issue("42", Some("alice"), Role::Admin, 60).unwrap();
        let id = auth.verify(&token).unwrap();
        assert_eq!(id.user_id(), "42");
        assert_eq!(id.username(), "alice");
        assert_eq!(id.role, Role::Admin);
    }

    #[test]
    fn an_identity_gives_back_each_of_its_texts() {
        let id = Identity::new("u-1", "Zoë", "", "Ødegård", Role::Service);
        let parts = (id.user_id(), id.username(), id.first_name(), id.last_name());
        assert_eq!(parts, ("u-1", "Zoë", "", "Ødegård"));
        assert_eq!(id.role, Role::Service);
        assert_ne!(
            id,
            Identity::new("u-1", "Zo", "ë", "Ødegård", Role::Service)
        );
    }

    #[test]
    fn username_defaults_to_sub_and_role_to_user() {
        let auth = Authenticator::new(b"secret");
        let id = auth
            .verify(&auth.issue("7", None, Role::User, 60).unwrap())
            .unwrap();
        assert_eq!(id.username(), "7");
        assert_eq!(id.role, Role::User);
    }

    #[test]
    fn refuses_bad_tokens() {
        let auth = Authenticator::new(b"secret");
        let other = Authenticator::new(b"other");
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
        assert_eq!(auth.verify("garbage"), Err(AuthError::Invalid));
        let forged = other.issue("42", None, Role::User, 60).unwrap();
        assert_eq!(auth.verify(&forged), Err(AuthError::Invalid));
        let expired = auth
            .sign(&Claims {
                sub: "42".into(),
                exp: unix_now() - 3600,
                username: None,
                first_name: None,
                last_name: None,
                role: Role::User,
            })
            .unwrap();
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let bad_sub = auth.issue("a/b", None, Role::User, 60).unwrap();
        assert_eq!(auth.verify(&bad_sub), Err(AuthError::BadSubject));
    }

    #[test]
    fn remembered_tokens_still_expire_and_forgeries_are_not_remembered() {
        let auth = Authenticator::new(b"secret");
        let now = unix_now();
        let token = auth.issue("42", None, Role::Service, 60).unwrap();
        assert_eq!(auth.verify_cached_at(&token, now).unwrap().user_id(), "42");
        // The second time comes from memory, with the same answer.
        assert_eq!(
            auth.verify_cached_at(&token, now).unwrap().role,
            Role::Service
        );
        assert_eq!(lock(&auth.inner.verified).len(), 1);
        // Past exp and the leeway, the remembered token is refused and forgotten.
        let later = now + 60 + LEEWAY + 1;
        assert_eq!(
            auth.verify_cached_at(&token, later),
            Err(AuthError::Expired)
        );
        assert!(lock(&auth.inner.verified).is_empty());
        // A token signed with another secret is refused every time and never remembered.
        let forged = Authenticator::new(b"other")
            .issue("42", None, Role::Service, 60)
            .unwrap();
        for _ in 0..2 {
            assert_eq!(auth.verify_cached_at(&forged, now), Err(AuthError::Invalid));
        }
        assert!(lock(&auth.inner.verified).is_empty());
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let auth = Authenticator::new(b"secret");
        for i in 0..VERIFIED_MAX + 10 {
            let token = auth.issue(&format!("u{i}"), None, Role::User, 60).unwrap();
            auth.verify_cached(&token).unwrap();
            assert!(lock(&auth.inner.verified).len() <= VERIFIED_MAX);
        }
    }
}
