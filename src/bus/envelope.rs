//! How a [`Message`]'s routing facts travel through a bus that carries only topic and payload
//! (rumqttd): a small header in front of the payload, added by the bus on publish and removed
//! before delivery, so clients never see it.
//!
//! Layout: `seq` (u64, big endian), the event-log sequence (u64; 0 = none), the expiry (u64
//! Unix ms; 0 = none), the audience as a count (u8, at most 127; 0 = every subscriber) of
//! length-prefixed (u8) user ids, then the payload. The count's high bit says that the
//! message's [`Extras`] come after the user ids, with their length (u32): a message without
//! them is written as before they existed. A bus whose own topics must not be the message's (the
//! embedded router keeps state per topic it ever saw) puts the topic first, after its length
//! (u16): [`encode_routed`], [`decode_routed`].

use bytes::{BufMut, Bytes, BytesMut};

use super::{Audience, Extras, Message};

/// The audience count's bit that says [`Extras`] follow.
const HAS_EXTRAS: u8 = 0x80;

/// What a decoded envelope holds besides the message.
pub(super) struct Decoded {
    pub seq: u64,
    pub message: Message,
}

/// Header size for `audience` (for accounting; extras, rare, are not counted).
pub(super) fn header_len(audience: &Audience) -> usize {
    25 + match audience {
        Audience::Subscribers => 0,
        Audience::Users(users) => users.iter().map(|u| 1 + u.len()).sum(),
    }
}

/// The payload with its header. User ids are at most 64 bytes and an audience at most 255
/// users (callers name two); longer ones are refused by [`Message`]'s builders' callers.
pub(super) fn encode(seq: u64, message: &Message) -> Bytes {
    let (audience, payload) = (&message.audience, &message.payload);
    let mut out = BytesMut::with_capacity(header_len(audience) + payload.len());
    write(&mut out, seq, message);
    out.freeze()
}

/// Like [`encode`], with the topic in front (topics are at most 65,535 bytes in MQTT).
pub(super) fn encode_routed(seq: u64, message: &Message) -> Bytes {
    let (audience, payload, topic) = (&message.audience, &message.payload, &message.topic);
    let len = 2 + topic.len() + header_len(audience) + payload.len();
    let mut out = BytesMut::with_capacity(len);
    let topic = &topic[..topic.len().min(u16::MAX as usize)];
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    write(&mut out, seq, message);
    out.freeze()
}

/// Reads what [`encode_routed`] wrote.
pub(super) fn decode_routed(mut raw: Bytes) -> Option<Decoded> {
    let len = u16::from_be_bytes(raw.get(..2)?.try_into().ok()?) as usize;
    let rest = raw.split_off(2);
    let topic = rest.get(..len).map(|_| rest.slice(..len))?;
    decode(topic, rest.slice(len..))
}

fn write(out: &mut BytesMut, seq: u64, message: &Message) {
    let (audience, payload) = (&message.audience, &message.payload);
    out.put_u64(seq);
    out.put_u64(message.event.unwrap_or(0));
    out.put_u64(message.expires_at_ms.unwrap_or(0));
    let flag = match message.extras {
        Some(_) => HAS_EXTRAS,
        None => 0,
    };
    match audience {
        Audience::Subscribers => out.put_u8(flag),
        Audience::Users(users) => {
            let users = &users[..users.len().min(127)];
            out.put_u8(users.len() as u8 | flag);
            for user in users {
                let id = &user.as_bytes()[..user.len().min(255)];
                out.put_u8(id.len() as u8);
                out.put_slice(id);
            }
        }
    }
    if let Some(extras) = &message.extras {
        let at = out.len();
        out.put_u32(0);
        extras.encode(out);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    out.put_slice(payload);
}

/// Splits a delivered payload into its header and the message. `None` if it carries no valid
/// header (nothing but callbus publishes on the embedded router, so that is a bug).
pub(super) fn decode(topic: Bytes, mut raw: Bytes) -> Option<Decoded> {
    let seq = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let event = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
    let expires = u64::from_be_bytes(raw.get(16..24)?.try_into().ok()?);
    let (count, has_extras) = raw
        .get(24)
        .map(|c| (c & !HAS_EXTRAS, c & HAS_EXTRAS != 0))?;
    let mut pos = 25;
    let audience = if count == 0 {
        Audience::Subscribers
    } else {
        let mut users = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = *raw.get(pos)? as usize;
            let id = raw.get(pos + 1..pos + 1 + len)?;
            users.push(String::from_utf8(id.to_vec()).ok()?);
            pos += 1 + len;
        }
        Audience::Users(users.into())
    };
    let extras = match has_extras {
        true => {
            let len = u32::from_be_bytes(raw.get(pos..pos + 4)?.try_into().ok()?) as usize;
            let bytes = raw
                .get(pos + 4..pos + 4 + len)
                .map(|_| raw.slice(pos + 4..pos + 4 + len))?;
            pos += 4 + len;
            Some(std::sync::Arc::new(Extras::decode(bytes)?))
        }
        false => None,
    };
    let payload = raw.split_off(pos);
    Some(Decoded {
        seq,
        message: Message {
            topic,
            payload,
            audience,
            event: (event != 0).then_some(event),
            expires_at_ms: (expires != 0).then_some(expires),
            extras,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let users = Audience::Users(vec!["a".to_owned(), "bob-7".to_owned()].into());
        let extras = Extras {
            origin: Some("a.phone".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Extras::default()
        };
        let cases = [
            (Audience::Subscribers, None, None, None),
            (users, Some(9), Some(1_700), None),
            (Audience::Subscribers, None, None, Some(extras.into())),
        ];
        for (audience, event, expires_at_ms, extras) in cases {
            let with_extras = extras.is_some();
            let message = Message {
                audience: audience.clone(),
                event,
                expires_at_ms,
                extras,
                ..Message::new("chat/1", &b"{\"x\":1}"[..])
            };
            let raw = encode(42, &message);
            if !with_extras {
                assert_eq!(raw.len(), header_len(&audience) + 7);
            }
            let d = decode(Bytes::from_static(b"chat/1"), raw).unwrap();
            assert_eq!(d.seq, 42);
            assert_eq!(d.message, message);
        }
    }

    #[test]
    fn routed_round_trips_and_refuses_truncation() {
        let message = Message::to_users("$SYS/broker/uptime", &b"12"[..], &["abc"]);
        let raw = encode_routed(7, &message);
        let d = decode_routed(raw.clone()).unwrap();
        assert_eq!((d.seq, d.message), (7, message));
        for cut in 0..raw.len() - 2 {
            assert!(decode_routed(raw.slice(..cut)).is_none(), "{cut}");
        }
    }

    #[test]
    fn refuses_truncated_headers() {
        let message = Message::to_users("chat/1", &b""[..], &["abc"]);
        let raw = encode(1, &message);
        for cut in 0..raw.len() {
            assert!(decode(Bytes::new(), raw.slice(..cut)).is_none(), "{cut}");
        }
    }
}
