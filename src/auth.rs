//! Identity: HS256 JWTs (DESIGN "Identity"). The same verifier serves MQTT CONNECT (token as the
//! password) and HTTP (`Authorization: Bearer`).

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::is_valid_id;

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

/// A verified token holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub username: String,
    pub first_name: String,
    pub last_name: String,
    pub role: Role,
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

/// Signs and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator { .. }")
    }
}

impl Authenticator {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Verifies a token and returns who holds it.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                }
            })?;
        let c = data.claims;
        if !is_valid_id(&c.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(Identity {
            username: c.username.unwrap_or_else(|| c.sub.clone()),
            user_id: c.sub,
            first_name: c.first_name.unwrap_or_default(),
            last_name: c.last_name.unwrap_or_default(),
            role: c.role,
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
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
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
        assert_eq!(id.user_id, "42");
        assert_eq!(id.username, "alice");
        assert_eq!(id.role, Role::Admin);
    }

    #[test]
    fn username_defaults_to_sub_and_role_to_user() {
        let auth = Authenticator::new(b"secret");
        let id = auth
            .verify(&auth.issue("7", None, Role::User, 60).unwrap())
            .unwrap();
        assert_eq!(id.username, "7");
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
}
