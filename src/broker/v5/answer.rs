//! What the server says in MQTT 5 that 3.1.1 cannot: CONNACK with its reason and the limits it
//! announces, SUBACK and PUBACK reason codes, and the DISCONNECT a server sends.

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5 as wire;

use super::{qos_out, write};
use crate::broker::codec::QoS;

/// Why a v5 CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// 0x86: a bad or missing token.
    BadCredentials,
    /// 0x87: a username that is not the token's subject, or a Last Will not allowed.
    NotAuthorized,
    /// 0x85
    BadClientId,
    /// 0x89: a connection limit.
    Busy,
    /// 0x9F
    RateExceeded,
    /// 0x88: the server cannot serve it now (a stored session unreadable).
    Unavailable,
    /// 0x8C: an Authentication Method (no enhanced authentication is offered).
    BadAuthMethod,
    /// 0x9A: a Will to be retained (Retain Available is 0).
    RetainNotSupported,
    /// 0x9B: a Will above Maximum QoS.
    QosNotSupported,
}

/// A SUBSCRIBE filter's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Granted {
    Yes(QoS),
    /// 0x87
    NotAuthorized,
    /// 0x8F
    FilterInvalid,
    /// 0xA2: a user's wildcard filter (only admins may use wildcards).
    NoWildcards,
    /// 0x9E
    NoSharedSubscriptions,
    /// 0x97: past the connection's subscription limit.
    Quota,
}

/// Why a PUBLISH was refused (PUBACK reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishRefused {
    /// 0x87 (a malformed topic too: the ACL refuses it)
    NotAuthorized,
    /// 0x99
    PayloadInvalid,
    /// 0x83: a rule of callbus's own (call state, retained messages).
    Rule,
}

/// Why callbus ends a session (DISCONNECT reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    TakenOver,
    ShuttingDown,
    RateTooHigh,
    Quota,
    KeepAlive,
    Malformed,
    TooLarge,
    Protocol,
    Unavailable,
    QosNotSupported,
    TopicNameInvalid,
    TopicAliasInvalid,
    SubscriptionIdsNotSupported,
}

/// What the server says in v5 that 3.1.1 cannot.
pub(crate) enum Answer {
    ConnAck {
        present: bool,
        refused: Option<Refused>,
        properties: Option<wire::ConnAckProperties>,
    },
    SubAck {
        pkid: u16,
        granted: Vec<Granted>,
    },
    /// Whether each filter removed a subscription (0x00) or found none (0x11).
    UnsubAck {
        pkid: u16,
        removed: Vec<bool>,
    },
    PubAck {
        pkid: u16,
        refused: PublishRefused,
        reason: String,
    },
    Disconnect(Ending),
}

/// Writes `answer`.
pub(crate) fn answer(answer: Answer, out: &mut BytesMut) {
    let packet = match answer {
        Answer::ConnAck {
            present,
            refused,
            properties,
        } => {
            use wire::ConnectReturnCode as C;
            let code = match refused {
                None => C::Success,
                Some(Refused::BadCredentials) => C::BadUserNamePassword,
                Some(Refused::NotAuthorized) => C::NotAuthorized,
                Some(Refused::BadClientId) => C::ClientIdentifierNotValid,
                Some(Refused::Busy) => C::ServerBusy,
                Some(Refused::RateExceeded) => C::ConnectionRateExceeded,
                Some(Refused::Unavailable) => C::ServerUnavailable,
                Some(Refused::BadAuthMethod) => C::BadAuthenticationMethod,
                Some(Refused::RetainNotSupported) => C::RetainNotSupported,
                Some(Refused::QosNotSupported) => C::QoSNotSupported,
            };
            wire::Packet::ConnAck(wire::ConnAck {
                session_present: present,
                code,
                properties,
            })
        }
        Answer::SubAck { pkid, granted } => {
            use wire::SubscribeReasonCode as S;
            let codes = granted.into_iter().map(|g| match g {
                Granted::Yes(q) => S::Success(qos_out(q)),
                Granted::NotAuthorized => S::NotAuthorized,
                Granted::FilterInvalid => S::TopicFilterInvalid,
                Granted::NoWildcards => S::WildcardSubscriptionsNotSupported,
                Granted::NoSharedSubscriptions => S::SharedSubscriptionsNotSupported,
                Granted::Quota => S::QuotaExceeded,
            });
            wire::Packet::SubAck(wire::SubAck {
                pkid,
                return_codes: codes.collect(),
                properties: None,
            })
        }
        Answer::UnsubAck { pkid, removed } => wire::Packet::UnsubAck(wire::UnsubAck {
            pkid,
            reasons: (removed.into_iter())
                .map(|removed| match removed {
                    true => wire::UnsubAckReason::Success,
                    false => wire::UnsubAckReason::NoSubscriptionExisted,
                })
                .collect(),
            properties: None,
        }),
        Answer::PubAck {
            pkid,
            refused,
            reason,
        } => {
            use wire::PubAckReason as R;
            let code = match refused {
                PublishRefused::NotAuthorized => R::NotAuthorized,
                PublishRefused::PayloadInvalid => R::PayloadFormatInvalid,
                PublishRefused::Rule => R::ImplementationSpecificError,
            };
            wire::Packet::PubAck(wire::PubAck {
                pkid,
                reason: code,
                properties: (!reason.is_empty()).then(|| wire::PubAckProperties {
                    reason_string: Some(reason),
                    user_properties: Vec::new(),
                }),
            })
        }
        Answer::Disconnect(ending) => {
            use wire::DisconnectReasonCode as D;
            let code = match ending {
                Ending::TakenOver => D::SessionTakenOver,
                Ending::ShuttingDown => D::ServerShuttingDown,
                Ending::RateTooHigh => D::MessageRateTooHigh,
                Ending::Quota => D::QuotaExceeded,
                Ending::KeepAlive => D::KeepAliveTimeout,
                Ending::Malformed => D::MalformedPacket,
                Ending::TooLarge => D::PacketTooLarge,
                Ending::Protocol => D::ProtocolError,
                Ending::Unavailable => D::ServerBusy,
                Ending::QosNotSupported => D::QoSNotSupported,
                Ending::TopicNameInvalid => D::TopicNameInvalid,
                Ending::TopicAliasInvalid => D::TopicAliasInvalid,
                Ending::SubscriptionIdsNotSupported => D::SubscriptionIdentifiersNotSupported,
            };
            // Reason code and an empty property length, by hand: rumqttc writes a reason
            // without properties in a form its own reader refuses.
            out.extend_from_slice(&[0xE0, 2, code as u8, 0]);
            return;
        }
    };
    write(&packet, out);
}

/// The CONNACK properties callbus announces: its limits, and what it does not offer.
pub(crate) fn connack_properties(
    max_packet: usize,
    receive_max: u16,
    keep_alive: Option<u16>,
    session_expiry: Option<u32>,
    assigned_id: Option<String>,
    wildcards: bool,
) -> wire::ConnAckProperties {
    wire::ConnAckProperties {
        session_expiry_interval: session_expiry,
        receive_max: Some(receive_max),
        max_qos: Some(1),
        retain_available: Some(0),
        max_packet_size: Some(max_packet.min(u32::MAX as usize) as u32),
        assigned_client_identifier: assigned_id,
        topic_alias_max: Some(0),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(u8::from(wildcards)),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: keep_alive,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}
