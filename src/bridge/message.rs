//! Chat payloads and the events callbus publishes (DESIGN "Messages"). Clients' JSON is checked
//! and stamped with the sender's identity from the token: whatever sender fields a client sent are
//! overwritten, so nobody can speak as someone else.
//!
//! A payload is read without building a tree: each field's value stays the client's JSON text,
//! and what callbus publishes is written around that text. An SDP of a few kilobytes is so
//! checked once and copied, never decoded into a string and escaped again.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::time::SystemTime;

use crate::auth::Identity;
use crate::ids::{new_message_id, now_rfc3339, write_message_id, write_rfc3339_millis};

/// Client-sent fields that claim an identity; always replaced or removed.
const IDENTITY_FIELDS: [&str; 5] = [
    "sender_id",
    "sender_username",
    "caller_id",
    "caller_username",
    "receiver_id",
];

/// A chat payload that passed validation, borrowed from the payload.
#[derive(Debug)]
pub struct ChatMessage<'a> {
    /// The `type` field, e.g. `message`, `typing`, `call.offer`.
    pub kind: Cow<'a, str>,
    /// Every field as sent, in order, each value as its JSON text. Of a name given twice the
    /// last counts (as in JavaScript's `JSON.parse`).
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> ChatMessage<'a> {
    /// Whether this is call signaling (`call.*`), which the signaling bridge handles.
    pub fn is_signaling(&self) -> bool {
        self.kind.starts_with("call.")
    }

    /// The JSON text of field `name` (its last value).
    pub fn field(&self, name: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// The fields in order, without those a later field of the same name overrides.
    fn last_of_each(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        let n = self.fields.len();
        // Past a few fields, a map of last positions (a payload may hold thousands).
        let last: Option<std::collections::HashMap<&str, usize>> = (n > 16).then(|| {
            let pairs = self.fields.iter().enumerate();
            pairs.map(|(i, (k, _))| (k.as_ref(), i)).collect()
        });
        self.fields
            .iter()
            .enumerate()
            .filter(move |(i, (k, _))| match &last {
                Some(last) => last.get(k.as_ref()) == Some(i),
                None => !self.fields[i + 1..].iter().any(|(later, _)| later == k),
            })
            .map(|(_, (k, v))| (k.as_ref(), *v))
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

/// A JSON string, borrowed when it has no escapes.
#[derive(serde::Deserialize)]
pub(super) struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// A JSON object's fields, values as JSON text.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Text(key)) = map.next_key()? {
                    fields.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Object)
    }
}

/// Parses a client's chat payload: a JSON object with a string `type`.
pub fn parse_chat(payload: &[u8]) -> Result<ChatMessage<'_>, BadPayload> {
    let Fields(fields) = serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => BadPayload::NotObject,
        _ => BadPayload::NotJson,
    })?;
    let mut msg = ChatMessage {
        kind: Cow::Borrowed(""),
        fields,
    };
    msg.kind = match msg.field("type").map(|t| serde_json::from_str(t.get())) {
        Some(Ok(Text(t))) if !t.is_empty() => t,
        _ => return Err(BadPayload::NoType),
    };
    Ok(msg)
}

/// A JSON object written field by field (values given as text or as JSON text).
pub(super) struct JsonObject {
    out: Vec<u8>,
}

impl JsonObject {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        Self { out }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(b',');
        }
        self.string(key);
        self.out.push(b':');
    }

    fn string(&mut self, s: &str) {
        // Most texts (ids, names, keys, times) have nothing JSON escapes: `"`, `\` and the
        // control characters.
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.out.reserve(s.len() + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(s.as_bytes());
            self.out.push(b'"');
        } else {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut self.out, s);
        }
    }

    /// A string field.
    pub(super) fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string(value);
    }

    /// A string field, or null.
    pub(super) fn text_or_null(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.text(key, value),
            None => self.raw(key, "null"),
        }
    }

    /// A field whose value is already JSON text.
    pub(super) fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.out.extend_from_slice(json.as_bytes());
    }

    /// The `id` (fresh) and `ts` (now) fields every relayed message carries.
    /// Both are written in place: neither has anything to escape.
    pub(super) fn id_and_ts(&mut self) {
        self.key("id");
        self.out.push(b'"');
        write_message_id(&mut self.out);
        self.out.extend_from_slice(b"\",\"ts\":\"");
        write_rfc3339_millis(&mut self.out, SystemTime::now());
        self.out.push(b'"');
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.out.push(b'}');
        self.out
    }
}

/// Stamps a relayed chat message with the sender's identity, a fresh `id` and `ts`.
pub fn stamp(msg: &ChatMessage<'_>, sender: &Identity) -> Vec<u8> {
    let size = msg.fields.iter().map(|(k, v)| k.len() + v.get().len() + 4);
    let mut out = JsonObject::with_capacity(size.sum::<usize>() + 160);
    for (key, value) in msg.last_of_each() {
        if !IDENTITY_FIELDS.contains(&key) && key != "id" && key != "ts" {
            out.raw(key, value.get());
        }
    }
    out.text("sender_id", sender.user_id());
    out.text("sender_username", sender.username());
    out.id_and_ts();
    out.finish()
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
        Identity::new("m", "mallory", "", "", Role::User)
    }

    #[test]
    fn texts_are_written_as_serde_json_writes_them() {
        let texts = [
            "plain",
            "",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}",
            "tab\t",
            "nl\n",
            "del\u{7f}",
            "ünïcødé",
            "emoji 🎉",
            "</script>",
            "\u{2028}",
        ];
        for text in texts {
            let mut out = JsonObject::with_capacity(0);
            out.text(text, text);
            let written = String::from_utf8(out.finish()).unwrap();
            let expected = serde_json::json!({ text: text }).to_string();
            assert_eq!(written, expected, "{text:?}");
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
        assert_eq!(parse_chat(b"not json").err(), Some(BadPayload::NotJson));
        assert_eq!(parse_chat(b"[1,2]").err(), Some(BadPayload::NotObject));
        assert_eq!(
            parse_chat(br#"{"text":"x"}"#).err(),
            Some(BadPayload::NoType)
        );
        assert_eq!(parse_chat(br#"{"type":7}"#).err(), Some(BadPayload::NoType));
        assert_eq!(parse_chat(b"\xff\xfe").err(), Some(BadPayload::NotJson));
    }

    #[test]
    fn stamping_overwrites_claimed_identity() {
        let msg = parse_chat(
            br#"{"type":"message","text":"hi","sender_id":"alice","sender_username":"Alice","id":"x","caller_id":"alice"}"#,
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&stamp(&msg, &mallory())).unwrap();
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

    #[test]
    fn stamping_copies_fields_as_sent_and_keeps_the_last_of_a_repeated_name() {
        let msg = parse_chat(
            br#"{"type":"message","text":"a\r\n\u00e9 \"q\"","n":[1, {"x":null}],"text":"last","sender_id":"alice","sender_id":"bob"}"#,
        )
        .unwrap();
        let out = stamp(&msg, &mallory());
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["text"], "last");
        assert_eq!(v["n"], json!([1, {"x": null}]));
        assert_eq!(v["sender_id"], "m");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("\"text\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"sender_id\"").count(), 1, "{text}");
        // Many fields of one name (the map path): still one, the last.
        let mut many = String::from(r#"{"type":"message""#);
        for i in 0..40 {
            many.push_str(&format!(r#","k":{i}"#));
        }
        many.push('}');
        let v: Value =
            serde_json::from_slice(&stamp(&parse_chat(many.as_bytes()).unwrap(), &mallory()))
                .unwrap();
        assert_eq!(v["k"], 39);
    }

    #[test]
    fn the_type_may_be_escaped_and_an_escaped_key_is_one_key() {
        let msg = parse_chat(br#"{"t\u0079pe":"call.\u006fffer"}"#).unwrap();
        assert_eq!(msg.kind, "call.offer");
        assert!(msg.is_signaling());
    }
}
