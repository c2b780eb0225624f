//! Chat payloads and the events callbus publishes (DESIGN "Messages"). Clients' JSON is checked
//! and stamped with the sender's identity from the token: whatever sender fields a client sent are
//! overwritten, so nobody can speak as someone else.

use serde_json::{json, Map, Value};

use crate::auth::Identity;
use crate::ids::{new_message_id, now_rfc3339};

/// Client-sent fields that claim an identity; always replaced or removed.
const IDENTITY_FIELDS: [&str; 5] = [
    "sender_id",
    "sender_username",
    "caller_id",
    "caller_username",
    "receiver_id",
];

/// A chat payload that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// The `type` field, e.g. `message`, `typing`, `call.offer`.
    pub kind: String,
    /// The whole object as the client sent it.
    pub body: Map<String, Value>,
}

impl ChatMessage {
    /// Whether this is call signaling (`call.*`), which the signaling bridge handles.
    pub fn is_signaling(&self) -> bool {
        self.kind.starts_with("call.")
    }
}

/// Why a chat payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPayload {
    #[error("payload is not valid UTF-8 JSON")]
    NotJson,
    #[error("payload must be a JSON object")]
    NotObject,
    #[error("payload needs a string field \"type\"")]
    NoType,
}

/// Parses a client's chat payload: a JSON object with a string `type`.
pub fn parse_chat(payload: &[u8]) -> Result<ChatMessage, BadPayload> {
    let value: Value = serde_json::from_slice(payload).map_err(|_| BadPayload::NotJson)?;
    let Value::Object(body) = value else {
        return Err(BadPayload::NotObject);
    };
    let kind = match body.get("type") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => return Err(BadPayload::NoType),
    };
    Ok(ChatMessage { kind, body })
}

/// Stamps a relayed chat message with the sender's identity, a fresh `id` and `ts`.
pub fn stamp(mut msg: ChatMessage, sender: &Identity) -> Vec<u8> {
    for field in IDENTITY_FIELDS {
        msg.body.remove(field);
    }
    msg.body
        .insert("sender_id".into(), Value::String(sender.user_id.clone()));
    msg.body.insert(
        "sender_username".into(),
        Value::String(sender.username.clone()),
    );
    msg.body
        .insert("id".into(), Value::String(new_message_id()));
    msg.body.insert("ts".into(), Value::String(now_rfc3339()));
    Value::Object(msg.body).to_string().into_bytes()
}

/// Error codes of the `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    CallNotFound,
    NotAParty,
    WrongState,
    BadPayload,
    Forbidden,
    /// A persistent session's queue passed its bound while the client was away.
    QueueOverflow,
    /// A feature callbus does not offer (retained messages).
    Unsupported,
    /// The call was accepted on another of the receiver's devices.
    AnsweredElsewhere,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::CallNotFound => "call_not_found",
            ErrorCode::NotAParty => "not_a_party",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::BadPayload => "bad_payload",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::QueueOverflow => "queue_overflow",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::AnsweredElsewhere => "answered_elsewhere",
        }
    }
}

/// What an `error` event refers to.
#[derive(Debug, Clone, Default)]
pub struct ErrorRef {
    /// The `type` of the refused message, if it had one.
    pub ref_type: Option<String>,
    /// The call it named, if any.
    pub call_id: Option<String>,
    /// The topic it was published to.
    pub topic: Option<String>,
}

/// The `error` event sent to a client's own notifications topic.
pub fn error_event(code: ErrorCode, detail: &str, about: &ErrorRef) -> Vec<u8> {
    let mut event = json!({
        "type": "error",
        "code": code.as_str(),
        "detail": detail,
        "id": new_message_id(),
        "ts": now_rfc3339(),
    });
    if let Value::Object(map) = &mut event {
        if let Some(t) = &about.ref_type {
            map.insert("ref_type".into(), Value::String(t.clone()));
        }
        if let Some(c) = &about.call_id {
            map.insert("call_id".into(), Value::String(c.clone()));
        }
        if let Some(t) = &about.topic {
            map.insert("topic".into(), Value::String(t.clone()));
        }
    }
    event.to_string().into_bytes()
}

/// Best-effort `type` and `call_id` of a payload, for an error event's reference.
pub fn describe(payload: &[u8], topic: &str) -> ErrorRef {
    let value: Option<Value> = serde_json::from_slice(payload).ok();
    let field = |name: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(crate::ids::id_from_json_or_str)
    };
    ErrorRef {
        ref_type: value
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .map(|s| s.chars().take(64).collect()),
        call_id: field("call_id"),
        topic: Some(topic.chars().take(256).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn mallory() -> Identity {
        Identity {
            user_id: "m".into(),
            username: "mallory".into(),
            first_name: String::new(),
            last_name: String::new(),
            role: Role::User,
        }
    }

    #[test]
    fn parses_objects_with_type() {
        let m = parse_chat(br#"{"type":"message","text":"hi"}"#).unwrap();
        assert_eq!(m.kind, "message");
        assert!(!m.is_signaling());
        assert!(parse_chat(br#"{"type":"call.offer"}"#)
            .unwrap()
            .is_signaling());
    }

    #[test]
    fn refuses_bad_payloads() {
        assert_eq!(parse_chat(b"not json"), Err(BadPayload::NotJson));
        assert_eq!(parse_chat(b"[1,2]"), Err(BadPayload::NotObject));
        assert_eq!(parse_chat(br#"{"text":"x"}"#), Err(BadPayload::NoType));
        assert_eq!(parse_chat(br#"{"type":7}"#), Err(BadPayload::NoType));
        assert_eq!(parse_chat(b"\xff\xfe"), Err(BadPayload::NotJson));
    }

    #[test]
    fn stamping_overwrites_claimed_identity() {
        let msg = parse_chat(
            br#"{"type":"message","text":"hi","sender_id":"alice","sender_username":"Alice","id":"x","caller_id":"alice"}"#,
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&stamp(msg, &mallory())).unwrap();
        assert_eq!(out["sender_id"], "m");
        assert_eq!(out["sender_username"], "mallory");
        assert_eq!(out["text"], "hi");
        assert!(out.get("caller_id").is_none());
        assert_ne!(out["id"], "x");
        assert!(out["ts"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn error_event_shape() {
        let about = describe(br#"{"type":"call.offer","call_id":17}"#, "chat/1");
        let out: Value =
            serde_json::from_slice(&error_event(ErrorCode::Forbidden, "no", &about)).unwrap();
        assert_eq!(out["type"], "error");
        assert_eq!(out["code"], "forbidden");
        assert_eq!(out["ref_type"], "call.offer");
        assert_eq!(out["call_id"], "17");
        assert_eq!(out["topic"], "chat/1");
        assert!(out["id"].is_string() && out["ts"].is_string());
    }
}
