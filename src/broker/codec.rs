//! MQTT 3.1.1 framing for the client-facing listeners, on rumqttc's packet codec (MQTT 5 is
//! turned into it and back in [`super::v5`]).

use bytes::BytesMut;
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
/// the codec lets through: wrong fixed-header flags.
pub(crate) fn decode_checked(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, String> {
    if let Some(&first) = buf.first() {
        if !flags_valid(first) {
            return Err(format!("invalid fixed-header flags {first:#04x}"));
        }
    }
    decode(buf, max).map_err(|e| e.to_string())
}

/// Whether a CONNECT's fixed header and flags byte are valid: the fixed-header flags are 0
/// (MQTT-2.2.2-2) and the reserved flag is 0 (MQTT-3.1.2-3). (A 3.1.1 password without a user
/// name, MQTT-3.1.2-22, is taken on purpose: the token is the whole credential, rumqttc sends
/// it that way when the user name is empty, and MQTT 5 dropped the rule.)
pub(crate) fn connect_header_valid(buf: &[u8]) -> bool {
    match connect_flags(buf) {
        Some(flags) => buf[0] == 0x10 && flags & 0x01 == 0,
        None => true, // not in yet
    }
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
