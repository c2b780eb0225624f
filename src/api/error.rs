//! One error type for the REST layer: each variant has its status, every body is
//! `{"error": "..."}`, and internal details are logged, never sent.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// 409 with extra fields beside `error`.
    #[error("{0}")]
    ConflictWith(String, serde_json::Value),
    #[error("{1}")]
    Status(StatusCode, String),
    /// 429 with `Retry-After`: try again after this long.
    #[error("too many requests: try again in {} s", .0.as_secs().max(1))]
    TooMany(std::time::Duration),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::ConflictWith(..) => StatusCode::CONFLICT,
            ApiError::Status(status, _) => *status,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let mut body = json!({ "error": self.to_string() });
        if let (ApiError::ConflictWith(_, serde_json::Value::Object(extra)), Some(map)) =
            (&self, body.as_object_mut())
        {
            map.extend(extra.clone());
        }
        let mut response = (self.status(), Json(body)).into_response();
        if let ApiError::TooMany(wait) = self {
            // Whole seconds, rounded up (a client that waits that long gets in).
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.max(1).into());
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "request refused: database unavailable");
                ApiError::Status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is unavailable; try again shortly".into(),
                )
            }
            crate::store::StoreError::Full(_) => ApiError::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is full: the change was not made; try again later".into(),
            ),
            crate::store::StoreError::Unflushed(_) => ApiError::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is full: the change is not on disk and may be lost; try again later"
                    .into(),
            ),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// A JSON body whose rejections (not JSON, wrong shape, too large) answer `{"error": ...}`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// An optional JSON body: empty means `T::default()`; anything else must be JSON of the right
/// shape, whatever the Content-Type (frontends often omit it on bodiless POSTs).
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::Status(e.status(), e.body_text()))?;
        optional_json(&bytes).map(OptionalJson)
    }
}

/// An optional JSON body as [`OptionalJson`] reads it.
pub fn optional_json<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let text = rejection.body_text();
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        ApiError::BadRequest(text)
    } else {
        ApiError::Status(status, text)
    }
}
