//! Call signaling (DESIGN "Bridge rules"): `call.offer`, `call.answer` and `call.candidate`
//! published to `chat/{cid}` are checked against the call and mirrored to both `chat/{cid}` and
//! the other party's notifications topic, with identity taken from the token only.

use serde_json::value::RawValue;
use serde_json::Value;

use super::message::{ChatMessage, ErrorCode, JsonObject};
use super::scan;
use crate::auth::Identity;
use crate::bus::Message;
use crate::ids::id_from_json;
use crate::model::call::{Call, Status};
use crate::model::topic::{chat_topic, notifications_topic};

/// Signaling kinds the bridge relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Offer,
    Answer,
    Candidate,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "call.offer" => Some(Kind::Offer),
            "call.answer" => Some(Kind::Answer),
            "call.candidate" => Some(Kind::Candidate),
            _ => None,
        }
    }
}

/// A refusal: the error code and its detail.
pub type Refusal = (ErrorCode, String);

fn refuse<T>(code: ErrorCode, detail: impl Into<String>) -> Result<T, Refusal> {
    Err((code, detail.into()))
}

/// The call id a signaling message names.
pub fn call_id(msg: &ChatMessage<'_>) -> Result<u64, Refusal> {
    let Some(raw) = msg.field("call_id") else {
        return refuse(ErrorCode::BadPayload, "call_id is required");
    };
    let value: Option<Value> = serde_json::from_str(raw.get()).ok();
    let Some(id) = value.as_ref().and_then(id_from_json) else {
        return refuse(ErrorCode::BadPayload, "call_id must be a call id");
    };
    id.parse()
        .or_else(|_| refuse(ErrorCode::CallNotFound, "no such call"))
}

/// Whether `json` is an SDP description: an object with a string `type` equal to `expected`
/// and a string `sdp`, each once; other fields are allowed.
fn is_description(json: &str, expected: &str) -> bool {
    let (mut kind, mut sdp) = (None, None);
    for (key, value) in scan::fields(json).into_iter().flatten() {
        let slot = if scan::string_is(key, "type") {
            &mut kind
        } else if scan::string_is(key, "sdp") {
            &mut sdp
        } else {
            continue;
        };
        if slot.replace(value).is_some() {
            return false; // a field given twice
        }
    }
    kind.is_some_and(|k| scan::string_is(k, expected)) && sdp.is_some_and(scan::is_string)
}

/// Checks an SDP description object (`{"type": expected, "sdp": "..."}`); its JSON text.
fn description<'a>(
    msg: &ChatMessage<'a>,
    field: &str,
    expected: &str,
) -> Result<&'a RawValue, Refusal> {
    let checked = msg
        .field(field)
        .filter(|raw| is_description(raw.get(), expected));
    checked.ok_or_else(|| {
        (
            ErrorCode::BadPayload,
            format!("{field} must be {{\"type\": \"{expected}\", \"sdp\": \"...\"}}"),
        )
    })
}

/// Whether `json` is an ICE candidate: an object with a string `candidate`, once (`sdpMid`,
/// `sdpMLineIndex` and others allowed).
fn is_candidate(json: &str) -> bool {
    let mut candidate = None;
    for (key, value) in scan::fields(json).into_iter().flatten() {
        if scan::string_is(key, "candidate") && candidate.replace(value).is_some() {
            return false;
        }
    }
    candidate.is_some_and(scan::is_string)
}

/// Checks an ICE candidate object; its JSON text. An empty candidate string is allowed: it
/// signals the end of candidates.
fn candidate<'a>(msg: &ChatMessage<'a>) -> Result<&'a RawValue, Refusal> {
    let checked = msg.field("candidate").filter(|raw| is_candidate(raw.get()));
    checked.ok_or_else(|| {
        (
            ErrorCode::BadPayload,
            "candidate must be {\"candidate\": \"...\", \"sdpMid\": ..., \"sdpMLineIndex\": ...}"
                .to_owned(),
        )
    })
}

/// Who sends a signaling message: the user and the device (MQTT client id) it comes from.
pub struct Sender<'a> {
    pub who: &'a Identity,
    pub device: &'a str,
}

/// Validates a signaling message from `sender` on `chat/{cid}` for `call`, whose latest offer
/// (if any is known) came from `offered_by`, and builds the two copies: one for `chat/{cid}`,
/// which only the call's parties receive, and one for the other party's notifications. Once
/// the call is accepted on one of the receiver's devices, the receiver's other devices may no
/// longer signal for it; every copy names that device in `device_id`.
pub fn relay(
    sender: &Sender<'_>,
    cid: &str,
    kind: Kind,
    msg: &ChatMessage<'_>,
    call: Option<&Call>,
    offered_by: Option<&str>,
) -> Result<Vec<Message>, Refusal> {
    let who = sender.who;
    let Some(call) = call else {
        return refuse(ErrorCode::CallNotFound, "no such call");
    };
    if !call.is_party(who.user_id()) {
        return refuse(ErrorCode::NotAParty, "you are not a party to this call");
    }
    if call.conversation_id != cid {
        return refuse(
            ErrorCode::CallNotFound,
            "this call belongs to another conversation",
        );
    }
    if call.status.is_terminal() {
        return refuse(
            ErrorCode::WrongState,
            format!("the call is {}", call.status.as_str()),
        );
    }
    let is_caller = call.caller.id == who.user_id();
    if let Some(bound) = &call.accepted_device {
        if !is_caller && bound != sender.device {
            return refuse(
                ErrorCode::AnsweredElsewhere,
                "the call was answered on another of your devices",
            );
        }
    }
    // The client's description or candidate, checked, goes out as the client wrote it.
    let (kind_name, field, value) = match kind {
        Kind::Offer => {
            // The first offer comes from the caller; once active, either side may renegotiate.
            if call.status == Status::Ringing && !is_caller {
                return refuse(
                    ErrorCode::WrongState,
                    "only the caller offers before the call is accepted",
                );
            }
            ("call.offer", "offer", description(msg, "offer", "offer")?)
        }
        Kind::Answer => {
            let answer = description(msg, "answer", "answer")?;
            let answer_ok = match offered_by {
                Some(offerer) => offerer != who.user_id(),
                None => !is_caller || call.status == Status::Active,
            };
            if !answer_ok {
                return refuse(
                    ErrorCode::WrongState,
                    "an answer comes from the party that did not send the offer",
                );
            }
            ("call.answer", "answer", answer)
        }
        Kind::Candidate => ("call.candidate", "candidate", candidate(msg)?),
    };
    let mut event = JsonObject::with_capacity(value.get().len() + 320);
    event.text("type", kind_name);
    event.text("call_id", &call.id.to_string());
    event.text("conversation_id", &call.conversation_id);
    event.text("sender_id", who.user_id());
    event.text("sender_username", who.username());
    event.text_or_null("device_id", call.accepted_device.as_deref());
    event.id_and_ts();
    match kind {
        Kind::Offer => {
            event.text("caller_id", who.user_id());
            event.text("caller_username", who.username());
            event.text("call_type", call.call_type.as_str());
        }
        Kind::Answer => event.text("receiver_id", who.user_id()),
        Kind::Candidate => {}
    }
    event.raw(field, value.get());
    let payload = bytes::Bytes::from(event.finish());
    let other = call.other_party(who.user_id());
    let parties = [call.caller.id.as_str(), call.receiver.id.as_str()];
    Ok(vec![
        Message::to_users(chat_topic(cid), payload.clone(), &parties),
        Message::new(notifications_topic(&other.id), payload),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::bridge::message::parse_chat;

    fn user(id: &str) -> Identity {
        Identity::new(id, &format!("{id}-name"), "", "", Role::User)
    }

    fn call(status: Status) -> Call {
        Call::sample(status)
    }

    const OFFER: &[u8] =
        br#"{"type":"call.offer","call_id":"17","offer":{"type":"offer","sdp":"v=0"},"caller_id":"b"}"#;
    const ANSWER: &[u8] =
        br#"{"type":"call.answer","call_id":17,"answer":{"type":"answer","sdp":"v=0"}}"#;
    const CANDIDATE: &[u8] = br#"{"type":"call.candidate","call_id":"17","candidate":{"candidate":"candidate:1","sdpMid":"0","sdpMLineIndex":0}}"#;

    fn run(
        who: &str,
        cid: &str,
        raw: &[u8],
        c: Option<Call>,
        offered_by: Option<&str>,
    ) -> Result<Vec<Message>, ErrorCode> {
        let msg = parse_chat(raw).unwrap();
        let kind = Kind::parse(&msg.kind).unwrap();
        let who = user(who);
        let sender = Sender {
            who: &who,
            device: "dev1",
        };
        relay(&sender, cid, kind, &msg, c.as_ref(), offered_by).map_err(|(code, _)| code)
    }

    #[test]
    fn offer_is_mirrored_with_identity_from_the_token() {
        let out = run("a", "c1", OFFER, Some(call(Status::Ringing)), None).unwrap();
        assert_eq!(&out[0].topic[..], b"chat/c1");
        assert_eq!(
            out[0].audience,
            crate::bus::Audience::Users(vec!["a".to_owned(), "b".to_owned()].into())
        );
        assert_eq!(&out[1].topic[..], b"users/b/notifications");
        assert_eq!(out[0].payload, out[1].payload, "same id on both copies");
        let v: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(v["type"], "call.offer");
        assert_eq!(v["caller_id"], "a");
        assert_eq!(v["caller_username"], "a-name");
        assert_eq!(v["call_id"], "17");
        assert_eq!(v["call_type"], "video");
        assert_eq!(v["offer"]["sdp"], "v=0");
    }

    #[test]
    fn an_sdp_with_escapes_goes_out_as_the_client_wrote_it() {
        let sdp = r#""v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=\u0041\"q\"\r\n""#;
        let offer = format!(
            r#"{{"type":"call.offer","call_id":"17","offer":{{"sdp":{sdp},"type":"offer"}}}}"#
        );
        let out = run(
            "a",
            "c1",
            offer.as_bytes(),
            Some(call(Status::Ringing)),
            None,
        )
        .unwrap();
        let text = std::str::from_utf8(&out[1].payload).unwrap();
        assert!(text.contains(sdp), "{text}");
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            v["offer"]["sdp"],
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=A\"q\"\r\n"
        );
    }

    #[test]
    fn refusals() {
        let ringing = || Some(call(Status::Ringing));
        assert_eq!(
            run("a", "c1", OFFER, None, None),
            Err(ErrorCode::CallNotFound)
        );
        assert_eq!(
            run("z", "c1", OFFER, ringing(), None),
            Err(ErrorCode::NotAParty)
        );
        assert_eq!(
            run("a", "c2", OFFER, ringing(), None),
            Err(ErrorCode::CallNotFound)
        );
        assert_eq!(
            run("b", "c1", OFFER, ringing(), None),
            Err(ErrorCode::WrongState)
        );
        for s in [
            Status::Ended,
            Status::Rejected,
            Status::Cancelled,
            Status::Missed,
        ] {
            assert_eq!(
                run("a", "c1", CANDIDATE, Some(call(s)), None),
                Err(ErrorCode::WrongState)
            );
        }
        let bad = br#"{"type":"call.offer","call_id":"17","offer":"v=0"}"#;
        assert_eq!(
            run("a", "c1", bad, ringing(), None),
            Err(ErrorCode::BadPayload)
        );
        // The SDP and the candidate must be strings (checked without decoding them).
        let offers = [
            r#"{"type":"offer","sdp":5}"#,
            r#"{"type":"offer","sdp":null}"#,
            r#"{"type":"offer","sdp":{"v":"0"}}"#,
            r#"{"type":"offer","sdp":["v=0"]}"#,
            r#"{"type":"offer"}"#,
            r#"{"type":"answer","sdp":"v=0"}"#,
            r#"{"type":"offer","sdp":"v=0","type":"answer"}"#,
            r#"{"type":"offer","sdp":"v=0","sdp":"v=1"}"#,
            r#"{"typ\u0065":"answer","sdp":"v=0"}"#,
            r#"{"type":1,"sdp":"v=0"}"#,
            r#"["type","offer","sdp","v=0"]"#,
        ];
        for offer in offers {
            let bad = format!(r#"{{"type":"call.offer","call_id":"17","offer":{offer}}}"#);
            let got = run("a", "c1", bad.as_bytes(), ringing(), None);
            assert_eq!(got.err(), Some(ErrorCode::BadPayload), "{offer}");
        }
        let candidates = [
            r#"{"candidate":1}"#,
            r#"{"candidate":false}"#,
            "{}",
            r#"{"candidate":"a","candidate":"b"}"#,
            r#""candidate""#,
        ];
        for candidate in candidates {
            let bad =
                format!(r#"{{"type":"call.candidate","call_id":"17","candidate":{candidate}}}"#);
            let got = run("a", "c1", bad.as_bytes(), ringing(), None);
            assert_eq!(got.err(), Some(ErrorCode::BadPayload), "{candidate}");
        }
        // Keys and values as JSON allows them: escaped, spaced, in any order.
        let fine = r#"{"call_id":"17", "offer": { "sd\u0070" : "v=0\"}" , "x":{"type":"answer"}, "type":"off\u0065r" },"type":"call.offer"}"#;
        assert!(run("a", "c1", fine.as_bytes(), ringing(), None).is_ok());
        let no_id = br#"{"type":"call.candidate","candidate":{"candidate":""}}"#;
        let code = call_id(&parse_chat(no_id).unwrap()).map_err(|(code, _)| code);
        assert_eq!(code, Err(ErrorCode::BadPayload));
    }

    #[test]
    fn a_call_bound_to_a_device_refuses_the_receivers_other_devices() {
        let mut bound = call(Status::Active);
        bound.accepted_device = Some("phone".into());
        let msg = parse_chat(CANDIDATE).unwrap();
        let bob = user("b");
        let from = |device| Sender { who: &bob, device };
        let refused = relay(
            &from("web"),
            "c1",
            Kind::Candidate,
            &msg,
            Some(&bound),
            None,
        );
        assert_eq!(
            refused.map_err(|(c, _)| c).err(),
            Some(ErrorCode::AnsweredElsewhere)
        );
        let relayed = relay(
            &from("phone"),
            "c1",
            Kind::Candidate,
            &msg,
            Some(&bound),
            None,
        );
        let v: Value = serde_json::from_slice(&relayed.unwrap()[0].payload).unwrap();
        assert_eq!(v["device_id"], "phone");
        // The caller's devices are not bound.
        let alice = user("a");
        let caller = Sender {
            who: &alice,
            device: "laptop",
        };
        assert!(relay(&caller, "c1", Kind::Candidate, &msg, Some(&bound), None).is_ok());
    }

    #[test]
    fn answers_come_from_the_other_side_of_the_offer() {
        let active = || Some(call(Status::Active));
        // Before any offer is seen, the receiver answers while ringing.
        assert!(run("b", "c1", ANSWER, Some(call(Status::Ringing)), None).is_ok());
        assert_eq!(
            run("a", "c1", ANSWER, Some(call(Status::Ringing)), None),
            Err(ErrorCode::WrongState)
        );
        // Renegotiation from the receiver: now the caller answers.
        let reoffer =
            br#"{"type":"call.offer","call_id":"17","offer":{"type":"offer","sdp":"v=1"}}"#;
        assert!(run("b", "c1", reoffer, active(), None).is_ok());
        assert_eq!(
            run("b", "c1", ANSWER, active(), Some("b")),
            Err(ErrorCode::WrongState)
        );
        assert!(run("a", "c1", ANSWER, active(), Some("b")).is_ok());
    }
}
