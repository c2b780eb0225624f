//! Admission: the first packet of a connection must be an MQTT 3.1.1 or 5 CONNECT with a valid
//! JWT as its password, within the connect timeout. Refusals get their CONNACK only once the whole
//! CONNECT has arrived, so a client that sends it over several frames is still reading when the
//! answer comes (otherwise it sees a broken pipe instead of the reason).
//!
//! Before it has authenticated, a client can make the server hold little: a CONNECT without a
//! Last Will may be `max_connect_size` (a will's payload may take it to `max_payload_size`),
//! what pre-CONNECT sockets hold past 8 KiB each comes from the `pending_connect_bytes` they
//! share, and a connection slot (`max_connections`) is taken only once the CONNECT is in, so
//! sockets that never send one cannot refuse real clients.

use bytes::BytesMut;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::info;

use super::codec::{self, ConnAck, ConnectReturnCode, Packet, Protocol, Version};
use super::v5::{self, Refused};
use super::{namespaced_client_id, Gateway, PendingBytes, Transport};
use crate::auth::Identity;
use crate::ids::{is_valid_id, random_hex};
use crate::metrics;

/// What a socket may hold before CONNECT without drawing on `pending_connect_bytes`: one with a
/// token fits, so only large ones (with a will) share the budget and filling it refuses no other.
const FREE_BYTES: usize = 8 * 1024;

/// A connection that passed its CONNECT.
pub(super) struct Admitted {
    pub identity: Arc<Identity>,
    /// Broker-side client id, `<user id>.<client id>` (shared with the hub and the session).
    pub client_id: Arc<str>,
    /// Keepalive granted, in seconds.
    pub keepalive: u16,
    /// 3.1.1 `clean_session`, MQTT 5 Clean Start: true discards a stored session.
    pub clean: bool,
    /// The session outlives the connection (3.1.1: `clean_session = 0`; MQTT 5: a Session
    /// Expiry Interval above 0).
    pub keep: bool,
    /// The Last Will, already checked against the ACL.
    pub will: Option<Will>,
    /// Bytes that arrived after the CONNECT.
    pub inbuf: BytesMut,
    /// The protocol the client speaks.
    pub version: Version,
    /// MQTT 5: the keepalive the client asked for, the largest packet it accepts, and whether
    /// its client id was made up here (CONNACK says which).
    pub asked_keepalive: u16,
    pub max_packet_out: Option<u32>,
    pub assigned_id: bool,
    /// MQTT 5: the Session Expiry Interval asked for, in seconds.
    pub session_expiry: Option<u32>,
    /// MQTT 5: how many QoS 1 deliveries the client takes unacknowledged at once.
    pub receive_max: Option<u16>,
    /// MQTT 5: Request Problem Information (Reason Strings may be sent).
    pub problem_info: bool,
}

/// A CONNECT's Last Will.
pub(super) struct Will {
    pub topic: String,
    pub payload: bytes::Bytes,
    /// MQTT 5: seconds after the connection's end before it goes out (0: at once).
    pub delay_secs: u32,
    /// MQTT 5: its Message Expiry Interval, and the properties that go on with it.
    pub expiry_secs: Option<u32>,
    pub extras: Option<Arc<crate::bus::Extras>>,
}

/// A CONNECT of either version, as admission needs it.
struct Hello {
    version: Version,
    client_id: String,
    clean: bool,
    keep: bool,
    keep_alive: u16,
    login: Option<(String, String)>,
    /// The Will and whether it asks to be retained.
    will: Option<(Will, bool)>,
    max_packet_out: Option<u32>,
    session_expiry: Option<u32>,
    receive_max: Option<u16>,
    problem_info: bool,
    /// MQTT 5: what the CONNECT asks for that callbus does not offer.
    unsupported: Option<Refused>,
}

impl Hello {
    fn v4(c: rumqttc::mqttbytes::v4::Connect) -> Hello {
        Hello {
            version: Version::V4,
            client_id: c.client_id,
            clean: c.clean_session,
            keep: !c.clean_session,
            keep_alive: c.keep_alive,
            login: c.login.map(|l| (l.username, l.password)),
            will: c.last_will.map(|w| {
                let will = Will {
                    topic: w.topic,
                    payload: w.message,
                    delay_secs: 0,
                    expiry_secs: None,
                    extras: None,
                };
                (will, w.retain)
            }),
            max_packet_out: None,
            session_expiry: None,
            receive_max: None,
            problem_info: true,
            unsupported: None,
        }
    }

    /// A v5 session is kept after the connection only with a Session Expiry Interval, and
    /// resumed only without Clean Start: the two are apart (MQTT 5 section 3.1.2.4; Clean
    /// Start 1 with an expiry starts a session that is kept, Clean Start 0 without one resumes
    /// a stored session that then ends with the connection).
    fn v5(c: v5::Connect) -> Hello {
        let retained = c.will.as_ref().is_some_and(|(_, _, retain)| *retain);
        let unsupported = if c.auth_method {
            Some(Refused::BadAuthMethod)
        } else if c.will_qos == codec::QoS::ExactlyOnce {
            Some(Refused::QosNotSupported)
        } else if retained {
            Some(Refused::RetainNotSupported)
        } else {
            None
        };
        Hello {
            unsupported,
            problem_info: c.problem_info,
            version: Version::V5,
            client_id: c.client_id,
            clean: c.clean_start,
            keep: c.session_expiry > 0,
            keep_alive: c.keep_alive,
            login: c.login,
            will: c.will.map(|(topic, payload, retain)| {
                let will = Will {
                    topic,
                    payload,
                    delay_secs: c.will_delay,
                    expiry_secs: c.will_expiry,
                    extras: c.will_extras,
                };
                (will, retain)
            }),
            max_packet_out: c.max_packet_size,
            session_expiry: Some(c.session_expiry),
            receive_max: c.receive_max,
        }
    }
}

/// Whether there is room for one more connection.
pub(super) struct Room {
    /// Under `max_connections`.
    pub slot: bool,
    /// Under `connect_rate_per_address` for its source address.
    pub within_rate: bool,
}

/// Why a connection was not admitted.
enum Refusal {
    /// Answer with a CONNACK saying this, in the client's version, then close.
    Code(Version, Refused),
    /// A protocol level callbus does not speak (3.1 and older): a 3.1.1 CONNACK.
    Level,
    /// Close without an answer (not MQTT, or no CONNECT in time).
    Silent,
}

/// The 3.1.1 return code for a refusal (3.1.1 tells fewer reasons apart).
fn v4_code(refused: Refused) -> ConnectReturnCode {
    match refused {
        Refused::BadCredentials | Refused::NotAuthorized => ConnectReturnCode::NotAuthorized,
        // MQTT 5 only (a 3.1.1 CONNECT cannot ask for them).
        Refused::BadAuthMethod | Refused::RetainNotSupported | Refused::QosNotSupported => {
            ConnectReturnCode::NotAuthorized
        }
        Refused::BadClientId => ConnectReturnCode::BadClientId,
        Refused::Busy | Refused::RateExceeded | Refused::Unavailable => {
            ConnectReturnCode::ServiceUnavailable
        }
    }
}

/// Writes the CONNACK that refuses a connection (3.1.1 or 5) into `out`.
pub(super) fn refuse(version: Version, refused: Refused, out: &mut BytesMut) {
    match version {
        Version::V4 => codec::encode(Packet::ConnAck(ConnAck::new(v4_code(refused), false)), out),
        Version::V5 => v5::answer(
            v5::Answer::ConnAck {
                present: false,
                refused: Some(refused),
                properties: None,
            },
            out,
        ),
    }
}

/// Reads and decides the CONNECT of a client at `ip`. On refusal the answer is written and
/// `None` returned; an admitted connection comes with its connection slot.
pub(super) async fn admit<T: Transport>(
    gateway: &Gateway,
    transport: &mut T,
    ip: std::net::IpAddr,
    pending: &crate::net::Place,
) -> Option<(Box<Admitted>, Option<OwnedSemaphorePermit>)> {
    let mut inbuf = BytesMut::new();
    let mut permit = None;
    let decided = match read_connect(gateway, transport, &mut inbuf, pending).await {
        Ok(hello) => {
            permit = gateway.inner.permits.clone().try_acquire_owned().ok();
            let room = Room {
                slot: permit.is_some(),
                within_rate: gateway.inner.connect_rate.admit(ip).is_ok(),
            };
            decide(gateway, &hello, room).map(|(identity, client_id)| (hello, identity, client_id))
        }
        Err(refusal) => Err(refusal),
    };
    match decided {
        Ok((hello, identity, client_id)) => {
            let max = gateway.limits().max_keepalive_secs;
            let keepalive = match hello.keep_alive {
                0 => max,
                k => k.min(max),
            };
            // Boxed: it is passed along by value, and each async fn keeps its own copy.
            let admitted = Box::new(Admitted {
                client_id: namespaced_client_id(identity.user_id(), &client_id).into(),
                assigned_id: client_id != hello.client_id,
                identity: Arc::new(identity),
                keepalive,
                clean: hello.clean,
                keep: hello.keep,
                will: hello.will.map(|(will, _)| will),
                inbuf,
                version: hello.version,
                asked_keepalive: hello.keep_alive,
                max_packet_out: hello.max_packet_out,
                session_expiry: hello.session_expiry,
                receive_max: hello.receive_max,
                problem_info: hello.problem_info,
            });
            Some((admitted, permit))
        }
        Err(refusal) => {
            let mut out = BytesMut::new();
            match refusal {
                Refusal::Code(version, refused) => refuse(version, refused, &mut out),
                Refusal::Level => codec::encode(
                    Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::RefusedProtocolVersion,
                        false,
                    )),
                    &mut out,
                ),
                Refusal::Silent => return None,
            }
            metrics::CONNECTS_REFUSED.inc();
            let _ = transport.write(out.freeze()).await;
            None
        }
    }
}

/// Decides a CONNECT: room for it, a valid token, a valid client id (an empty one gets a
/// generated id), and room among the user's connections. Returns who connects and the id.
fn decide(gateway: &Gateway, hello: &Hello, room: Room) -> Result<(Identity, String), Refusal> {
    let refuse = |refused| Err(Refusal::Code(hello.version, refused));
    if !room.slot {
        tracing::warn!("connection limit reached, refusing");
        return refuse(Refused::Busy);
    }
    if !room.within_rate {
        info!("too many new connections from this address, refusing");
        metrics::CONNECTS_OVER_RATE.inc();
        return refuse(Refused::RateExceeded);
    }
    // Enhanced authentication (MQTT-4.12.0-1), a Will above Maximum QoS (MQTT-3.2.2-12) or
    // to be retained (MQTT-3.2.2-13).
    if let Some(refused) = hello.unsupported {
        info!(?refused, "CONNECT asks for what is not offered");
        return refuse(refused);
    }
    let login = hello.login.as_ref();
    let identity = gateway
        .inner
        .bridge
        .authenticate(
            login.map(|(user, _)| user.as_str()),
            login.map(|(_, password)| password.as_str()),
        )
        .map_err(|e| {
            info!(reason = %e, "CONNECT refused");
            let refused = match e {
                crate::bridge::ConnectRefused::UsernameMismatch => Refused::NotAuthorized,
                _ => Refused::BadCredentials,
            };
            Refusal::Code(hello.version, refused)
        })?;
    if let Some((will, retain)) = &hello.will {
        let bridge = &gateway.inner.bridge;
        if let Err(why) = bridge.check_will(&identity, &will.topic, &will.payload, *retain) {
            info!(reason = %why, topic = %will.topic.escape_debug(), "Last Will refused");
            return refuse(Refused::NotAuthorized);
        }
    }
    // MQTT 5 gives an empty client id one in any case; 3.1.1 only to a clean session.
    let may_assign = hello.clean || hello.version == Version::V5;
    let client_id = if hello.client_id.is_empty() && may_assign {
        format!("auto-{}", random_hex::<8>())
    } else if is_valid_id(&hello.client_id) {
        hello.client_id.clone()
    } else {
        info!(client_id = %hello.client_id.escape_debug(), "bad client id");
        return refuse(Refused::BadClientId);
    };
    // A connection that takes over one of the user's client ids replaces it: no new room.
    let hub = &gateway.inner.hub;
    let max = gateway.limits().max_connections_per_user;
    let broker_id = namespaced_client_id(identity.user_id(), &client_id);
    if hub.live_devices(identity.user_id()) >= max && !hub.is_live(&broker_id) {
        info!(user = %identity.user_id(), max, "too many connections for this user, refusing");
        metrics::CONNECTS_OVER_USER_LIMIT.inc();
        return refuse(Refused::Busy);
    }
    Ok((identity, client_id))
}

/// Reads the first packet, which must be a whole CONNECT for MQTT 3.1.1 or 5, within the
/// pre-CONNECT bounds.
async fn read_connect<T: Transport>(
    gateway: &Gateway,
    transport: &mut T,
    buf: &mut BytesMut,
    pending: &crate::net::Place,
) -> Result<Hello, Refusal> {
    let limits = gateway.limits();
    let deadline = Instant::now() + limits.connect_timeout();
    let mut held = PendingBytes::new(&gateway.inner.pending_bytes);
    loop {
        // Only a CONNECT with a will may be larger than max_connect_size.
        let max = match codec::connect_flags(buf) {
            Some(flags) if flags & codec::WILL_FLAG != 0 => limits.max_payload_size,
            _ => limits.max_connect_size,
        };
        if codec::packet_len(buf).is_some_and(|len| len > max) {
            info!(max, "CONNECT too large");
            return Err(Refusal::Silent);
        }
        if !held.hold(
            buf.capacity().saturating_sub(FREE_BYTES),
            limits.pending_connect_bytes,
        ) {
            info!("pre-CONNECT bytes past pending_connect_bytes: closing");
            metrics::PENDING_REFUSED.inc();
            return Err(Refusal::Silent);
        }
        if let Some(refusal) = unsupported_level(buf, max) {
            return Err(refusal);
        }
        if !codec::connect_header_valid(buf) {
            info!("CONNECT with invalid flags");
            return Err(Refusal::Silent);
        }
        if let Some(len) = codec::packet_len(buf).filter(|len| *len <= buf.len()) {
            if codec::connect_fields_fill_it(&buf[..len]) == Some(false) {
                info!("CONNECT longer than the fields its flags declare");
                return Err(Refusal::Silent);
            }
        }
        if codec::connect_protocol_level(buf) == Some(5) {
            match v5::read_connect(buf, max) {
                Ok(Some(connect)) => return Ok(Hello::v5(connect)),
                Ok(None) => {}
                Err(e) => {
                    info!(error = %e, "malformed CONNECT");
                    return Err(Refusal::Silent);
                }
            }
        } else {
            match codec::decode(buf, max) {
                Ok(Some(Packet::Connect(c))) if c.protocol == Protocol::V4 => {
                    return Ok(Hello::v4(c))
                }
                Ok(Some(Packet::Connect(_))) => return Err(Refusal::Level),
                Ok(Some(_)) => {
                    info!("first packet is not CONNECT");
                    return Err(Refusal::Silent);
                }
                Ok(None) => {}
                Err(e) => {
                    info!(error = %e, "malformed CONNECT");
                    return Err(Refusal::Silent);
                }
            }
        }
        tokio::select! {
            read = transport.read(buf) => match read {
                Ok(0) | Err(_) => return Err(Refusal::Silent),
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(deadline) => {
                info!("no CONNECT in time");
                return Err(Refusal::Silent);
            }
            _ = pending.evicted() => {
                info!("no CONNECT yet while newer sockets need the room: closing");
                return Err(Refusal::Silent);
            }
            _ = gateway.inner.shutdown.cancelled() => return Err(Refusal::Silent),
        }
    }
}

/// A refusal for a CONNECT of a protocol level callbus does not speak, once all of it is in
/// `buf`.
fn unsupported_level(buf: &[u8], max: usize) -> Option<Refusal> {
    let level = codec::connect_protocol_level(buf)?;
    if level == 4 || level == 5 {
        return None;
    }
    match codec::packet_len(buf) {
        Some(len) if len > max => return Some(Refusal::Silent),
        Some(len) if buf.len() >= len => {}
        _ => return None, // wait for the rest of it
    }
    info!(level, "unsupported protocol level");
    Some(Refusal::Level)
}
