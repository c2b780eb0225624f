//! What only MQTT 5 says of a published message, carried to MQTT 5 subscribers (MQTT-3.3.2-4,
//! -15 to -18, -20: the server forwards these properties unaltered), and who published it, for
//! subscriptions made with No Local (MQTT-3.8.3-3). Most messages have none: a [`Message`]
//! holds them behind one optional pointer.
//!
//! [`Message`]: super::Message

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// MQTT 5 property identifiers of the forwarded PUBLISH properties.
const PAYLOAD_FORMAT: u8 = 0x01;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const USER_PROPERTY: u8 = 0x26;
/// Not an MQTT property: the publishing connection, in the bus's own encoding.
const ORIGIN: u8 = 0xF0;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// The publishing connection's broker-side client id, when it holds a No Local
    /// subscription (set only then: no other connection could tell).
    pub origin: Option<Box<str>>,
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl Extras {
    /// Whether there is nothing to carry.
    pub fn is_empty(&self) -> bool {
        *self == Extras::default()
    }

    /// The bytes [`Extras::decode`] reads back: each field as an identifier and its value
    /// (strings and binary data with a u16 length, as MQTT writes them).
    pub fn encode(&self, out: &mut BytesMut) {
        let text = |out: &mut BytesMut, id: u8, value: &[u8]| {
            let value = &value[..value.len().min(u16::MAX as usize)];
            out.put_u8(id);
            out.put_u16(value.len() as u16);
            out.put_slice(value);
        };
        if let Some(origin) = &self.origin {
            text(out, ORIGIN, origin.as_bytes());
        }
        if let Some(format) = self.payload_format_indicator {
            out.put_u8(PAYLOAD_FORMAT);
            out.put_u8(format);
        }
        if let Some(content_type) = &self.content_type {
            text(out, CONTENT_TYPE, content_type.as_bytes());
        }
        if let Some(topic) = &self.response_topic {
            text(out, RESPONSE_TOPIC, topic.as_bytes());
        }
        if let Some(data) = &self.correlation_data {
            text(out, CORRELATION_DATA, data);
        }
        for (key, value) in &self.user_properties {
            text(out, USER_PROPERTY, key.as_bytes());
            out.put_u16(value.len().min(u16::MAX as usize) as u16);
            out.put_slice(&value.as_bytes()[..value.len().min(u16::MAX as usize)]);
        }
    }

    /// Reads what [`Extras::encode`] wrote; `None` if it is not that.
    pub fn decode(mut raw: Bytes) -> Option<Extras> {
        fn field(raw: &mut Bytes) -> Option<Bytes> {
            let len = usize::from(u16::from_be_bytes(raw.get(..2)?.try_into().ok()?));
            raw.get(2..2 + len)?;
            raw.advance(2);
            Some(raw.split_to(len))
        }
        let text = |raw: &mut Bytes| String::from_utf8(field(raw)?.to_vec()).ok();
        let mut extras = Extras::default();
        while let Some(&id) = raw.first() {
            raw.advance(1);
            match id {
                ORIGIN => extras.origin = Some(text(&mut raw)?.into()),
                PAYLOAD_FORMAT => {
                    extras.payload_format_indicator = Some(*raw.first()?);
                    raw.advance(1);
                }
                CONTENT_TYPE => extras.content_type = Some(text(&mut raw)?),
                RESPONSE_TOPIC => extras.response_topic = Some(text(&mut raw)?),
                CORRELATION_DATA => extras.correlation_data = Some(field(&mut raw)?),
                USER_PROPERTY => {
                    let key = text(&mut raw)?;
                    extras.user_properties.push((key, text(&mut raw)?));
                }
                _ => return None,
            }
        }
        Some(extras)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_truncation() {
        let extras = Extras {
            origin: Some("alice.phone".into()),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("chat/c2".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        };
        let mut out = BytesMut::new();
        extras.encode(&mut out);
        let raw = out.freeze();
        assert_eq!(Extras::decode(raw.clone()), Some(extras));
        for cut in 1..raw.len() {
            let cut = Extras::decode(raw.slice(..cut));
            assert!(cut.is_none() || cut.is_some_and(|e| !e.is_empty()));
        }
        assert!(Extras::decode(Bytes::from_static(b"\x7f")).is_none());
        assert_eq!(Extras::decode(Bytes::new()), Some(Extras::default()));
    }
}
