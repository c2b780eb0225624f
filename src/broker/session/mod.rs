//! One admitted client connection: a loop that reads packets (checking each SUBSCRIBE and
//! PUBLISH with the [`Bridge`](crate::bridge::Bridge)), hands accepted publishes to the bus, and
//! writes what the hub puts in its mailbox. callbus owns CONNACK, SUBACK, PUBACK and keepalive
//! towards the client. A SUBACK is sent only after the hub routes the filter, so a client that
//! saw its SUBACK receives everything published afterwards; a PUBACK only after the bus took the
//! message.

mod incoming;

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tracing::{info, warn, Instrument};

use super::codec::Version;
use super::codec::{
    self, ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, QoS, UnsubAck,
};
use super::connect::{Admitted, Will};
use super::hub::{
    Asked, Event, Mailbox, Parting, Queued, Registered, Registration, Resumed, MAILBOX_MESSAGES,
};
use super::v5;
use super::{keepalive, Gateway, Kind, Transport};
use crate::auth::Identity;
use crate::bridge::message::{error_event, ErrorCode, ErrorRef};
use crate::bus::{BusError, Kept};
use crate::metrics;
use crate::model::topic::notifications_topic;
use crate::rate::TokenBucket;
use sync_wrapper::SyncFuture;

/// How long a connection taking over a live persistent session waits for the older connection
/// to hand it back.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Bytes of a v5 PUBLISH besides its topic and payload, at most (fixed header, lengths,
/// packet id, an empty property length).
const PUBLISH_OVERHEAD: usize = 12;

/// How long an ending session waits to write its last words (acknowledgements, an MQTT 5
/// DISCONNECT) and to close its stream: a client that stopped reading does not hold it.
const LAST_WRITE: Duration = Duration::from_secs(1);

/// Mailbox events written per wake-up before the output is flushed.
const EVENTS_PER_FLUSH: usize = 64;

/// Lets the tasks woken so far run before this one goes on. `tokio::task::yield_now` defers
/// its wakeup until the runtime next polls its I/O driver, which on a thread with nothing else
/// to do is an `epoll_wait` system call between the receivers' writes and the sender's
/// PUBACK; a task that wakes itself instead goes straight to the back of the run queue, behind
/// the receivers it woke.
fn yield_to_woken() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

/// Sets up an admitted connection's session: takes over (or resumes) its stored state, writes
/// the CONNACK and replays what waited. Gives back the session and how the replay went (it
/// may already have ended the session), or `None` when the connection cannot go on.
pub(super) async fn start<T: Transport>(
    gateway: &Gateway,
    transport: &mut T,
    mut admitted: Box<Admitted>,
    origin: Origin,
) -> Option<(Box<Session>, Result<(), End>)> {
    tracing::Span::current().record("client", tracing::field::display(&admitted.client_id));
    let hub = &gateway.inner.hub;
    let (identity, client_id) = (&admitted.identity, &admitted.client_id);
    hub.claim(client_id).await;
    if let Err(e) = hub.fetch(identity, client_id, admitted.clean).await {
        // The session may be stored but cannot be read: refusing is better than starting
        // it afresh and losing what it holds.
        warn!(error = %e, "cannot read the stored session");
        let mut out = BytesMut::new();
        super::connect::refuse(admitted.version, v5::Refused::Unavailable, &mut out);
        let _ = transport.write(out.freeze()).await;
        transport.close().await;
        return None;
    }
    let asked = Asked {
        resume: !admitted.clean,
        keep: admitted.keep,
    };
    let attached = match hub.register(identity.clone(), client_id, asked, true) {
        Registered::Attached(attached) => attached,
        Registered::Handover(parted) => {
            // The older connection hands the session back as it ends; one stuck in a write
            // is not waited for past the bound.
            let _ = tokio::time::timeout(HANDOVER_WAIT, parted).await;
            match hub.register(identity.clone(), client_id, asked, false) {
                Registered::Attached(attached) => attached,
                Registered::Handover(_) => return None, // not returned without a handover
            }
        }
    };
    // MQTT 5: the session is kept as long as the client asked, up to the configured expiry;
    // a session resumed with an expiry of 0 ends with this connection (MQTT-3.1.2-5: the new
    // expiry governs once it ends).
    if let Some(secs) = admitted.session_expiry {
        let secs = if admitted.keep { secs } else { 0 };
        if admitted.keep || attached.resumed.is_some() {
            let sid = attached.registration.id;
            hub.set_expiry(sid, Duration::from_secs(u64::from(secs)));
        }
    }
    let limits = gateway.limits();
    let mut session = Box::new(Session {
        gateway: gateway.clone(),
        registration: attached.registration,
        mailbox: attached.mailbox,
        persistent: admitted.keep,
        client_id: admitted.client_id.clone(),
        origin,
        version: admitted.version,
        max_packet_out: admitted.max_packet_out,
        problem_info: admitted.problem_info,
        unacked: None,
        receive_max: admitted.receive_max.map_or(u32::MAX, u32::from),
        outstanding: 0,
        acked_event: 0,
        identity: admitted.identity.clone(),
        inbuf: std::mem::take(&mut admitted.inbuf),
        outbuf: BytesMut::new(),
        next_pkid: 0,
        violations: 0,
        bucket: TokenBucket::full(limits.publish_burst),
        throttle: None,
        will: admitted.will.take().map(Box::new),
        no_local: false,
        acks_waiting: None,
    });
    // MQTT: the server may close after one and a half keepalive periods of silence.
    let (now, limit) = (keepalive::now_ms(), u64::from(admitted.keepalive) * 1500);
    let watch = session.mailbox.watch(now, limit);
    gateway.inner.keepalive.watch(watch, now + limit);
    let present = attached.resumed.is_some();
    match admitted.version {
        Version::V4 => session.send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            present,
        ))),
        Version::V5 => {
            let properties = connack_properties(gateway, &admitted, session.device());
            session.answer(v5::Answer::ConnAck {
                present,
                refused: None,
                properties: Some(properties),
            });
        }
    }
    info!(user = %session.identity.user_id(), role = ?session.identity.role, present, "connected");
    metrics::CONNECTIONS_TOTAL.inc();
    if session.version == Version::V5 {
        metrics::CONNECTIONS_V5.inc();
    }
    metrics::CONNECTIONS_OPEN.inc();
    let replayed = match attached.resumed {
        Some(resumed) => session.replay(resumed),
        None => Ok(()),
    };
    // A session kept by the cluster is fed by its queues from here on.
    if let Err(e) = hub.sync_queues(session.registration.id).await {
        warn!(error = %e, "cannot open the session's queues");
    }
    Some((session, replayed))
}

/// Runs a started session to its end (on a task of its own: what an idle connection's task
/// holds is this future, the session and the transport, not the admission's and setup's
/// state). `permit` is the connection's slot, given back at the end. (An async block, not an
/// async fn: an async fn keeps a second copy of each argument.)
#[allow(clippy::manual_async_fn)]
pub(super) fn serve<T: Transport>(
    mut session: Box<Session>,
    mut transport: T,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let end = session.run(&mut transport).await;
        // Boxed, like the packets that wait: only a session that ends needs its state.
        let span = session.span();
        Box::pin(session.finish(transport, end).instrument(span)).await;
        drop(permit);
    }
}

/// What woke a waiting session.
enum Wake {
    Event(Event),
    Read(io::Result<usize>),
    Unthrottled,
    /// The oldest PUBLISH waiting for the bus to store it is stored (or could not be).
    Kept(Result<(), BusError>),
}

/// Why a session ended (for the log).
#[derive(Debug, thiserror::Error)]
pub(super) enum End {
    #[error("client disconnected")]
    Disconnect,
    #[error("client disconnected, asking for its will")]
    DisconnectWithWill,
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed packet: {0}")]
    Malformed(v5::Malformed),
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

impl End {
    /// The MQTT 5 DISCONNECT reason for a session callbus ends (none when the client ended it).
    fn ending(&self) -> Option<v5::Ending> {
        Some(match self {
            End::Disconnect | End::DisconnectWithWill | End::Closed | End::Io(_) => return None,
            End::Malformed(why) => why.ending,
            End::Protocol(_) => v5::Ending::Protocol,
            End::Idle => v5::Ending::KeepAlive,
            End::Violations => v5::Ending::RateTooHigh,
            End::Bus => v5::Ending::Unavailable,
            End::TooSlow => v5::Ending::Quota,
            End::Replaced => v5::Ending::TakenOver,
            End::Shutdown => v5::Ending::ShuttingDown,
        })
    }
}

/// What a v5 CONNACK announces: the limits this connection gets.
fn connack_properties(
    gateway: &Gateway,
    admitted: &Admitted,
    device: &str,
) -> rumqttc::v5::mqttbytes::v5::ConnAckProperties {
    let limits = gateway.limits();
    let most = gateway.inner.hub.session_expiry().as_secs();
    let most = most.min(u64::from(u32::MAX)) as u32;
    let expiry = admitted.session_expiry.unwrap_or(most).min(most);
    v5::connack_properties(
        limits.max_payload_size,
        MAILBOX_MESSAGES.min(usize::from(u16::MAX)) as u16,
        (admitted.keepalive != admitted.asked_keepalive).then_some(admitted.keepalive),
        admitted.keep.then_some(expiry),
        admitted.assigned_id.then(|| device.to_owned()),
        admitted.identity.role == crate::auth::Role::Admin,
    )
}

pub(super) struct Session {
    gateway: Gateway,
    registration: Registration,
    mailbox: Mailbox,
    /// `clean_session = 0`: QoS 1 deliveries are kept until acknowledged.
    persistent: bool,
    /// Broker-side client id, `<user id>.<device>`.
    client_id: Arc<str>,
    /// Where the connection comes from (for the log).
    origin: Origin,
    /// The protocol the client speaks.
    version: Version,
    /// MQTT 5: the largest packet the client accepts (larger deliveries are not sent).
    max_packet_out: Option<u32>,
    /// MQTT 5 Request Problem Information: Reason Strings may be sent.
    problem_info: bool,
    /// What a persistent session keeps until the client acknowledges it, and what waits for
    /// room under MQTT 5's Receive Maximum (boxed, made on first use: a clean session with no
    /// receive maximum never needs it).
    unacked: Option<Box<Unacked>>,
    /// MQTT 5 Receive Maximum: QoS 1 messages the client takes unacknowledged at once; past
    /// it, deliveries wait in `held` until acknowledgements come.
    receive_max: u32,
    /// QoS 1 messages sent and not yet acknowledged (any session).
    outstanding: u32,
    /// The highest durable event-log sequence the client acknowledged.
    acked_event: u64,
    identity: Arc<Identity>,
    inbuf: BytesMut,
    outbuf: BytesMut,
    next_pkid: u16,
    violations: u32,
    bucket: TokenBucket,
    /// Over the publish rate: the socket is not read until this fires (boxed: only a
    /// throttled session has a timer).
    throttle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// MQTT 5: the connection holds a No Local subscription, so its publishes say who sent
    /// them.
    no_local: bool,
    /// The Last Will: published when the connection ends without DISCONNECT.
    will: Option<Box<Will>>,
    /// Acknowledgements (encoded) not yet written, oldest first, each with what it waits for:
    /// the bus storing the PUBLISH (cluster mode), or nothing but the ones before it (MQTT
    /// acknowledges in the order the PUBLISHes came). Made on first use.
    acks_waiting: Option<Box<AcksWaiting>>,
}

/// Acknowledgements (encoded) not yet written, oldest first, each with what it waits for
/// besides the ones before it.
#[derive(Default)]
struct AcksWaiting(VecDeque<(Option<SyncFuture<Kept>>, Bytes)>);

/// A connection's transport and address, which its log lines name.
#[derive(Clone, Copy)]
pub(super) struct Origin {
    pub kind: Kind,
    pub peer: SocketAddr,
}

/// A session's deliveries that wait for an acknowledgement or for room.
#[derive(Default)]
struct Unacked {
    /// Sent at QoS 1 and not yet acknowledged (persistent sessions only), oldest first.
    inflight: VecDeque<Queued>,
    /// Held back by the client's Receive Maximum, oldest first.
    held: VecDeque<(QoS, Queued)>,
}

impl Session {
    /// The client id the client chose: its device, for calls bound to a device.
    fn device(&self) -> &str {
        let user = self.identity.user_id().len();
        self.client_id.get(user + 1..).unwrap_or_default()
    }

    /// The connection's log context. Made when a line is written rather than kept for the
    /// connection's life: a span kept per connection costs about 400 bytes (its formatted
    /// fields and the registry's slot), a sixth of an idle connection.
    fn span(&self) -> tracing::Span {
        let Origin { kind, peer } = self.origin;
        tracing::info_span!("mqtt", %kind, %peer, client = %self.client_id)
    }

    /// Ends the session: MQTT 5's DISCONNECT with the reason, the Last Will unless the client
    /// said DISCONNECT, the hub told (what is unacknowledged is kept), the socket closed.
    pub(super) async fn finish<T: Transport>(mut self: Box<Self>, mut transport: T, end: End) {
        if let (Version::V5, Some(ending)) = (self.version, end.ending()) {
            self.answer(v5::Answer::Disconnect(ending));
        }
        // What the session still had to say (acknowledgements, the DISCONNECT), unless the
        // client is gone or stopped reading; bounded either way.
        let gone = matches!(end, End::TooSlow | End::Closed | End::Io(_));
        if !gone && !self.outbuf.is_empty() {
            let _ = tokio::time::timeout(LAST_WRITE, self.flush(&mut transport)).await;
        }
        if let (Some(will), false) = (self.will.take(), matches!(end, End::Disconnect)) {
            // Taken over even when the connection's end was read first: another node's claim
            // may have released the session here before this task saw the socket close.
            let hub = &self.gateway.inner.hub;
            let replaced = matches!(end, End::Replaced) || hub.released(self.registration.id);
            self.will_goes(will, replaced).await;
        }
        let Session {
            registration,
            mailbox,
            unacked,
            next_pkid,
            acked_event,
            ..
        } = *self;
        let Unacked { inflight, held } = unacked.map(|u| *u).unwrap_or_default();
        let parting = Parting {
            inflight: inflight.into(),
            last_pkid: next_pkid,
            acked_event,
            unsent: held.into_iter().map(|(_, m)| m).collect(),
        };
        registration.close(mailbox, parting);
        metrics::CONNECTIONS_OPEN.dec();
        info!(reason = %end, "disconnected");
        let _ = tokio::time::timeout(LAST_WRITE, transport.close()).await;
    }

    /// The connection ended without a normal DISCONNECT: its Will goes out now, or (MQTT 5,
    /// a Will Delay Interval) once the delay or the session's expiry passed, whichever comes
    /// first, unless a connection came back to the session meanwhile, on any node
    /// (MQTT-3.1.3-9). `replaced`: a new connection took the session over (here or on
    /// another node), which is such a return.
    async fn will_goes(&self, will: Box<Will>, replaced: bool) {
        let hub = &self.gateway.inner.hub;
        let expiry = match self.persistent {
            true => hub.expiry_of(self.registration.id),
            false => Duration::ZERO,
        };
        let delay = Duration::from_secs(u64::from(will.delay_secs)).min(expiry);
        if replaced && !delay.is_zero() {
            return;
        }
        if delay.is_zero() {
            let device = self.device();
            return incoming::publish_will(&self.gateway, &self.identity, device, &will).await;
        }
        let (gateway, identity) = (self.gateway.clone(), self.identity.clone());
        let (client_id, ended_ms) = (self.client_id.clone(), crate::model::call::now_ms());
        let back_elsewhere = hub.delay_will(&client_id, self.registration.id, ended_ms);
        tokio::spawn(async move {
            let shutdown = gateway.shutdown_token().clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // The server is going: the Will is not left unsaid.
                _ = shutdown.cancelled() => {}
                _ = back_elsewhere.cancelled() => {}
            }
            if !gateway
                .inner
                .hub
                .will_due(&client_id, ended_ms, &back_elsewhere)
            {
                return;
            }
            let device = client_id
                .get(identity.user_id().len() + 1..)
                .unwrap_or_default();
            incoming::publish_will(&gateway, &identity, device, &will).await;
        });
    }

    /// Serves the client until the session ends (what is still to be written is written by
    /// [`Session::finish`]). Nothing larger than a reference lives across its waits: this
    /// future is most of what an idle connection's task holds (an async block: an async fn
    /// would keep a second copy of its arguments).
    #[allow(clippy::manual_async_fn)]
    fn run<'a, T: Transport>(&'a mut self, transport: &'a mut T) -> impl Future<Output = End> + 'a {
        async move {
            loop {
                // Handle whatever is already buffered (bytes that arrived with the CONNECT, too).
                let published = match self.drain_input().await {
                    Ok(published) => published,
                    Err(end) => return end,
                };
                // The sessions this client's messages went to were woken on this thread: they
                // write their deliveries before this one writes its PUBACKs (what a receiver
                // waits for comes first, as a single-threaded broker does it). (Only a flag
                // lives across the yield: the task is sized by its largest wait.)
                if published {
                    yield_to_woken().await;
                }
                if !self.outbuf.is_empty() {
                    match self.flush(transport).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return End::TooSlow,
                        Err(e) => return End::Io(e),
                    }
                }
                // Polled by hand rather than a select over futures: what an idle connection's
                // task keeps while it waits is two references.
                let woke = std::future::poll_fn(|cx| self.poll_wake(cx, transport)).await;
                if let Err(end) = self.on_wake(woke) {
                    return end;
                }
            }
        }
    }

    fn on_wake(&mut self, woke: Wake) -> Result<(), End> {
        let event = match woke {
            Wake::Kept(Ok(())) => {
                self.release_acks();
                return Ok(());
            }
            // Not acknowledged: the client sends it again when it is back.
            Wake::Kept(Err(_)) => return Err(End::Bus),
            Wake::Read(Ok(0)) => return Err(End::Closed),
            Wake::Read(Ok(_)) => {
                self.mailbox.heard(keepalive::now_ms());
                return Ok(());
            }
            Wake::Read(Err(e)) => return Err(End::Io(e)),
            Wake::Unthrottled => {
                // A throttled client was sending all along: its silence is ours.
                self.mailbox.heard(keepalive::now_ms());
                return Ok(());
            }
            Wake::Event(event) => event,
        };
        self.on_event(event)?;
        for _ in 1..EVENTS_PER_FLUSH {
            let Some(event) = self.mailbox.try_recv() else {
                break;
            };
            self.on_event(event)?;
        }
        Ok(())
    }

    /// What the session waits for: the bus storing the oldest PUBLISH whose acknowledgement
    /// waits for that, an event in its mailbox, bytes from the client (unless throttled), or
    /// the end of the throttle.
    fn poll_wake<T: Transport>(&mut self, cx: &mut Context<'_>, transport: &mut T) -> Poll<Wake> {
        let oldest = self
            .acks_waiting
            .as_mut()
            .and_then(|acks| acks.0.front_mut());
        if let Some((Some(kept), _)) = oldest {
            if let Poll::Ready(stored) = Pin::new(kept).poll(cx) {
                return Poll::Ready(Wake::Kept(stored));
            }
        }
        if let Poll::Ready(event) = self.mailbox.poll_recv(cx) {
            return Poll::Ready(Wake::Event(event));
        }
        match &mut self.throttle {
            Some(throttle) => {
                ready!(throttle.as_mut().poll(cx));
                self.throttle = None;
                Poll::Ready(Wake::Unthrottled)
            }
            None => transport.poll_read(cx, &mut self.inbuf).map(Wake::Read),
        }
    }

    /// Writes what the session has to say (there is something). A write the client does not
    /// take while the hub drops the session for falling behind ends with `WouldBlock`: a
    /// client that stopped reading does not hold its session. (Not an async fn, whose state
    /// would keep a copy of each argument besides the write's.)
    fn flush<'a, T: Transport>(
        &'a mut self,
        transport: &'a mut T,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a {
        // Taken whole: an idle connection holds no output buffer either.
        let mut data = std::mem::take(&mut self.outbuf).freeze();
        let mailbox = &mut self.mailbox;
        std::future::poll_fn(move |cx| match transport.poll_write(cx, &mut data) {
            Poll::Pending if mailbox.poll_dropped(cx).is_ready() => {
                Poll::Ready(Err(io::ErrorKind::WouldBlock.into()))
            }
            written => written,
        })
    }

    /// Handles every whole packet in the input buffer, stopping at a PUBLISH that has to wait
    /// for the rate limit; says whether it handled a PUBLISH.
    async fn drain_input(&mut self) -> Result<bool, End> {
        let mut published = false;
        loop {
            let next = self.next_request();
            let Some((packet, extra)) = next? else { break };
            // Boxed: its state (the bridge, the bus) would otherwise be part of every
            // connection's task, idle or not. A subscription change (rare, and it may log
            // from the hub) runs in the connection's log context; a PUBLISH writes its own.
            let span = match packet {
                Packet::Publish(_) => {
                    published = true;
                    tracing::Span::none()
                }
                _ => self.span(),
            };
            let request = Box::pin(self.on_request(packet, extra).instrument(span));
            request.await?;
        }
        // An idle connection holds no input buffer.
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        }
        Ok(published)
    }

    /// Handles the buffered packets that need no waiting, up to the next PUBLISH, SUBSCRIBE or
    /// UNSUBSCRIBE, which it gives back (with what v5 says beside it); `None` once the buffer
    /// holds no whole packet or the rate limit holds the next PUBLISH back.
    fn next_request(&mut self) -> Result<Option<(Packet, v5::Extra)>, End> {
        let max = self.gateway.limits().max_payload_size;
        while self.throttle.is_none() {
            let whole = codec::packet_len(&self.inbuf).is_some_and(|n| n <= self.inbuf.len());
            let is_publish = self.inbuf.first().is_some_and(|b| b >> 4 == 3);
            if whole && is_publish {
                let limits = self.gateway.limits();
                if let Err(wait) = self.bucket.take(limits.publish_rate, limits.publish_burst) {
                    metrics::PUBLISHES_THROTTLED.inc();
                    self.throttle = Some(Box::pin(tokio::time::sleep(wait)));
                    break;
                }
            }
            let decoded = match self.version {
                Version::V4 => codec::decode_checked(&mut self.inbuf, max)
                    .map(|p| p.map(|p| (p, v5::Extra::default()))),
                Version::V5 => v5::decode(&mut self.inbuf, max),
            };
            let Some((packet, extra)) = decoded.map_err(End::Malformed)? else {
                break;
            };
            codec::check(&packet).map_err(End::Malformed)?;
            if let Some(packet) = self.on_control(packet, &extra)? {
                return Ok(Some((packet, extra)));
            }
        }
        Ok(None)
    }

    /// Handles a PUBLISH, SUBSCRIBE or UNSUBSCRIBE (what waits on the bus or the store);
    /// `extra` has what v5 said beside it (a PUBLISH's expiry and properties, a SUBSCRIBE's
    /// No Local filters).
    async fn on_request(&mut self, packet: Packet, extra: v5::Extra) -> Result<(), End> {
        let sid = self.registration.id;
        match packet {
            Packet::Publish(publish) => self.on_publish(publish, extra).await?,
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe, &extra.no_local).await,
            Packet::Unsubscribe(unsubscribe) => {
                let hub = &self.gateway.inner.hub;
                let removed: Vec<bool> = (unsubscribe.topics.iter())
                    .map(|filter| hub.unsubscribe(sid, filter))
                    .collect();
                if self.persistent {
                    if let Err(e) = hub.persist(sid).await {
                        warn!(error = %e, "unsubscription not made durable");
                    }
                }
                let pkid = unsubscribe.pkid;
                match self.version {
                    Version::V4 => self.send(Packet::UnsubAck(UnsubAck::new(pkid))),
                    Version::V5 => self.answer(v5::Answer::UnsubAck { pkid, removed }),
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Handles a packet that needs no waiting; gives back the others, for [`Self::on_request`].
    fn on_control(&mut self, packet: Packet, extra: &v5::Extra) -> Result<Option<Packet>, End> {
        let sid = self.registration.id;
        match packet {
            Packet::Publish(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => {
                return Ok(Some(packet))
            }
            Packet::PingReq => self.send(Packet::PingResp),
            Packet::PubRel(rel) => self.send(Packet::PubComp(PubComp::new(rel.pkid))),
            Packet::PubAck(ack) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                while self.outstanding < self.receive_max {
                    let next = self.unacked.as_mut().and_then(|u| u.held.pop_front());
                    let Some((qos, message)) = next else {
                        break;
                    };
                    self.deliver(qos, message)?;
                }
                if let Some(unacked) = &mut self.unacked {
                    let inflight = &mut unacked.inflight;
                    let Some(i) = inflight.iter().position(|m| m.pkid == Some(ack.pkid)) else {
                        return Ok(None);
                    };
                    let Some(acked) = inflight.remove(i) else {
                        return Ok(None);
                    };
                    if let Some(receipt) = &acked.receipt {
                        receipt.acknowledge();
                    }
                    if let Some(event) = acked.event {
                        self.acked_event = self.acked_event.max(event);
                        self.gateway.inner.hub.acked_event(sid, event);
                    }
                }
            }
            // callbus delivers at most QoS 1.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Disconnect => return Err(self.on_disconnect(extra)),
            Packet::Connect(_) => return Err(End::Protocol("second CONNECT")),
            _ => return Err(End::Protocol("server-only packet from client")),
        }
        Ok(None)
    }

    /// The client said DISCONNECT. MQTT 5: with reason 0x04 its Will goes out all the same,
    /// and a Session Expiry Interval replaces the CONNECT's (MQTT-3.14.2-2: not from 0 to
    /// more, a protocol error).
    fn on_disconnect(&mut self, extra: &v5::Extra) -> End {
        if let Some(secs) = extra.session_expiry {
            if !self.persistent && secs > 0 {
                return End::Protocol("Session Expiry Interval set in DISCONNECT after 0");
            }
            let expiry = Duration::from_secs(u64::from(secs));
            self.gateway
                .inner
                .hub
                .set_expiry(self.registration.id, expiry);
        }
        match extra.with_will {
            true => End::DisconnectWithWill,
            false => End::Disconnect,
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), End> {
        match event {
            Event::Deliver(qos, message) => self.deliver(qos, message),
            Event::Replaced => Err(End::Replaced),
            Event::TooSlow => Err(End::TooSlow),
            Event::BusClosed => Err(End::Bus),
            Event::Shutdown => Err(End::Shutdown),
            // Checked here again: the client may have been heard since the wheel looked, and
            // a throttled session is not reading on purpose.
            Event::Silent if self.throttle.is_none() => {
                match self.mailbox.is_silent(keepalive::now_ms()) {
                    true => Err(End::Idle),
                    false => Ok(()),
                }
            }
            Event::Silent => Ok(()),
        }
    }

    /// The deliveries waiting for an acknowledgement or room (made on first use).
    fn unacked(&mut self) -> &mut Unacked {
        self.unacked.get_or_insert_with(Box::default)
    }

    fn send(&mut self, packet: Packet) {
        match self.version {
            Version::V4 => codec::encode(packet, &mut self.outbuf),
            Version::V5 => v5::encode(packet, &mut self.outbuf),
        }
    }

    /// Writes what only MQTT 5 can say. A PUBACK's Reason String goes only to a client that
    /// did not turn them off (Request Problem Information 0: MQTT-3.1.2-29) and only if it
    /// keeps the packet within the client's Maximum Packet Size (MQTT-3.4.2-2).
    fn answer(&mut self, mut answer: v5::Answer) {
        if let v5::Answer::PubAck { reason, .. } = &mut answer {
            // Fixed header, packet id, reason, property length, the property's id and length.
            let size = 2 + 2 + 1 + 1 + 3 + reason.len();
            let too_large = self.max_packet_out.is_some_and(|max| size > max as usize);
            if !self.problem_info || too_large {
                reason.clear();
            }
        }
        v5::answer(answer, &mut self.outbuf);
    }

    fn acknowledge(&mut self, qos: QoS, pkid: u16) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(pkid))),
            QoS::ExactlyOnce => self.send(Packet::PubRec(PubRec::new(pkid))),
        }
    }

    /// Writes a PUBLISH's acknowledgement (with `write`) once `kept` resolved and every
    /// acknowledgement before it is written; at once when nothing waits.
    fn acknowledge_after(&mut self, kept: Option<Kept>, write: impl FnOnce(&mut Self)) {
        if kept.is_none() && self.acks_waiting.is_none() {
            return write(self);
        }
        let mark = self.outbuf.len();
        write(self);
        let ack = self.outbuf.split_off(mark).freeze();
        let acks = self.acks_waiting.get_or_insert_with(Box::default);
        acks.0.push_back((kept.map(SyncFuture::new), ack));
    }

    /// The oldest waiting PUBLISH is stored: writes its acknowledgement, and those after it
    /// that wait for nothing else.
    fn release_acks(&mut self) {
        let Some(AcksWaiting(acks)) = self.acks_waiting.as_deref_mut() else {
            return;
        };
        if let Some(oldest) = acks.front_mut() {
            oldest.0 = None;
        }
        while let Some((None, ack)) = acks.front() {
            self.outbuf.extend_from_slice(ack);
            acks.pop_front();
        }
        if acks.is_empty() {
            self.acks_waiting = None;
        }
    }

    /// Writes a message the hub routed here. A persistent session keeps QoS 1 messages until
    /// the client acknowledges them; one that lets too many wait is ended (and kept).
    fn deliver(&mut self, qos: QoS, mut message: Queued) -> Result<(), End> {
        if qos != QoS::AtMostOnce && self.outstanding >= self.receive_max {
            metrics::DELIVERIES_HELD.inc();
            let held = &mut self.unacked().held;
            held.push_back((qos, message));
            if held.len() > MAILBOX_MESSAGES {
                return Err(End::TooSlow);
            }
            return Ok(());
        }
        let Ok(name) = std::str::from_utf8(&message.topic) else {
            return Ok(());
        };
        // MQTT 5: a packet larger than the client accepts is not sent (nor kept). And nothing
        // is sent once it expired.
        let size = name.len() + message.payload.len() + PUBLISH_OVERHEAD;
        let too_large = self.max_packet_out.is_some_and(|max| size > max as usize);
        // Seconds it has left, for a message that expires (the clock is read only then).
        let left = message.expires_at_ms.map(|at| {
            let now = crate::model::call::now_ms();
            at.saturating_sub(now).div_ceil(1000)
        });
        let expired = left == Some(0);
        if too_large || expired {
            if too_large {
                metrics::DELIVERIES_TOO_LARGE.inc();
            }
            if let Some(receipt) = &message.receipt {
                receipt.acknowledge();
            }
            return Ok(());
        }
        self.outbuf.reserve(size);
        let mut publish = Publish::from_bytes(name, qos, message.payload.clone());
        if qos != QoS::AtMostOnce {
            publish.dup = message.dup;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            publish.pkid = self.next_pkid;
            self.outstanding = self.outstanding.saturating_add(1);
        }
        let pkid = publish.pkid;
        // MQTT 5 tells the client how long the message has left, and what the publisher
        // attached.
        match (self.version, left, message.extras.as_deref()) {
            (Version::V5, None, None) | (Version::V4, ..) => self.send(Packet::Publish(publish)),
            (Version::V5, left, extras) => {
                let secs = left.map(|secs| secs.min(u64::from(u32::MAX)) as u32);
                v5::encode_publish(publish, secs, extras, &mut self.outbuf);
            }
        }
        metrics::MESSAGES_SENT.inc();
        if qos != QoS::AtMostOnce && self.persistent {
            message.pkid = Some(pkid);
            let inflight = &mut self.unacked().inflight;
            inflight.push_back(message);
            if inflight.len() > MAILBOX_MESSAGES {
                return Err(End::TooSlow);
            }
        }
        Ok(())
    }

    /// A resumed session: what it had not acknowledged again with DUP, then (after telling the
    /// client if its queue overflowed) what was queued while it was away.
    fn replay(&mut self, resumed: Resumed) -> Result<(), End> {
        self.next_pkid = resumed.last_pkid;
        self.no_local = resumed.no_local;
        for message in resumed.inflight {
            let (Ok(name), Some(pkid)) = (std::str::from_utf8(&message.topic), message.pkid) else {
                continue;
            };
            let mut publish = Publish::from_bytes(name, QoS::AtLeastOnce, message.payload.clone());
            publish.pkid = pkid;
            publish.dup = true;
            self.outstanding = self.outstanding.saturating_add(1);
            self.send(Packet::Publish(publish));
            self.unacked().inflight.push_back(message);
        }
        if resumed.dropped > 0 {
            let detail = format!(
                "{} messages were dropped while you were away (the session's queue is bounded)",
                resumed.dropped
            );
            let event = error_event(ErrorCode::QueueOverflow, &detail, &ErrorRef::default());
            let topic = Bytes::from(notifications_topic(self.identity.user_id()));
            self.deliver(QoS::AtLeastOnce, Queued::new(topic, Bytes::from(event)))?;
        }
        for m in resumed.queue {
            self.deliver(QoS::AtLeastOnce, m)?;
        }
        Ok(())
    }
}
