//! One client connection, whatever its transport: CONNECT authentication, then a loop that
//! checks each packet with the [`Bridge`] before it reaches the router, and writes the router's
//! deliveries back to the client.
//!
//! The router sees each session as an in-process link named `<user id>.<client id>`. Callbus owns
//! CONNACK, SUBACK, PUBACK and keepalive towards the client; a SUBACK is sent only after the
//! router has registered the subscription, so a client that saw its SUBACK receives everything
//! published afterwards.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::codec::{
    self, ConnAck, ConnectReturnCode, Packet, Protocol, PubAck, PubComp, PubRec, Publish, QoS,
    SubAck, SubscribeReasonCode, UnsubAck,
};
use super::hub::{Hub, Queue};
use super::registry::{Command, Registration, Registry};
use super::{namespaced_client_id, Broker};
use crate::auth::{Identity, Role};
use crate::bridge::acl::{chat_topic, filter_matches, notifications_topic};
use crate::bridge::message::{error_event, ErrorCode, ErrorRef};
use crate::bridge::{Bridge, PublishOutcome};
use crate::config::GatewayConfig;
use crate::ids::{is_valid_id, random_hex};
use crate::metrics;

/// A byte stream carrying MQTT packets (a TCP socket, or WebSocket binary frames).
pub trait Transport: Send + 'static {
    /// Appends received bytes to `buf`; `Ok(0)` means the peer closed. Must be cancel-safe.
    fn read(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes all of `data`.
    fn write(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the stream politely, ignoring errors.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Shared by every connection: the router, the policy, the limits and the shutdown signal.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<GatewayInner>,
}

struct GatewayInner {
    broker: Broker,
    bridge: Bridge,
    limits: GatewayConfig,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    registry: Arc<Registry>,
}

impl Gateway {
    pub fn new(
        broker: Broker,
        bridge: Bridge,
        limits: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        Self {
            inner: Arc::new(GatewayInner {
                broker,
                bridge,
                limits,
                permits,
                shutdown,
                registry: Arc::default(),
            }),
        }
    }

    pub fn limits(&self) -> &GatewayConfig {
        &self.inner.limits
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Makes every live session of `user_id` drop its `chat/{cid}` subscription, and returns
    /// once each has told the router (bounded, so a stuck session cannot hold up the caller; its
    /// deliveries are still checked against membership one by one).
    pub async fn revoke_chat(&self, user_id: &str, cid: &str) {
        let mut waits = Vec::new();
        for session in self.inner.registry.sessions_of(user_id) {
            let (done, wait) = oneshot::channel();
            let cid = cid.to_owned();
            if session.send(Command::Revoke { cid, done }).await.is_ok() {
                waits.push(wait);
            }
        }
        let all = futures_util::future::join_all(waits);
        if tokio::time::timeout(Duration::from_secs(2), all)
            .await
            .is_err()
        {
            warn!(
                user = user_id,
                cid, "a session did not confirm a revocation in time"
            );
        }
    }

    /// Runs one client connection to its end. `peer` names it in logs.
    pub async fn serve<T: Transport>(&self, transport: T, peer: String) {
        let span = tracing::info_span!("mqtt", %peer, client = tracing::field::Empty);
        let permit = self.inner.permits.clone().try_acquire_owned().ok();
        self.run(transport, permit).instrument(span).await;
    }

    async fn run<T: Transport>(&self, mut transport: T, permit: Option<OwnedSemaphorePermit>) {
        let mut inbuf = BytesMut::with_capacity(1024);
        let connect = match self.read_connect(&mut transport, &mut inbuf).await {
            Ok(connect) => connect,
            Err(refusal) => {
                if let Some(code) = refusal {
                    connack(&mut transport, code).await;
                }
                transport.close().await;
                return;
            }
        };
        let (identity, client_id) = match self.admit(&connect, permit.is_some()) {
            Ok(admitted) => admitted,
            Err(code) => {
                connack(&mut transport, code).await;
                transport.close().await;
                return;
            }
        };
        let broker_id = namespaced_client_id(&identity.user_id, &client_id);
        tracing::Span::current().record("client", broker_id.as_str());
        let max_ka = self.inner.limits.max_keepalive_secs;
        let keepalive = match connect.keep_alive {
            0 => max_ka,
            k => k.min(max_ka),
        };
        let (registration, commands) = self.inner.registry.register(&identity.user_id, &broker_id);
        let hub = self.inner.broker.hub().clone();
        let deliveries = hub.register(registration.id);
        let mut session = Session {
            gateway: self.clone(),
            hub,
            deliveries,
            registration,
            commands,
            identity,
            inbuf,
            outbuf: BytesMut::with_capacity(1024),
            subscriptions: HashMap::new(),
            next_pkid: 0,
            // MQTT: the server may close after one and a half keepalive periods of silence.
            idle_limit: Duration::from_millis(u64::from(keepalive) * 1500),
            last_heard: Instant::now(),
            violations: 0,
            bucket: TokenBucket::new(
                self.inner.limits.publish_rate,
                self.inner.limits.publish_burst,
            ),
        };
        codec::encode(
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
            &mut session.outbuf,
        );
        info!(user = %session.identity.user_id, role = ?session.identity.role, "connected");
        metrics::CONNECTIONS_TOTAL.inc();
        metrics::CONNECTIONS_OPEN.inc();
        let end = session.run(&mut transport).await;
        session.hub.unregister(session.registration.id);
        metrics::CONNECTIONS_OPEN.dec();
        info!(reason = %end, "disconnected");
        transport.close().await;
        drop(permit);
    }

    /// Decides a CONNECT: a free connection slot, a valid token, a valid client id (an empty one
    /// gets a generated id). Returns who connects and the client id, or the CONNACK refusal.
    fn admit(
        &self,
        connect: &rumqttc::mqttbytes::v4::Connect,
        has_slot: bool,
    ) -> Result<(Identity, String), ConnectReturnCode> {
        if !has_slot {
            warn!("connection limit reached, refusing");
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        let login = connect.login.as_ref();
        let identity = self
            .inner
            .bridge
            .authenticate(
                login.map(|l| l.username.as_str()),
                login.map(|l| l.password.as_str()),
            )
            .map_err(|e| {
                info!(reason = %e, "CONNECT refused");
                ConnectReturnCode::NotAuthorized
            })?;
        let client_id = if connect.client_id.is_empty() && connect.clean_session {
            format!("auto-{}", random_hex::<8>())
        } else if is_valid_id(&connect.client_id) {
            connect.client_id.clone()
        } else {
            info!(client_id = %connect.client_id.escape_debug(), "bad client id");
            return Err(ConnectReturnCode::BadClientId);
        };
        Ok((identity, client_id))
    }

    /// Reads the first packet, which must be a CONNECT for MQTT 3.1.1. On failure returns the
    /// CONNACK code to answer with, if the protocol calls for one.
    async fn read_connect<T: Transport>(
        &self,
        transport: &mut T,
        buf: &mut BytesMut,
    ) -> Result<rumqttc::mqttbytes::v4::Connect, Option<ConnectReturnCode>> {
        let deadline = Instant::now() + self.inner.limits.connect_timeout();
        let max = self.inner.limits.max_payload_size;
        loop {
            if let Some(level) = codec::connect_protocol_level(buf) {
                if level != 4 {
                    info!(level, "unsupported protocol level");
                    return Err(Some(ConnectReturnCode::RefusedProtocolVersion));
                }
            }
            match codec::decode(buf, max) {
                Ok(Some(Packet::Connect(c))) if c.protocol == Protocol::V4 => return Ok(c),
                Ok(Some(Packet::Connect(_))) => {
                    return Err(Some(ConnectReturnCode::RefusedProtocolVersion))
                }
                Ok(Some(other)) => {
                    info!(packet = ?packet_name(&other), "first packet is not CONNECT");
                    return Err(None);
                }
                Ok(None) => {}
                Err(e) => {
                    info!(error = %e, "malformed CONNECT");
                    return Err(None);
                }
            }
            tokio::select! {
                read = transport.read(buf) => match read {
                    Ok(0) | Err(_) => return Err(None),
                    Ok(_) => {}
                },
                _ = tokio::time::sleep_until(deadline) => {
                    info!("no CONNECT in time");
                    return Err(None);
                }
                _ = self.inner.shutdown.cancelled() => return Err(None),
            }
        }
    }
}

async fn connack<T: Transport>(transport: &mut T, code: ConnectReturnCode) {
    metrics::CONNECTS_REFUSED.inc();
    let mut out = BytesMut::new();
    codec::encode(Packet::ConnAck(ConnAck::new(code, false)), &mut out);
    let _ = transport.write(out.freeze()).await;
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::Publish(_) => "PUBLISH",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::PingReq => "PINGREQ",
        Packet::Disconnect => "DISCONNECT",
        _ => "other",
    }
}

/// A simple token bucket for the per-connection publish rate.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a session ended (for the log).
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("client disconnected")]
    Disconnect,
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed packet: {0}")]
    Malformed(codec::CodecError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("keepalive expired")]
    Idle,
    #[error("too many denied publishes")]
    Violations,
    #[error("publish rate limit exceeded")]
    RateLimited,
    #[error("router link lost")]
    Router,
    #[error("fell too far behind its deliveries")]
    TooSlow,
    #[error("replaced by a newer connection with the same client id")]
    Replaced,
    #[error("server shutting down")]
    Shutdown,
}

struct Session {
    gateway: Gateway,
    hub: Arc<Hub>,
    /// What the hub routed to this session.
    deliveries: Queue,
    registration: Registration,
    commands: mpsc::Receiver<Command>,
    identity: Identity,
    inbuf: BytesMut,
    outbuf: BytesMut,
    /// Granted subscriptions: filter to the QoS it is delivered at.
    subscriptions: HashMap<String, QoS>,
    next_pkid: u16,
    idle_limit: Duration,
    last_heard: Instant,
    violations: u32,
    bucket: TokenBucket,
}

impl Session {
    async fn run<T: Transport>(&mut self, transport: &mut T) -> End {
        let shutdown = self.gateway.inner.shutdown.clone();
        loop {
            // Handle whatever is already buffered (bytes that arrived with the CONNECT, too).
            if let Err(end) = self.drain_input().await {
                let _ = self.flush(transport).await;
                return end;
            }
            if let Err(e) = self.flush(transport).await {
                return End::Io(e);
            }
            let deadline = self.last_heard + self.idle_limit;
            tokio::select! {
                read = transport.read(&mut self.inbuf) => match read {
                    Ok(0) => return End::Closed,
                    Ok(_) => self.last_heard = Instant::now(),
                    Err(e) => return End::Io(e),
                },
                delivery = self.deliveries.recv() => match delivery {
                    Some((topic, payload)) => self.deliver(topic, payload),
                    None => return End::TooSlow,
                },
                Some(command) = self.commands.recv() => {
                    if let Err(end) = self.on_command(command) {
                        return end;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return End::Idle,
                _ = shutdown.cancelled() => return End::Shutdown,
            }
        }
    }

    async fn flush<T: Transport>(&mut self, transport: &mut T) -> io::Result<()> {
        if self.outbuf.is_empty() {
            return Ok(());
        }
        let data = self.outbuf.split().freeze();
        transport.write(data).await
    }

    async fn drain_input(&mut self) -> Result<(), End> {
        let max = self.gateway.inner.limits.max_payload_size;
        while let Some(packet) = codec::decode(&mut self.inbuf, max).map_err(End::Malformed)? {
            self.on_packet(packet).await?;
        }
        Ok(())
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish).await?,
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe).await?,
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topics {
                    if self.subscriptions.remove(filter).is_some() {
                        self.hub.unsubscribe(self.registration.id, filter);
                    }
                }
                self.send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
            }
            Packet::PingReq => self.send(Packet::PingResp),
            Packet::PubRel(rel) => self.send(Packet::PubComp(PubComp::new(rel.pkid))),
            // Acknowledgements of our QoS 1 deliveries: nothing to retransmit within a session.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Disconnect => return Err(End::Disconnect),
            Packet::Connect(_) => return Err(End::Protocol("second CONNECT")),
            _ => return Err(End::Protocol("server-only packet from client")),
        }
        Ok(())
    }

    fn send(&mut self, packet: Packet) {
        codec::encode(packet, &mut self.outbuf);
    }

    fn acknowledge(&mut self, qos: QoS, pkid: u16) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(pkid))),
            QoS::ExactlyOnce => self.send(Packet::PubRec(PubRec::new(pkid))),
        }
    }

    async fn on_publish(&mut self, publish: Publish) -> Result<(), End> {
        // v3.1.1 has no negative acknowledgement: every publish is acknowledged, and a refusal
        // is reported as an `error` event on the sender's own notifications topic.
        self.acknowledge(publish.qos, publish.pkid);
        if !self.bucket.take() {
            self.report(
                ErrorCode::RateLimited,
                "publish rate limit exceeded",
                &ErrorRef::default(),
            );
            return Err(End::RateLimited);
        }
        let outcome =
            self.gateway
                .inner
                .bridge
                .on_publish(&self.identity, &publish.topic, &publish.payload);
        match outcome {
            PublishOutcome::Deliver(messages) => {
                metrics::PUBLISHES_RELAYED.inc();
                for (topic, payload) in messages {
                    self.hub
                        .publish(topic, payload.into())
                        .map_err(|_| End::Router)?;
                }
                Ok(())
            }
            PublishOutcome::Refuse {
                code,
                detail,
                about,
            } => {
                debug!(topic = %publish.topic, code = code.as_str(), %detail, "publish refused");
                metrics::PUBLISHES_REFUSED.inc();
                self.report(code, &detail, &about);
                self.violations += 1;
                if self.violations >= self.gateway.inner.limits.violation_limit {
                    return Err(End::Violations);
                }
                Ok(())
            }
        }
    }

    /// Sends an `error` event to this client's own notifications topic.
    fn report(&self, code: ErrorCode, detail: &str, about: &ErrorRef) {
        let topic = notifications_topic(&self.identity.user_id);
        if let Err(e) = self
            .gateway
            .inner
            .broker
            .publish(&topic, error_event(code, detail, about))
        {
            warn!(error = %e, "could not publish an error event");
        }
    }

    async fn on_subscribe(
        &mut self,
        subscribe: rumqttc::mqttbytes::v4::Subscribe,
    ) -> Result<(), End> {
        let bridge = &self.gateway.inner.bridge;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        for filter in subscribe.filters {
            if bridge.may_subscribe(&self.identity, &filter.path) {
                // callbus delivers at most QoS 1.
                let qos = match filter.qos {
                    QoS::AtMostOnce => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                codes.push(SubscribeReasonCode::Success(qos));
                // The hub routes it from now on: anything published after this SUBACK arrives.
                // (rumqttd publishes no `$` topics, so an admin's `$SYS/#` receives nothing.)
                self.hub.subscribe(self.registration.id, &filter.path);
                self.subscriptions.insert(filter.path, qos);
            } else {
                debug!(filter = %filter.path, "subscription refused");
                metrics::SUBSCRIPTIONS_REFUSED.inc();
                codes.push(SubscribeReasonCode::Failure);
            }
        }
        self.send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
        Ok(())
    }

    fn on_command(&mut self, command: Command) -> Result<(), End> {
        match command {
            Command::Revoke { cid, done } => {
                let topic = chat_topic(&cid);
                if self.identity.role != Role::Admin && self.subscriptions.remove(&topic).is_some()
                {
                    debug!(%topic, "membership revoked, dropping the subscription");
                    self.hub.unsubscribe(self.registration.id, &topic);
                }
                let _ = done.send(());
            }
            Command::Replaced => return Err(End::Replaced),
        }
        Ok(())
    }

    /// Writes a routed message to the client if it still holds a matching subscription and
    /// still passes the ACL.
    fn deliver(&mut self, topic: Bytes, payload: Bytes) {
        let Ok(topic) = std::str::from_utf8(&topic) else {
            return;
        };
        let qos = match self.subscriptions.get(topic) {
            Some(qos) => Some(*qos),
            None => self
                .subscriptions
                .iter()
                .filter(|(filter, _)| filter_matches(filter, topic))
                .map(|(_, qos)| *qos)
                .max_by_key(|qos| *qos as u8),
        };
        let Some(qos) = qos else {
            return; // unsubscribed while the message was in flight
        };
        if !self
            .gateway
            .inner
            .bridge
            .may_receive(&self.identity, topic, &payload)
        {
            return;
        }
        let mut publish = Publish::from_bytes(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            publish.pkid = self.next_pkid;
        }
        self.send(Packet::Publish(publish));
    }
}
