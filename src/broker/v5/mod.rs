//! MQTT 5 on the same listeners as 3.1.1. A v5 session's packets are read with rumqttc's v5
//! codec and turned into their 3.1.1 counterparts, so the session's logic is one for both;
//! what only v5 can say (reason codes, CONNACK properties, a server's DISCONNECT) is written
//! by [`Answer`]. What else a v5 packet says comes beside it as an [`Extra`]: a PUBLISH's
//! expiry and the properties that travel on to v5 subscribers (`crate::bus::Extras`), a
//! SUBSCRIBE's No Local filters, a DISCONNECT's reason and Session Expiry Interval. Other
//! properties are dropped on the way in. What callbus does not offer ends the session with
//! the reason MQTT 5 gives it ([`Malformed`] carries it): a topic alias (Topic Alias Maximum
//! 0: 0x94), a Subscription Identifier (0xA1 in SUBSCRIBE, a protocol error in PUBLISH), QoS
//! 2 (0x9B), AUTH (a protocol error).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5 as wire;
use rumqttc::v5::mqttbytes::QoS as WireQoS;

use super::codec::QoS;

mod answer;
pub(crate) use answer::{
    answer, connack_properties, Answer, Ending, Granted, PublishRefused, Refused,
};

/// A packet that cannot be read, or that a client may not send: why, and the DISCONNECT
/// reason a v5 client is told (a 3.1.1 connection is just closed).
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub(crate) struct Malformed {
    pub why: String,
    pub ending: Ending,
}

impl Malformed {
    /// A packet that cannot be read (0x81).
    pub(crate) fn packet(why: impl Into<String>) -> Self {
        Self::with(Ending::Malformed, why)
    }

    /// A packet that reads but may not be sent (0x82).
    pub(crate) fn protocol(why: impl Into<String>) -> Self {
        Self::with(Ending::Protocol, why)
    }

    pub(crate) fn with(ending: Ending, why: impl Into<String>) -> Self {
        Self {
            why: why.into(),
            ending,
        }
    }
}

fn qos_in(q: WireQoS) -> QoS {
    match q {
        WireQoS::AtMostOnce => QoS::AtMostOnce,
        WireQoS::AtLeastOnce => QoS::AtLeastOnce,
        WireQoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

pub(super) fn qos_out(q: QoS) -> WireQoS {
    match q {
        QoS::AtMostOnce => WireQoS::AtMostOnce,
        QoS::AtLeastOnce => WireQoS::AtLeastOnce,
        QoS::ExactlyOnce => WireQoS::ExactlyOnce,
    }
}

/// A v5 CONNECT, as admission needs it.
pub(crate) struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub login: Option<(String, String)>,
    pub will: Option<(String, Bytes, bool)>,
    /// The Will's Delay Interval (seconds), Message Expiry Interval and the properties that
    /// go on with it.
    pub will_delay: u32,
    pub will_expiry: Option<u32>,
    pub will_extras: Option<std::sync::Arc<crate::bus::Extras>>,
    /// Seconds; 0 (or absent) ends the session with the connection.
    pub session_expiry: u32,
    /// The largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// How many QoS 1 messages the client takes unacknowledged at once.
    pub receive_max: Option<u16>,
    /// Request Problem Information: whether Reason Strings may be sent (MQTT-3.1.2-29).
    pub problem_info: bool,
    /// An Authentication Method: enhanced authentication, which callbus does not offer.
    pub auth_method: bool,
    /// The Will's QoS.
    pub will_qos: QoS,
}

/// Reads a v5 CONNECT (the first packet of a v5 connection).
pub(crate) fn read_connect(buf: &mut BytesMut, max: usize) -> Result<Option<Connect>, Malformed> {
    match wire::Packet::read(buf, Some(max as u32)) {
        Ok(wire::Packet::Connect(connect, will, login)) => {
            let props = connect.properties.unwrap_or_default();
            let will_props = will.as_ref().and_then(|w| w.properties.clone());
            let will_qos = will.as_ref().map_or(QoS::AtMostOnce, |w| qos_in(w.qos));
            let will = match will {
                Some(w) => Some((topic_text(w.topic)?, w.message, w.retain)),
                None => None,
            };
            let will_delay = will_props.as_ref().and_then(|p| p.delay_interval);
            let will_expiry = will_props.as_ref().and_then(|p| p.message_expiry_interval);
            let will_extras = will_props.map(|p| crate::bus::Extras {
                origin: None,
                payload_format_indicator: p.payload_format_indicator,
                content_type: p.content_type,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
            });
            Ok(Some(Connect {
                client_id: connect.client_id,
                clean_start: connect.clean_start,
                keep_alive: connect.keep_alive,
                login: login.map(|l| (l.username, l.password)),
                will,
                will_delay: will_delay.unwrap_or(0),
                will_expiry,
                will_extras: will_extras.filter(|e| !e.is_empty()).map(Into::into),
                session_expiry: props.session_expiry_interval.unwrap_or(0),
                max_packet_size: props.max_packet_size,
                receive_max: props.receive_maximum,
                problem_info: props.request_problem_info != Some(0),
                auth_method: props.authentication_method.is_some(),
                will_qos,
            }))
        }
        Ok(_) => Err(Malformed::protocol("first packet is not CONNECT")),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(Malformed::packet(e.to_string())),
    }
}

fn topic_text(topic: Bytes) -> Result<String, Malformed> {
    String::from_utf8(topic.to_vec()).map_err(|_| Malformed::packet("topic is not UTF-8"))
}

/// What a client's PUBLISH may not carry: a Topic Alias (Topic Alias Maximum is 0: 0x94), a
/// Subscription Identifier (MQTT-3.3.4-6) or a Response Topic with wildcards
/// (MQTT-3.3.2-14).
fn check_publish_properties(props: &wire::PublishProperties) -> Result<(), Malformed> {
    if props.topic_alias.is_some() {
        let why = "topic alias (Topic Alias Maximum is 0)";
        return Err(Malformed::with(Ending::TopicAliasInvalid, why));
    }
    if !props.subscription_identifiers.is_empty() {
        return Err(Malformed::protocol("a subscription identifier in PUBLISH"));
    }
    if (props.response_topic.as_deref()).is_some_and(|t| t.contains(['+', '#'])) {
        return Err(Malformed::protocol("a wildcard in the Response Topic"));
    }
    Ok(())
}

/// What a v5 packet says beside its 3.1.1 counterpart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Extra {
    /// A PUBLISH's Message Expiry Interval (seconds).
    pub message_expiry: Option<u32>,
    /// A PUBLISH's properties that go on to v5 subscribers (none: `None`).
    pub properties: Option<std::sync::Arc<crate::bus::Extras>>,
    /// A SUBSCRIBE's filters with No Local.
    pub no_local: Vec<String>,
    /// A DISCONNECT's reason was 0x04: the client asks for its Will to be published.
    pub with_will: bool,
    /// A DISCONNECT's Session Expiry Interval (seconds), replacing the CONNECT's.
    pub session_expiry: Option<u32>,
}

/// A DISCONNECT of remaining length 0 or 1 (reason 0x00 implied, or a reason and no
/// properties: MQTT-3.14.2.1), which rumqttc's reader refuses or waits on.
fn short_disconnect(buf: &mut BytesMut) -> Option<Extra> {
    let with_will = match &buf[..] {
        [0xE0, 0, ..] => false,
        [0xE0, 1, reason, ..] => *reason == 0x04,
        _ => return None,
    };
    let len = 2 + usize::from(buf[1]);
    let _ = buf.split_to(len);
    Some(Extra {
        with_will,
        ..Extra::default()
    })
}

/// Reads the next v5 packet as its 3.1.1 counterpart, with what only v5 says ([`Extra`]), or
/// `None` if more bytes are needed.
pub(crate) fn decode(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(v4::Packet, Extra)>, Malformed> {
    if let Some(&first) = buf.first() {
        if !super::codec::flags_valid(first) {
            let why = format!("invalid fixed-header flags {first:#04x}");
            return Err(Malformed::packet(why));
        }
        if first >> 4 == 15 {
            return Err(Malformed::protocol("AUTH, and no enhanced authentication"));
        }
    }
    if let Some(extra) = short_disconnect(buf) {
        return Ok(Some((v4::Packet::Disconnect, extra)));
    }
    if let Some(len) = super::codec::packet_len(buf).filter(|len| *len <= buf.len()) {
        super::codec::check_subscribe_options(&buf[..len], true)?;
    }
    let packet = match wire::Packet::read(buf, Some(max as u32)) {
        Ok(packet) => packet,
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e @ rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. }) => {
            return Err(Malformed::with(Ending::TooLarge, e.to_string()))
        }
        Err(e) => return Err(Malformed::packet(e.to_string())),
    };
    let mut extra = Extra::default();
    let packet = match packet {
        wire::Packet::Publish(p) => {
            if let Some(props) = &p.properties {
                check_publish_properties(props)?;
            }
            // CONNACK said Maximum QoS 1 (MQTT 5 section 3.3.1.2: DISCONNECT 0x9B).
            if p.qos == WireQoS::ExactlyOnce {
                return Err(Malformed::with(Ending::QosNotSupported, "QoS 2"));
            }
            if let Some(props) = p.properties {
                extra.message_expiry = props.message_expiry_interval;
                let forwarded = crate::bus::Extras {
                    origin: None,
                    payload_format_indicator: props.payload_format_indicator,
                    content_type: props.content_type,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation_data,
                    user_properties: props.user_properties,
                };
                extra.properties = (!forwarded.is_empty()).then(|| forwarded.into());
            }
            let mut publish =
                v4::Publish::from_bytes(topic_text(p.topic)?, qos_in(p.qos), p.payload);
            publish.pkid = p.pkid;
            publish.dup = p.dup;
            publish.retain = p.retain;
            v4::Packet::Publish(publish)
        }
        wire::Packet::Subscribe(s) => {
            // CONNACK said Subscription Identifiers Available 0.
            if s.properties.as_ref().is_some_and(|p| p.id.is_some()) {
                let why = "a subscription identifier";
                return Err(Malformed::with(Ending::SubscriptionIdsNotSupported, why));
            }
            let no_local = s.filters.iter().filter(|f| f.nolocal);
            extra.no_local = no_local.map(|f| f.path.clone()).collect();
            let filters = (s.filters.into_iter())
                .map(|f| v4::SubscribeFilter::new(f.path, qos_in(f.qos)))
                .collect();
            v4::Packet::Subscribe(v4::Subscribe {
                pkid: s.pkid,
                filters,
            })
        }
        wire::Packet::Unsubscribe(u) => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        }),
        wire::Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        wire::Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
        wire::Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        wire::Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        wire::Packet::PingReq(_) => v4::Packet::PingReq,
        wire::Packet::Disconnect(d) => {
            use wire::DisconnectReasonCode as D;
            extra.with_will = d.reason_code == D::DisconnectWithWillMessage;
            extra.session_expiry = d.properties.and_then(|p| p.session_expiry_interval);
            v4::Packet::Disconnect
        }
        wire::Packet::Connect(..) => {
            let login = v4::Login::new("", "");
            let connect = v4::Connect::new(String::new());
            v4::Packet::Connect(v4::Connect {
                login: Some(login),
                ..connect
            })
        }
        // AUTH (no enhanced authentication is offered) and server-only packets.
        _ => v4::Packet::PingResp,
    };
    Ok(Some((packet, extra)))
}

/// Writes a 3.1.1 packet the session made as its v5 counterpart.
pub(crate) fn encode(packet: v4::Packet, out: &mut BytesMut) {
    let packet = match packet {
        v4::Packet::Publish(p) => return encode_publish(p, None, None, out),
        v4::Packet::PubAck(a) => wire::Packet::PubAck(wire::PubAck::new(a.pkid, None)),
        v4::Packet::PubRec(a) => wire::Packet::PubRec(wire::PubRec::new(a.pkid, None)),
        v4::Packet::PubComp(a) => wire::Packet::PubComp(wire::PubComp::new(a.pkid, None)),
        v4::Packet::PingResp => wire::Packet::PingResp(wire::PingResp),
        other => {
            tracing::warn!(packet = ?other, "no v5 form for this packet");
            return;
        }
    };
    write(&packet, out);
}

/// Writes a PUBLISH with its Message Expiry Interval (seconds left) and the publisher's
/// properties.
pub(crate) fn encode_publish(
    p: v4::Publish,
    expiry: Option<u32>,
    extras: Option<&crate::bus::Extras>,
    out: &mut BytesMut,
) {
    let properties = match (expiry, extras) {
        (None, None) => None,
        (expiry, extras) => {
            let extras = extras.cloned().unwrap_or_default();
            Some(wire::PublishProperties {
                message_expiry_interval: expiry,
                payload_format_indicator: extras.payload_format_indicator,
                content_type: extras.content_type,
                response_topic: extras.response_topic,
                correlation_data: extras.correlation_data,
                user_properties: extras.user_properties,
                ..Default::default()
            })
        }
    };
    let mut publish = wire::Publish::new(p.topic, qos_out(p.qos), p.payload, properties);
    publish.pkid = p.pkid;
    publish.dup = p.dup;
    write(&wire::Packet::Publish(publish), out);
}

pub(super) fn write(packet: &wire::Packet, out: &mut BytesMut) {
    if let Err(e) = packet.write(out, None) {
        tracing::warn!(error = %e, "could not encode an outgoing v5 packet");
    }
}
