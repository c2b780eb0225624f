//! The events the call service publishes to `users/{uid}/notifications` (DESIGN "Messages").
//! Every event carries a unique `id` and `ts`; `call_id` is a string, as in the seed.

use serde_json::{json, Value};

use crate::auth::Identity;
use crate::ids::{new_message_id, now_rfc3339};
use crate::model::call::{rfc3339, Call};

/// Wraps a notification payload as the seed's `notification.created` event.
pub fn notification_created(payload: Value) -> Value {
    json!({
        "type": "notification.created",
        "payload": payload,
        "id": new_message_id(),
        "ts": now_rfc3339(),
    })
}

fn call_notification(call: &Call, actor: Value, verb: &str) -> Value {
    notification_created(json!({
        "id": call.id,
        "actor": actor,
        "verb": verb,
        "object_id": call.id,
        "conversation_id": call.conversation_id,
        "call_type": call.call_type.as_str(),
        "timestamp": rfc3339(Some(call.created_ms)),
    }))
}

/// `notification.created` for the receiver of a new call (`incoming_voice_call` /
/// `incoming_video_call`), with the caller's claims as the actor.
pub fn incoming_call(call: &Call, caller: &Identity) -> Value {
    let actor = json!({
        "id": caller.user_id,
        "username": caller.username,
        "first_name": caller.first_name,
        "last_name": caller.last_name,
    });
    let verb = format!("incoming_{}_call", call.call_type.as_str());
    call_notification(call, actor, &verb)
}

/// `notification.created` for the receiver of a call nobody answered.
pub fn missed_call(call: &Call) -> Value {
    let actor = json!({
        "id": call.caller.id,
        "username": call.caller.username,
        "first_name": call.caller.first_name,
        "last_name": call.caller.last_name,
    });
    let verb = format!("missed_{}_call", call.call_type.as_str());
    call_notification(call, actor, &verb)
}

/// `call.accepted`, to both parties (the receiver's other devices stop ringing).
pub fn accepted(call: &Call) -> Value {
    json!({
        "type": "call.accepted",
        "call_id": call.id.to_string(),
        "accepted_by": call.receiver.id,
        "device_id": call.accepted_device,
        "conversation_id": call.conversation_id,
        "id": new_message_id(),
        "ts": now_rfc3339(),
    })
}

/// `call.end`, to both parties.
pub fn ended(call: &Call) -> Value {
    let mut event = json!({
        "type": "call.end",
        "call_id": call.id.to_string(),
        "reason": call.end_reason,
        "duration_seconds": call.duration_seconds(),
        "conversation_id": call.conversation_id,
        "id": new_message_id(),
        "ts": now_rfc3339(),
    });
    if let (Some(reason), Value::Object(map)) = (&call.hangup_reason, &mut event) {
        map.insert("hangup_reason".into(), Value::String(reason.clone()));
    }
    event
}

/// `call.end{reason: busy}` to a caller whose receiver is in another call. No call was created,
/// so `call_id` is null.
pub fn busy(receiver_id: &str, conversation_id: &str) -> Value {
    json!({
        "type": "call.end",
        "call_id": Value::Null,
        "reason": "busy",
        "duration_seconds": 0,
        "receiver_id": receiver_id,
        "conversation_id": conversation_id,
        "id": new_message_id(),
        "ts": now_rfc3339(),
    })
}
