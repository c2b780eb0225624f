//! `/api/calls/...`: initiate, accept, reject, end, get, history (DESIGN "REST API").

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Map, Value};

use super::auth::Caller;
use super::error::{ApiError, OptionalJson};
use super::AppState;
use crate::calls::{CallError, NewCall};
use crate::ids::{id_from_json, is_valid_id};
use crate::model::call::{Action, Call, CallType, TransitionError, HANGUP_REASONS};

/// A call as a REST reply, written through [`Call::view`] (no `Value` built on the way).
pub struct CallReply(Call);

impl Serialize for CallReply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.view().serialize(s)
    }
}

/// `POST /api/calls/initiate/`'s reply: the call, and whether the receiver can be reached.
#[derive(Serialize)]
pub struct Initiated {
    #[serde(flatten)]
    call: CallReply,
    receiver_devices: usize,
    push_queued: bool,
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotFound => ApiError::NotFound(e.to_string()),
            CallError::Forbidden(m) => ApiError::Forbidden(m),
            CallError::Transition(TransitionError::WrongState(_)) => {
                ApiError::Conflict(e.to_string())
            }
            // Who may not see a call is told it does not exist (ids are sequential: a 403
            // would tell a stranger which calls exist).
            CallError::Transition(TransitionError::NotAParty) => {
                ApiError::NotFound("call not found".into())
            }
            CallError::Transition(_) => ApiError::Forbidden(e.to_string()),
            CallError::Busy { .. } => ApiError::Conflict(e.to_string()),
            CallError::Glare(_, ref call) | CallError::Calling(ref call) => {
                ApiError::ConflictWith(e.to_string(), json!({ "call": call.to_json() }))
            }
            CallError::Store(e) => ApiError::from(e),
        }
    }
}

fn required_id(body: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Err(ApiError::BadRequest(format!("{field} is required"))),
        Some(v) => id_from_json(v).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{field} must be a string or integer id of 1-64 characters [A-Za-z0-9_-]"
            ))
        }),
    }
}

/// An initiate body's receiver, conversation and call type.
pub fn initiate_body(body: &Map<String, Value>) -> Result<(String, String, CallType), ApiError> {
    let receiver_id = required_id(body, "receiver_id")?;
    let conversation_id = required_id(body, "conversation_id")?;
    let call_type = match body.get("call_type") {
        None | Some(Value::Null) => {
            return Err(ApiError::BadRequest("call_type is required".into()))
        }
        Some(v) => v.as_str().and_then(CallType::parse).ok_or_else(|| {
            ApiError::BadRequest("call_type must be \"voice\" or \"video\"".into())
        })?,
    };
    Ok((receiver_id, conversation_id, call_type))
}

/// `POST /api/calls/initiate/`
pub async fn initiate(
    State(state): State<AppState>,
    Caller(caller): Caller,
    _room: super::Room,
    OptionalJson(body): OptionalJson<Map<String, Value>>,
) -> Result<(StatusCode, Json<Initiated>), ApiError> {
    let (receiver_id, conversation_id, call_type) = initiate_body(&body)?;
    if let Err(wait) = state.initiations.admit(caller.user_id().to_owned()) {
        crate::metrics::CALLS_RATE_LIMITED.inc();
        return Err(ApiError::TooMany(wait));
    }
    if receiver_id == caller.user_id() {
        return Err(ApiError::BadRequest("you cannot call yourself".into()));
    }
    let conversations = &state.conversations;
    if !conversations.is_member(&conversation_id, caller.user_id()) {
        return Err(ApiError::Forbidden(
            "you are not a member of this conversation".into(),
        ));
    }
    if !conversations.is_member(&conversation_id, &receiver_id) {
        return Err(ApiError::Forbidden(
            "the receiver is not a member of this conversation".into(),
        ));
    }
    let call = state
        .calls
        .initiate(
            &caller,
            NewCall {
                receiver_id,
                call_type,
                conversation_id,
            },
        )
        .await?;
    // Reachability, so the caller's UI can say "ringing" or "calling…": the receiver's live
    // devices, and whether a push to wake sleeping ones was queued.
    let body = Initiated {
        receiver_devices: state.calls.live_devices(&call.receiver.id).await,
        push_queued: state.calls.pushes(),
        call: CallReply(call),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

/// A call id from the path: 400 if malformed, 404 if it cannot name a call.
fn call_id(raw: &str) -> Result<u64, ApiError> {
    if !is_valid_id(raw) {
        return Err(ApiError::BadRequest("malformed call id".into()));
    }
    raw.parse()
        .map_err(|_| ApiError::NotFound("call not found".into()))
}

#[derive(Deserialize, Default)]
pub struct AcceptBody {
    device_id: Option<Value>,
}

impl AcceptBody {
    /// The device the call is bound to, if named.
    pub fn device(self) -> Result<Option<String>, ApiError> {
        match self.device_id {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(id_from_json(&v).ok_or_else(|| {
                ApiError::BadRequest("device_id must be 1-64 characters of [A-Za-z0-9_-]".into())
            })?)),
        }
    }
}

/// `POST /api/calls/{id}/accept/`
pub async fn accept(
    State(state): State<AppState>,
    Caller(caller): Caller,
    _room: super::Room,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<AcceptBody>,
) -> Result<Json<CallReply>, ApiError> {
    let id = call_id(&id)?;
    let device_id = body.device()?;
    let action = Action::Accept {
        by: caller.user_id().to_owned(),
        username: caller.username().to_owned(),
        device_id,
    };
    Ok(Json(CallReply(state.calls.transition(id, action).await?)))
}

/// `POST /api/calls/{id}/reject/`
pub async fn reject(
    State(state): State<AppState>,
    Caller(caller): Caller,
    _room: super::Room,
    Path(id): Path<String>,
) -> Result<Json<CallReply>, ApiError> {
    let id = call_id(&id)?;
    let action = Action::Reject {
        by: caller.user_id().to_owned(),
        username: caller.username().to_owned(),
    };
    Ok(Json(CallReply(state.calls.transition(id, action).await?)))
}

#[derive(Deserialize, Default)]
pub struct EndBody {
    reason: Option<Value>,
}

impl EndBody {
    /// The hangup reason, if given (one of [`HANGUP_REASONS`]).
    pub fn hangup_reason(self) -> Result<Option<String>, ApiError> {
        match self.reason {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(r)) if HANGUP_REASONS.contains(&r.as_str()) => Ok(Some(r)),
            Some(_) => Err(ApiError::BadRequest(format!(
                "reason must be one of {}",
                HANGUP_REASONS.join(", ")
            ))),
        }
    }
}

/// `POST /api/calls/{id}/end/`. A client-sent duration is ignored: the server computes it.
pub async fn end(
    State(state): State<AppState>,
    Caller(caller): Caller,
    _room: super::Room,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<EndBody>,
) -> Result<Json<CallReply>, ApiError> {
    let id = call_id(&id)?;
    let hangup_reason = body.hangup_reason()?;
    let action = Action::End {
        by: caller.user_id().to_owned(),
        hangup_reason,
    };
    Ok(Json(CallReply(state.calls.transition(id, action).await?)))
}

/// `GET /api/calls/{id}/`
pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Json<CallReply>, ApiError> {
    let id = call_id(&id)?;
    let call = state
        .calls
        .fetch(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("call not found".into()))?;
    if !call.is_party(caller.user_id()) {
        return Err(ApiError::NotFound("call not found".into()));
    }
    Ok(Json(CallReply(call)))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /api/calls/?limit=&before=`: the caller's calls, newest first.
pub async fn history(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    let limit = match q.limit.as_deref() {
        None | Some("") => 20,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::BadRequest("limit must be 1-100".into()))?,
    };
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::BadRequest("before must be a call id".into()))?,
        ),
    };
    let calls = state.calls.history(caller.user_id(), before, limit).await?;
    let next_before = if calls.len() == limit {
        calls.last().map(|c| c.id)
    } else {
        None
    };
    let results = calls.into_iter().map(CallReply).collect();
    Ok(Json(History {
        results,
        next_before,
    }))
}

/// `GET /api/calls/`'s reply: a page of calls, and where the next page starts.
#[derive(Serialize)]
pub struct History {
    results: Vec<CallReply>,
    next_before: Option<u64>,
}
