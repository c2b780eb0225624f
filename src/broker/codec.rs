//! MQTT 3.1.1 framing for the client-facing listeners, on rumqttc's packet codec (MQTT 5 is
//! turned into it and back in [`super::v5`]).

use bytes::BytesMut;

use super::v5::{Ending, Malformed};
pub(crate) use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
pub(crate) use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1.1
    V4,
    /// MQTT 5
    V5,
}

/// Decodes the next whole packet from `buf`, or `None` if more bytes are needed.
pub(crate) fn decode(buf: &mut BytesMut, max_size: usize) -> Result<Option<Packet>, CodecError> {
    match Packet::read(buf, max_size) {
        Ok(packet) => Ok(Some(packet)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a fixed header's first byte has the flags its packet type must have (MQTT-2.2.2-1
/// and -2 for 3.1.1, MQTT 5 section 2.1.3: PUBLISH's are its own, PUBREL, SUBSCRIBE and
/// UNSUBSCRIBE carry 0010, every other type 0000). A packet that breaks it closes the
/// connection.
pub(crate) fn flags_valid(first: u8) -> bool {
    match first >> 4 {
        3 => first & 0b0110 != 0b0110, // PUBLISH: any but QoS 3
        6 | 8 | 10 => first & 0x0f == 0b0010,
        _ => first & 0x0f == 0,
    }
}

/// [`decode`] for a 3.1.1 session, refusing what the specification says to close on that
/// the codec lets through: wrong fixed-header flags, reserved bits of a SUBSCRIBE's options.
pub(crate) fn decode_checked(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, Malformed> {
    if let Some(&first) = buf.first() {
        if !flags_valid(first) {
            let why = format!("invalid fixed-header flags {first:#04x}");
            return Err(Malformed::packet(why));
        }
    }
    if let Some(len) = packet_len(buf).filter(|len| *len <= buf.len()) {
        check_subscribe_options(&buf[..len], false)?;
    }
    decode(buf, max).map_err(|e| Malformed::packet(e.to_string()))
}

/// What both versions close on in a packet the codecs read (as 3.1.1 packets): a packet id of
/// 0 in SUBSCRIBE or UNSUBSCRIBE (MQTT-2.3.1-1), an UNSUBSCRIBE with no filter
/// (MQTT-3.10.3-2), a topic name that is empty (MQTT-4.7.3-1) or has a wildcard
/// (MQTT-3.3.2-2; MQTT 5: 0x90), and a null character in a topic or filter (MQTT-1.5.3-2).
pub(crate) fn check(packet: &Packet) -> Result<(), Malformed> {
    let null = |text: &str| text.contains('\0');
    match packet {
        Packet::Publish(p) => {
            let topic = p.topic.as_str();
            if topic.is_empty() {
                return Err(Malformed::protocol("an empty topic name"));
            }
            if null(topic) {
                return Err(Malformed::packet("a null character in the topic name"));
            }
            if topic.contains(['+', '#']) {
                return Err(Malformed::with(
                    Ending::TopicNameInvalid,
                    "a wildcard in the topic name",
                ));
            }
        }
        Packet::Subscribe(s) => {
            if s.pkid == 0 {
                return Err(Malformed::packet("SUBSCRIBE with packet id 0"));
            }
            if s.filters.iter().any(|f| null(&f.path)) {
                return Err(Malformed::packet("a null character in a topic filter"));
            }
        }
        Packet::Unsubscribe(u) => {
            if u.pkid == 0 {
                return Err(Malformed::packet("UNSUBSCRIBE with packet id 0"));
            }
            if u.topics.is_empty() {
                return Err(Malformed::protocol("UNSUBSCRIBE with no topic filter"));
            }
            if u.topics.iter().any(|f| null(f)) {
                return Err(Malformed::packet("a null character in a topic filter"));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The reserved bits of a whole SUBSCRIBE's options, which the codecs ignore: 3.1.1 allows
/// only the QoS bits (MQTT-3.8.3-4), MQTT 5 not bits 6 and 7 (MQTT-3.8.3-5) nor Retain
/// Handling 3 (a protocol error). Anything else wrong with the packet is left to the codec.
pub(crate) fn check_subscribe_options(packet: &[u8], v5: bool) -> Result<(), Malformed> {
    if packet.first() != Some(&0x82) {
        return Ok(());
    }
    let mut at = 1
        + packet[1..]
            .iter()
            .take(4)
            .take_while(|b| *b & 0x80 != 0)
            .count()
        + 1;
    at += 2; // packet id
    if v5 {
        let (props, used) = varint(packet.get(at..).unwrap_or_default());
        at += used + props;
    }
    while let Some(len) = packet.get(at..at + 2) {
        at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(&options) = packet.get(at) else {
            break;
        };
        at += 1;
        if !v5 && options & 0xFC != 0 {
            return Err(Malformed::packet("reserved bits in a requested QoS"));
        }
        if v5 && options & 0xC0 != 0 {
            return Err(Malformed::packet("reserved bits in subscription options"));
        }
        if v5 && (options >> 4) & 0b11 == 3 {
            return Err(Malformed::protocol("Retain Handling 3"));
        }
    }
    Ok(())
}

/// A variable byte integer at the start of `bytes`: its value and length (0 and 0 if it is not
/// all there).
fn varint(bytes: &[u8]) -> (usize, usize) {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    (0, 0)
}

/// Whether a CONNECT's fixed header and flags byte are valid: the fixed-header flags are 0
/// (MQTT-2.2.2-2), the reserved flag is 0 (MQTT-3.1.2-3), and without a Will Flag the Will
/// QoS and Will Retain are 0 (3.1.1: MQTT-3.1.2-13, -15; MQTT 5: -11, -13), with one not 3.
/// (A 3.1.1 password without a user name, MQTT-3.1.2-22, is taken on purpose: the token is the
/// whole credential, rumqttc sends it that way when the user name is empty, and MQTT 5
/// dropped the rule.)
pub(crate) fn connect_header_valid(buf: &[u8]) -> bool {
    match connect_flags(buf) {
        Some(flags) => {
            let will_bits = flags & 0x38;
            let will_ok = match flags & WILL_FLAG {
                0 => will_bits == 0,
                _ => will_bits & 0x18 != 0x18,
            };
            buf[0] == 0x10 && flags & 0x01 == 0 && will_ok
        }
        None => true, // not in yet
    }
}

/// Whether a whole CONNECT's fields, as its flags declare them, end where the packet does: a
/// user name or password the flags do not declare makes it longer (MQTT-3.1.2-18, -20; MQTT
/// 5: -16, -18), which the codecs do not notice. `None` if it cannot be walked (the codec
/// refuses it then).
pub(crate) fn connect_fields_fill_it(packet: &[u8]) -> Option<bool> {
    let level_at = connect_level_at(packet)?;
    let flags = *packet.get(level_at + 1)?;
    let mut at = level_at + 4; // level, flags, keep alive
    let field = |at: usize| -> Option<usize> {
        let len = packet.get(at..at + 2)?;
        Some(at + 2 + usize::from(u16::from_be_bytes([len[0], len[1]])))
    };
    let v5 = packet[level_at] == 5;
    if v5 {
        let (len, used) = varint(packet.get(at..)?);
        at += used + len;
    }
    at = field(at)?; // client id
    if flags & WILL_FLAG != 0 {
        if v5 {
            let (len, used) = varint(packet.get(at..)?);
            at += used + len;
        }
        at = field(field(at)?)?;
    }
    if flags & 0x80 != 0 {
        at = field(at)?;
    }
    if flags & 0x40 != 0 {
        at = field(at)?;
    }
    Some(at == packet.len())
}

/// Appends a packet's bytes to `out`.
pub(crate) fn encode(packet: Packet, out: &mut BytesMut) {
    // Every packet we write is either small or a publish that was already accepted under the
    // payload limit; usize::MAX turns off the codec's outgoing size check.
    if let Err(e) = packet.write(out, usize::MAX) {
        tracing::warn!(error = %e, "could not encode an outgoing packet");
    }
}

/// The whole length of the packet starting at `buf[0]` (fixed header included), once its
/// remaining-length varint is complete.
pub(crate) fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + (i + 1) + remaining);
        }
    }
    None
}

/// The protocol level of a CONNECT at the start of `buf`, read before full parsing so that an
/// unsupported level (MQTT 3.1 is 3, MQTT 5 is 5) gets CONNACK "unacceptable protocol version"
/// rather than a dropped socket.
pub(crate) fn connect_protocol_level(buf: &[u8]) -> Option<u8> {
    buf.get(connect_level_at(buf)?).copied()
}

/// Where a CONNECT's protocol level byte sits in `buf`, once the protocol name's length is in.
fn connect_level_at(buf: &[u8]) -> Option<usize> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    // Skip the remaining-length varint (1 to 4 bytes).
    let mut pos = 1;
    loop {
        let byte = *buf.get(pos)?;
        pos += 1;
        if byte & 0x80 == 0 || pos > 4 {
            break;
        }
    }
    let name_len = u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]) as usize;
    Some(pos + 2 + name_len)
}

/// The Will Flag of a CONNECT's flags byte.
pub(crate) const WILL_FLAG: u8 = 0x04;

/// The flags byte of a CONNECT at the start of `buf` (it follows the protocol level).
pub(crate) fn connect_flags(buf: &[u8]) -> Option<u8> {
    let level_at = connect_level_at(buf)?;
    buf.get(level_at + 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_protocol_level() {
        // CONNECT, remaining length 12, "MQTT", level 4.
        let v4 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        assert_eq!(connect_protocol_level(&v4), Some(4));
        let v31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60,
        ];
        assert_eq!(connect_protocol_level(&v31), Some(3));
        assert_eq!(connect_protocol_level(&[0x30, 0]), None);
        assert_eq!(connect_protocol_level(&[0x10]), None);
        assert_eq!(connect_flags(&v4), Some(2));
        assert_eq!(connect_flags(&v4[..9]), None);
    }

    #[test]
    fn knows_each_packet_types_flags() {
        assert!(flags_valid(0x30) && flags_valid(0x3b) && !flags_valid(0x36));
        assert!(flags_valid(0x82) && !flags_valid(0x80) && !flags_valid(0x83));
        assert!(flags_valid(0xa2) && flags_valid(0x62) && !flags_valid(0x60));
        assert!(flags_valid(0xc0) && !flags_valid(0xc1) && !flags_valid(0xe2));
        let v4 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
        assert!(connect_header_valid(&v4) && connect_header_valid(&v4[..9]));
        let mut bad = v4;
        bad[9] = 0x03; // the reserved flag
        assert!(!connect_header_valid(&bad));
        let mut flagged = v4;
        flagged[0] = 0x12;
        assert!(!connect_header_valid(&flagged));
    }

    #[test]
    fn reads_packet_lengths() {
        assert_eq!(packet_len(&[0x10, 12]), Some(14));
        assert_eq!(packet_len(&[0x10, 0x80, 0x01]), Some(3 + 128));
        assert_eq!(packet_len(&[0x10, 0x80]), None);
        assert_eq!(packet_len(&[0x10]), None);
    }

    #[test]
    fn decodes_across_partial_reads() {
        let mut out = BytesMut::new();
        encode(Packet::PingReq, &mut out);
        let mut partial = BytesMut::from(&out[..1]);
        assert!(matches!(decode(&mut partial, 1024), Ok(None)));
        partial.extend_from_slice(&out[1..]);
        assert!(matches!(
            decode(&mut partial, 1024),
            Ok(Some(Packet::PingReq))
        ));
    }
}
