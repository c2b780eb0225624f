//! One admitted client connection: a loop that reads packets (checking each SUBSCRIBE and
//! PUBLISH with the [`Bridge`](crate::bridge::Bridge)), hands accepted publishes to the bus, and
//! writes what the hub puts in its mailbox. callbus owns CONNACK, SUBACK, PUBACK and keepalive
//! towards the client. A SUBACK is sent only after the hub routes the filter, so a client that
//! saw its SUBACK receives everything published afterwards; a PUBACK only after the bus took the
//! message.

use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::codec::{
    self, ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, QoS, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use super::connect::Admitted;
use super::hub::{Event, Mailbox, Registration};
use super::throttle::TokenBucket;
use super::{Gateway, Transport};
use crate::auth::Identity;
use crate::bridge::message::{error_event, ErrorCode, ErrorRef};
use crate::bridge::PublishOutcome;
use crate::bus::Message;
use crate::metrics;
use crate::model::topic::notifications_topic;

/// Mailbox events written per wake-up before the output is flushed.
const EVENTS_PER_FLUSH: usize = 64;

/// Runs an admitted connection to its end.
pub(super) async fn run<T: Transport>(gateway: &Gateway, mut transport: T, admitted: Admitted) {
    tracing::Span::current().record("client", admitted.client_id.as_str());
    let (registration, mailbox) = gateway
        .inner
        .hub
        .register(admitted.identity.clone(), admitted.client_id);
    let limits = gateway.limits();
    let mut session = Session {
        gateway,
        registration,
        mailbox,
        identity: admitted.identity,
        inbuf: admitted.inbuf,
        outbuf: BytesMut::with_capacity(1024),
        next_pkid: 0,
        // MQTT: the server may close after one and a half keepalive periods of silence.
        idle_limit: Duration::from_millis(u64::from(admitted.keepalive) * 1500),
        last_heard: Instant::now(),
        violations: 0,
        bucket: TokenBucket::new(limits.publish_rate, limits.publish_burst),
        throttled_until: None,
    };
    session.send(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )));
    info!(user = %session.identity.user_id, role = ?session.identity.role, "connected");
    metrics::CONNECTIONS_TOTAL.inc();
    metrics::CONNECTIONS_OPEN.inc();
    let end = session.run(&mut transport).await;
    drop(session);
    metrics::CONNECTIONS_OPEN.dec();
    info!(reason = %end, "disconnected");
    transport.close().await;
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
    #[error("the bus is gone")]
    Bus,
    #[error("fell too far behind its deliveries")]
    TooSlow,
    #[error("replaced by a newer connection with the same client id")]
    Replaced,
    #[error("server shutting down")]
    Shutdown,
}

struct Session<'g> {
    gateway: &'g Gateway,
    registration: Registration,
    mailbox: Mailbox,
    identity: Arc<Identity>,
    inbuf: BytesMut,
    outbuf: BytesMut,
    next_pkid: u16,
    idle_limit: Duration,
    last_heard: Instant,
    violations: u32,
    bucket: TokenBucket,
    /// Over the publish rate: the socket is not read until then.
    throttled_until: Option<Instant>,
}

impl Session<'_> {
    async fn run<T: Transport>(&mut self, transport: &mut T) -> End {
        loop {
            // Handle whatever is already buffered (bytes that arrived with the CONNECT, too).
            if let Err(end) = self.drain_input().await {
                let _ = self.flush(transport).await;
                return end;
            }
            if let Err(e) = self.flush(transport).await {
                return End::Io(e);
            }
            let throttled = self.throttled_until;
            let wake = throttled.unwrap_or(self.last_heard + self.idle_limit);
            tokio::select! {
                read = transport.read(&mut self.inbuf), if throttled.is_none() => match read {
                    Ok(0) => return End::Closed,
                    Ok(_) => self.last_heard = Instant::now(),
                    Err(e) => return End::Io(e),
                },
                event = self.mailbox.recv() => {
                    if let Err(end) = self.on_event(event) {
                        let _ = self.flush(transport).await;
                        return end;
                    }
                    for _ in 1..EVENTS_PER_FLUSH {
                        let Some(event) = self.mailbox.try_recv() else { break };
                        if let Err(end) = self.on_event(event) {
                            let _ = self.flush(transport).await;
                            return end;
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if throttled.is_none() {
                        return End::Idle;
                    }
                    // A throttled client was sending all along: its silence is ours.
                    self.throttled_until = None;
                    self.last_heard = Instant::now();
                }
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

    /// Handles every whole packet in the input buffer, stopping at a PUBLISH that has to wait
    /// for the rate limit.
    async fn drain_input(&mut self) -> Result<(), End> {
        let max = self.gateway.limits().max_payload_size;
        while self.throttled_until.is_none() {
            let whole = codec::packet_len(&self.inbuf).is_some_and(|n| n <= self.inbuf.len());
            let is_publish = self.inbuf.first().is_some_and(|b| b >> 4 == 3);
            if whole && is_publish {
                if let Err(wait) = self.bucket.take() {
                    metrics::PUBLISHES_THROTTLED.inc();
                    self.throttled_until = Some(Instant::now() + wait);
                    break;
                }
            }
            match codec::decode(&mut self.inbuf, max).map_err(End::Malformed)? {
                Some(packet) => self.on_packet(packet).await?,
                None => break,
            }
        }
        Ok(())
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        let sid = self.registration.id;
        match packet {
            Packet::Publish(publish) => self.on_publish(publish).await?,
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topics {
                    self.gateway.inner.hub.unsubscribe(sid, filter);
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

    fn on_event(&mut self, event: Event) -> Result<(), End> {
        match event {
            Event::Deliver {
                topic,
                payload,
                qos,
            } => {
                self.deliver(&topic, payload, qos);
                Ok(())
            }
            Event::Replaced => Err(End::Replaced),
            Event::TooSlow => Err(End::TooSlow),
            Event::BusClosed => Err(End::Bus),
            Event::Shutdown => Err(End::Shutdown),
        }
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
        let inner = &self.gateway.inner;
        let outcome = inner
            .bridge
            .on_publish(&self.identity, &publish.topic, &publish.payload);
        match outcome {
            PublishOutcome::Deliver(messages) => {
                metrics::PUBLISHES_RELAYED.inc();
                for message in messages {
                    inner
                        .publisher
                        .publish(message)
                        .await
                        .map_err(|_| End::Bus)?;
                }
            }
            PublishOutcome::Refuse {
                code,
                detail,
                about,
            } => {
                debug!(topic = %publish.topic, code = code.as_str(), %detail, "publish refused");
                metrics::PUBLISHES_REFUSED.inc();
                self.report(code, &detail, &about).await;
                self.violations += 1;
                if self.violations >= self.gateway.limits().violation_limit {
                    return Err(End::Violations);
                }
            }
        }
        // v3.1.1 has no negative acknowledgement: every publish is acknowledged, and a refusal
        // is reported as an `error` event on the sender's own notifications topic.
        self.acknowledge(publish.qos, publish.pkid);
        Ok(())
    }

    /// Sends an `error` event to this client's own notifications topic.
    async fn report(&self, code: ErrorCode, detail: &str, about: &ErrorRef) {
        let topic = notifications_topic(&self.identity.user_id);
        let event = Message::new(topic, error_event(code, detail, about));
        if let Err(e) = self.gateway.inner.publisher.publish(event).await {
            warn!(error = %e, "could not publish an error event");
        }
    }

    fn on_subscribe(&mut self, subscribe: rumqttc::mqttbytes::v4::Subscribe) {
        let inner = &self.gateway.inner;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        for filter in subscribe.filters {
            if inner.bridge.may_subscribe(&self.identity, &filter.path) {
                // callbus delivers at most QoS 1.
                let qos = match filter.qos {
                    QoS::AtMostOnce => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                // Routed from now on: anything the bus delivers after this SUBACK arrives.
                inner.hub.subscribe(self.registration.id, &filter.path, qos);
                codes.push(SubscribeReasonCode::Success(qos));
            } else {
                debug!(filter = %filter.path, "subscription refused");
                metrics::SUBSCRIPTIONS_REFUSED.inc();
                codes.push(SubscribeReasonCode::Failure);
            }
        }
        self.send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
    }

    /// Writes a message the hub routed here.
    fn deliver(&mut self, topic: &Bytes, payload: Bytes, qos: QoS) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        let mut publish = Publish::from_bytes(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            publish.pkid = self.next_pkid;
        }
        self.send(Packet::Publish(publish));
    }
}
