//! Service notifications, TURN credentials and development tokens.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};

use super::auth::Caller;
use super::error::{ApiError, OptionalJson};
use super::{turn, AppState};
use crate::auth::{unix_now, Role};
use crate::ids::id_from_json;

/// A notification body's user and payload.
pub fn notify_body(body: &Map<String, Value>) -> Result<(String, &Value), ApiError> {
    let user_id = body
        .get("user_id")
        .and_then(id_from_json)
        .ok_or_else(|| ApiError::BadRequest("user_id is required (a user id)".into()))?;
    match body.get("payload") {
        Some(payload @ Value::Object(_)) => Ok((user_id, payload)),
        _ => Err(ApiError::BadRequest("payload must be a JSON object".into())),
    }
}

/// `POST /api/notifications/` `{user_id, payload}` (service): publishes `notification.created`.
pub async fn notify(
    State(state): State<AppState>,
    caller: Caller,
    _room: super::Room,
    OptionalJson(body): OptionalJson<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Service)?;
    let (user_id, payload) = notify_body(&body)?;
    let id = state.calls.notify(&user_id, payload).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
}

/// `GET /api/turn/`: time-limited TURN credentials, 404 when no TURN secret is configured.
pub async fn turn(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<Value>, ApiError> {
    let turn = state
        .turn
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("no TURN server is configured".into()))?;
    Ok(Json(turn::credentials(turn, caller.user_id(), unix_now())))
}

/// `POST /api/dev/token` `{user_id, username}`: a user token for the demo page (`--dev` only).
pub async fn dev_token(
    State(state): State<AppState>,
    OptionalJson(body): OptionalJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    if !state.dev {
        return Err(ApiError::NotFound("development tokens need --dev".into()));
    }
    let user_id = body.get("user_id").and_then(id_from_json).ok_or_else(|| {
        ApiError::BadRequest("user_id is required (1-64 of [A-Za-z0-9_-])".into())
    })?;
    let username = match body.get("username") {
        None | Some(Value::Null) => user_id.clone(),
        Some(Value::String(u)) if !u.trim().is_empty() && u.len() <= 64 => u.trim().to_owned(),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "username must be a string of 1-64 bytes".into(),
            ))
        }
    };
    // The demo has no main app to manage conversations: signing in joins one (default `demo`).
    let cid = match body.get("conversation_id") {
        None | Some(Value::Null) => "demo".to_owned(),
        Some(v) => id_from_json(v).ok_or_else(|| {
            ApiError::BadRequest("conversation_id must be 1-64 of [A-Za-z0-9_-]".into())
        })?,
    };
    state.conversations.join(&cid, &user_id).await?;
    let token = state
        .auth
        .issue(&user_id, Some(&username), Role::User, 12 * 3600)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(
        json!({ "token": token, "user_id": user_id, "username": username }),
    ))
}

/// 200 once everything this node needs answers (in cluster mode: NATS and PostgreSQL).
pub async fn healthz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    match &state.cluster {
        Some(cluster) if !cluster.ready().await => Err(ApiError::Status(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: NATS or the database is unreachable".into(),
        )),
        _ => Ok("ok"),
    }
}
