//! Admission: the first packet of a connection must be an MQTT 3.1.1 CONNECT with a valid JWT
//! as its password, within the connect timeout. Refusals get their CONNACK only once the whole
//! CONNECT has arrived, so a client that sends it over several frames is still reading when the
//! answer comes (otherwise it sees a broken pipe instead of the reason).

use bytes::BytesMut;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::info;

use super::codec::{self, ConnAck, ConnectReturnCode, Packet, Protocol};
use super::{namespaced_client_id, Gateway, Transport};
use crate::auth::Identity;
use crate::ids::{is_valid_id, random_hex};
use crate::metrics;

/// A connection that passed its CONNECT.
pub(super) struct Admitted {
    pub identity: Arc<Identity>,
    /// Broker-side client id, `<user id>.<client id>`.
    pub client_id: String,
    /// The client id as the client chose it (or was given): its device.
    pub device: String,
    /// Keepalive granted, in seconds.
    pub keepalive: u16,
    /// `clean_session`: false asks for a persistent session.
    pub clean: bool,
    /// The Last Will (topic, payload), already checked against the ACL.
    pub will: Option<(String, bytes::Bytes)>,
    /// Bytes that arrived after the CONNECT.
    pub inbuf: BytesMut,
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
    /// Answer with this CONNACK, then close.
    Code(ConnectReturnCode),
    /// MQTT 5 client: answer with a v5 CONNACK "unsupported protocol version" (0x84).
    V5Unsupported,
    /// Close without an answer (not MQTT, or no CONNECT in time).
    Silent,
}

/// Reads and decides the CONNECT. On refusal the answer is written and `None` returned.
pub(super) async fn admit<T: Transport>(
    gateway: &Gateway,
    transport: &mut T,
    room: Room,
) -> Option<Admitted> {
    let mut inbuf = BytesMut::with_capacity(1024);
    let decided = match read_connect(gateway, transport, &mut inbuf).await {
        Ok(connect) => decide(gateway, &connect, room).map(|(identity, client_id)| {
            let max = gateway.limits().max_keepalive_secs;
            let keepalive = match connect.keep_alive {
                0 => max,
                k => k.min(max),
            };
            let will = connect.last_will.map(|w| (w.topic, w.message));
            (identity, client_id, keepalive, connect.clean_session, will)
        }),
        Err(refusal) => Err(refusal),
    };
    match decided {
        Ok((identity, client_id, keepalive, clean, will)) => Some(Admitted {
            client_id: namespaced_client_id(&identity.user_id, &client_id),
            device: client_id,
            identity: Arc::new(identity),
            keepalive,
            clean,
            will,
            inbuf,
        }),
        Err(refusal) => {
            let mut out = BytesMut::new();
            match refusal {
                Refusal::Code(code) => {
                    codec::encode(Packet::ConnAck(ConnAck::new(code, false)), &mut out)
                }
                // CONNACK, remaining length 3: no session, reason 0x84, no properties.
                Refusal::V5Unsupported => out.extend_from_slice(&[0x20, 3, 0, 0x84, 0]),
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
fn decide(
    gateway: &Gateway,
    connect: &rumqttc::mqttbytes::v4::Connect,
    room: Room,
) -> Result<(Identity, String), Refusal> {
    let unavailable = Err(Refusal::Code(ConnectReturnCode::ServiceUnavailable));
    if !room.slot {
        tracing::warn!("connection limit reached, refusing");
        return unavailable;
    }
    if !room.within_rate {
        info!("too many new connections from this address, refusing");
        metrics::CONNECTS_OVER_RATE.inc();
        return unavailable;
    }
    let login = connect.login.as_ref();
    let identity = gateway
        .inner
        .bridge
        .authenticate(
            login.map(|l| l.username.as_str()),
            login.map(|l| l.password.as_str()),
        )
        .map_err(|e| {
            info!(reason = %e, "CONNECT refused");
            Refusal::Code(ConnectReturnCode::NotAuthorized)
        })?;
    if let Some(will) = &connect.last_will {
        let bridge = &gateway.inner.bridge;
        if let Err(why) = bridge.check_will(&identity, &will.topic, &will.message, will.retain) {
            info!(reason = %why, topic = %will.topic.escape_debug(), "Last Will refused");
            return Err(Refusal::Code(ConnectReturnCode::NotAuthorized));
        }
    }
    let client_id = if connect.client_id.is_empty() && connect.clean_session {
        format!("auto-{}", random_hex::<8>())
    } else if is_valid_id(&connect.client_id) {
        connect.client_id.clone()
    } else {
        info!(client_id = %connect.client_id.escape_debug(), "bad client id");
        return Err(Refusal::Code(ConnectReturnCode::BadClientId));
    };
    // A connection that takes over one of the user's client ids replaces it: no new room.
    let hub = &gateway.inner.hub;
    let max = gateway.limits().max_connections_per_user;
    let broker_id = namespaced_client_id(&identity.user_id, &client_id);
    if hub.live_devices(&identity.user_id) >= max && !hub.is_live(&broker_id) {
        info!(user = %identity.user_id, max, "too many connections for this user, refusing");
        metrics::CONNECTS_OVER_USER_LIMIT.inc();
        return unavailable;
    }
    Ok((identity, client_id))
}

/// Reads the first packet, which must be a whole CONNECT for MQTT 3.1.1.
async fn read_connect<T: Transport>(
    gateway: &Gateway,
    transport: &mut T,
    buf: &mut BytesMut,
) -> Result<rumqttc::mqttbytes::v4::Connect, Refusal> {
    let deadline = Instant::now() + gateway.limits().connect_timeout();
    let max = gateway.limits().max_payload_size;
    loop {
        if let Some(refusal) = unsupported_level(buf, max) {
            return Err(refusal);
        }
        match codec::decode(buf, max) {
            Ok(Some(Packet::Connect(c))) if c.protocol == Protocol::V4 => return Ok(c),
            Ok(Some(Packet::Connect(_))) => {
                return Err(Refusal::Code(ConnectReturnCode::RefusedProtocolVersion))
            }
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
        tokio::select! {
            read = transport.read(buf) => match read {
                Ok(0) | Err(_) => return Err(Refusal::Silent),
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(deadline) => {
                info!("no CONNECT in time");
                return Err(Refusal::Silent);
            }
            _ = gateway.inner.shutdown.cancelled() => return Err(Refusal::Silent),
        }
    }
}

/// A refusal for a CONNECT of another protocol level, once all of it is in `buf`.
fn unsupported_level(buf: &[u8], max: usize) -> Option<Refusal> {
    let level = codec::connect_protocol_level(buf)?;
    if level == 4 {
        return None;
    }
    match codec::packet_len(buf) {
        Some(len) if len > max => return Some(Refusal::Silent),
        Some(len) if buf.len() >= len => {}
        _ => return None, // wait for the rest of it
    }
    info!(level, "unsupported protocol level");
    Some(if level == 5 {
        Refusal::V5Unsupported
    } else {
        Refusal::Code(ConnectReturnCode::RefusedProtocolVersion)
    })
}
