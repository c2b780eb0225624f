//! The events the call service publishes to `users/{uid}/notifications` (DESIGN "Messages").
//! Every event carries a unique `id` and `ts`; `call_id` is a string, as in the seed.
//!
//! Each event is written straight to its JSON text (a serializable struct of borrowed fields),
//! which is what the event log keeps and the bus carries: no `Value` tree built and dropped.

use serde::Serialize;
use serde_json::Value;

use crate::auth::Identity;
use crate::ids::{new_message_id, now_rfc3339};
use crate::model::call::{rfc3339_text, Call, Party};

/// An event's JSON text. (Writing a struct of strings and numbers cannot fail.)
fn text(event: &impl Serialize) -> String {
    serde_json::to_string(event).unwrap_or_default()
}

#[derive(Serialize)]
struct Created<'a, P> {
    #[serde(rename = "type")]
    kind: &'static str,
    payload: P,
    id: &'a str,
    ts: &'a str,
}

fn created(payload: impl Serialize) -> (String, String) {
    let id = new_message_id();
    let event = text(&Created {
        kind: "notification.created",
        payload,
        id: &id,
        ts: &now_rfc3339(),
    });
    (id, event)
}

/// The seed's `notification.created` event around the main app's own payload; its `id` and
/// its text.
pub fn notification_created(payload: &Value) -> (String, String) {
    created(payload)
}

#[derive(Serialize)]
struct Actor<'a> {
    id: &'a str,
    username: &'a str,
    first_name: &'a str,
    last_name: &'a str,
}

#[derive(Serialize)]
struct CallNotification<'a> {
    id: u64,
    actor: Actor<'a>,
    verb: &'a str,
    object_id: u64,
    conversation_id: &'a str,
    call_type: &'a str,
    timestamp: String,
}

fn call_notification(call: &Call, actor: Actor<'_>, verb: &str) -> String {
    created(CallNotification {
        id: call.id,
        actor,
        verb,
        object_id: call.id,
        conversation_id: &call.conversation_id,
        call_type: call.call_type.as_str(),
        timestamp: rfc3339_text(call.created_ms),
    })
    .1
}

/// `notification.created` for the receiver of a new call (`incoming_voice_call` /
/// `incoming_video_call`), with the caller's claims as the actor.
pub fn incoming_call(call: &Call, caller: &Identity) -> String {
    let actor = Actor {
        id: caller.user_id(),
        username: caller.username(),
        first_name: caller.first_name(),
        last_name: caller.last_name(),
    };
    let verb = format!("incoming_{}_call", call.call_type.as_str());
    call_notification(call, actor, &verb)
}

/// `notification.created` for the receiver of a call nobody answered.
pub fn missed_call(call: &Call) -> String {
    let Party {
        id,
        username,
        first_name,
        last_name,
    } = &call.caller;
    let actor = Actor {
        id,
        username,
        first_name,
        last_name,
    };
    let verb = format!("missed_{}_call", call.call_type.as_str());
    call_notification(call, actor, &verb)
}

#[derive(Serialize)]
struct Accepted<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    call_id: String,
    accepted_by: &'a str,
    device_id: Option<&'a str>,
    conversation_id: &'a str,
    id: String,
    ts: String,
}

/// `call.accepted`, to both parties (the receiver's other devices stop ringing).
pub fn accepted(call: &Call) -> String {
    text(&Accepted {
        kind: "call.accepted",
        call_id: call.id.to_string(),
        accepted_by: &call.receiver.id,
        device_id: call.accepted_device.as_deref(),
        conversation_id: &call.conversation_id,
        id: new_message_id(),
        ts: now_rfc3339(),
    })
}

#[derive(Serialize)]
struct Ended<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    call_id: Option<String>,
    reason: Option<&'a str>,
    duration_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    hangup_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    receiver_id: Option<&'a str>,
    conversation_id: &'a str,
    id: String,
    ts: String,
}

/// `call.end`, to both parties.
pub fn ended(call: &Call) -> String {
    text(&Ended {
        kind: "call.end",
        call_id: Some(call.id.to_string()),
        reason: call.end_reason.as_deref(),
        duration_seconds: call.duration_seconds(),
        hangup_reason: call.hangup_reason.as_deref(),
        receiver_id: None,
        conversation_id: &call.conversation_id,
        id: new_message_id(),
        ts: now_rfc3339(),
    })
}

/// `call.end{reason: busy}` to a caller whose receiver is in another call. No call was created,
/// so `call_id` is null.
pub fn busy(receiver_id: &str, conversation_id: &str) -> String {
    text(&Ended {
        kind: "call.end",
        call_id: None,
        reason: Some("busy"),
        duration_seconds: 0,
        hangup_reason: None,
        receiver_id: Some(receiver_id),
        conversation_id,
        id: new_message_id(),
        ts: now_rfc3339(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::call::Status;

    fn call() -> Call {
        let mut call = Call::sample(Status::Ended);
        call.caller.last_name = "L\"ast".into();
        call.accepted_ms = Some(2_000);
        call.ended_ms = Some(9_500);
        call.end_reason = Some("completed".into());
        call.accepted_device = Some("phone".into());
        call
    }

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn shapes() {
        let c = call();
        let missed = parse(&missed_call(&c));
        assert_eq!(missed["type"], "notification.created");
        assert_eq!(missed["payload"]["verb"], "missed_video_call");
        assert_eq!(missed["payload"]["actor"]["last_name"], "L\"ast");
        assert_eq!(missed["payload"]["object_id"], 17);
        assert_eq!(missed["payload"]["timestamp"], "1970-01-01T00:00:01.000Z");
        let accepted = parse(&accepted(&c));
        assert_eq!(accepted["call_id"], "17");
        assert_eq!(accepted["device_id"], "phone");
        let ended = parse(&ended(&c));
        assert_eq!(ended["duration_seconds"], 7);
        assert_eq!(ended["reason"], "completed");
        assert!(ended.get("hangup_reason").is_none());
        assert!(ended.get("receiver_id").is_none());
        let busy = parse(&busy("b", "c1"));
        assert_eq!(busy["call_id"], Value::Null);
        assert_eq!(busy["reason"], "busy");
        assert_eq!(busy["receiver_id"], "b");
        let (id, created) = notification_created(&serde_json::json!({"verb": "x"}));
        let created = parse(&created);
        assert_eq!(created["id"], id.as_str());
        assert_eq!(created["payload"]["verb"], "x");
        assert!(created["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
