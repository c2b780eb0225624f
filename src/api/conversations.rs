//! `PUT/GET /api/conversations/{cid}/`: membership, owned by the main app (service role).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;

use super::auth::Caller;
use super::error::{ApiError, JsonBody};
use super::AppState;
use crate::auth::Role;
use crate::ids::{id_from_json, is_valid_id};
use crate::store::Conversation;

/// Most members a conversation may have.
pub const MAX_MEMBERS: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutConversation {
    members: Vec<Value>,
}

impl PutConversation {
    /// The members, as user ids (at most [`MAX_MEMBERS`]).
    pub fn members(&self) -> Result<BTreeSet<String>, ApiError> {
        if self.members.len() > MAX_MEMBERS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_MEMBERS} members"
            )));
        }
        self.members
            .iter()
            .map(|m| {
                id_from_json(m).ok_or_else(|| {
                    ApiError::BadRequest(format!("member {m} is not a valid user id"))
                })
            })
            .collect()
    }
}

fn conversation_id(cid: &str) -> Result<&str, ApiError> {
    if is_valid_id(cid) {
        Ok(cid)
    } else {
        Err(ApiError::BadRequest(
            "conversation id must be 1-64 characters of [A-Za-z0-9_-]".into(),
        ))
    }
}

pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    _room: super::Room,
    Path(cid): Path<String>,
    JsonBody(body): JsonBody<PutConversation>,
) -> Result<(StatusCode, Json<Conversation>), ApiError> {
    caller.require(Role::Service)?;
    let cid = conversation_id(&cid)?;
    let members = body.members()?;
    // Removed members have stopped receiving by the time this returns.
    let (conv, existed) = state.conversations.replace(cid, members).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(conv)))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(cid): Path<String>,
) -> Result<Json<Conversation>, ApiError> {
    let cid = conversation_id(&cid)?;
    let conv = state
        .conversations
        .get(cid)
        .ok_or_else(|| ApiError::NotFound("conversation not found".into()))?;
    let who = &caller.0;
    if who.role != Role::Service && !conv.members.contains(who.user_id()) {
        // As for a conversation that does not exist: a stranger learns nothing of it.
        return Err(ApiError::NotFound("conversation not found".into()));
    }
    Ok(Json((*conv).clone()))
}
