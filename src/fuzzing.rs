//! Entry points for the coverage-guided fuzz targets (`fuzz/`) and for the test that replays
//! their findings on stable (`tests/fuzz_regressions.rs`). Each drives one parser the network
//! reaches with arbitrary bytes; none may panic, hang or allocate without bound.

use bytes::Bytes;
use serde_json::Value;

use crate::auth::{Identity, Role};
use crate::bridge::{acl, message, signaling};
use crate::broker::fuzz_codec;
use crate::model::call::{Call, CallType, Party, Status};

/// Largest packet, as the default configuration.
const MAX_PACKET: usize = 128 * 1024;

/// The byte stream into a session: `data[0]` picks the protocol (its high bit: MQTT 5) and how
/// the rest is cut into reads (partial and concatenated packets), and every whole packet is
/// decoded as a session of that protocol decodes it, then encoded again as it answers.
pub fn mqtt_stream(data: &[u8]) {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let mqtt5 = first & 0x80 != 0;
    fuzz_codec(bytes, usize::from(first & 0x7f).max(1), MAX_PACKET, mqtt5);
}

fn party(id: &str) -> Party {
    Party {
        id: id.into(),
        username: id.into(),
        first_name: String::new(),
        last_name: String::new(),
    }
}

fn user(id: &str, role: Role) -> Identity {
    Identity::new(id, id, "", "", role)
}

/// A chat publish through the bridge's checks: the topic ACL, payload validation, stamping,
/// and the signaling rules against calls in every state, from either party and a stranger.
/// `data` is `<topic>\n<payload>` (no newline: all payload, on `chat/c1`).
pub fn chat_publish(data: &[u8]) {
    let (topic, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => ("chat/c1".to_owned(), data),
    };
    let _ = message::describe(payload, &topic);
    let alice = user("a", Role::User);
    let Ok(cid) = acl::authorize_publish(&alice, &topic, |cid| cid == "c1") else {
        return;
    };
    let Ok(msg) = message::parse_chat(payload) else {
        return;
    };
    if !msg.is_signaling() {
        let _ = message::stamp(&msg, &alice);
        return;
    }
    let (Some(kind), Ok(id)) = (signaling::Kind::parse(&msg.kind), signaling::call_id(&msg)) else {
        return;
    };
    for status in [
        Status::Ringing,
        Status::Active,
        Status::Ended,
        Status::Missed,
    ] {
        let call = Call {
            id,
            caller: party("a"),
            receiver: party("b"),
            call_type: CallType::Video,
            conversation_id: "c1".into(),
            status,
            created_ms: 0,
            ring_deadline_ms: 0,
            accepted_ms: None,
            ended_ms: None,
            end_reason: None,
            hangup_reason: None,
            accepted_device: (status == Status::Active).then(|| "phone".into()),
        };
        for who in ["a", "b", "z"] {
            let who = user(who, Role::User);
            let sender = signaling::Sender {
                who: &who,
                device: "web",
            };
            for offered_by in [None, Some("a"), Some("b")] {
                if let Ok(copies) =
                    signaling::relay(&sender, cid, kind, &msg, Some(&call), offered_by)
                {
                    for copy in copies {
                        // What the bridge emits is always JSON.
                        let parsed: Result<Value, _> = serde_json::from_slice(&copy.payload);
                        assert!(parsed.is_ok(), "the bridge emitted invalid JSON");
                    }
                }
            }
        }
    }
}

/// What arrives from the bus: the envelope in front of a payload.
pub fn bus_envelope(data: &[u8]) {
    crate::bus::fuzz_envelope(Bytes::copy_from_slice(data));
}

/// A REST request body: `data[0]` picks the endpoint (initiate, accept, end, conversation PUT,
/// notification), the rest is the body, read and checked as that handler does.
pub fn rest_bodies(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    crate::api::fuzz_rest_body(which, body);
}
