//! `Authorization: Bearer <jwt>` for REST handlers.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use super::AppState;
use crate::auth::{Identity, Role};

/// The verified caller of a request.
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let mut headers = parts.headers.get_all(AUTHORIZATION).iter();
        let header = headers
            .next()
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        // Which one a proxy in front would have checked is unknown: neither is taken.
        if headers.next().is_some() {
            return Err(ApiError::BadRequest(
                "more than one Authorization header".into(),
            ));
        }
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::Unauthorized("expected a bearer token".into()))?;
        state
            .auth
            .verify_cached(token.trim())
            .map(Caller)
            .map_err(|e| ApiError::Unauthorized(e.to_string()))
    }
}

impl Caller {
    /// Refuses callers without the given role.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.role == role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "requires the {} role",
                format!("{role:?}").to_lowercase()
            )))
        }
    }
}
