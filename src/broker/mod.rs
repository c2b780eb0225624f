//! callbus's client-facing MQTT side: the listeners (TCP, TLS and WebSocket), one session per
//! connection, and the hub that owns every session and routes the bus's deliveries to them.
//!
//! rumqttd has no topic ACL, so no rumqttd listener is ever started: clients talk only to these
//! listeners. A connection is admitted by [`connect`] (CONNECT, JWT), then run by [`session`],
//! which checks every SUBSCRIBE and PUBLISH with the [`Bridge`] and hands accepted publishes to
//! the bus; the bus hands them back in order to the [`hub::Hub`], which fills the sessions'
//! mailboxes.

mod codec;
mod connect;
pub(crate) mod hub;
mod keepalive;
mod session;
pub mod tcp;
mod v5;
pub mod ws;

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bridge::Bridge;
use crate::bus::Publisher;
use crate::config::GatewayConfig;
pub use hub::{Hub, Peers};

/// What a client connection runs over (named in its log lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Tls,
    Ws,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
        })
    }
}

/// A byte stream carrying MQTT packets (a TCP socket, or WebSocket binary frames).
pub trait Transport: Send + 'static {
    /// Appends received bytes to `buf`; `Ok(0)` means the peer closed. Polled (not a future
    /// kept across the wait) so that an idle connection's task holds no read state.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>>;
    /// Writes `data` (taking it as it goes) and flushes; `Ready(Ok)` once all of it is out.
    fn poll_write(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>>;
    /// Closes the stream politely, ignoring errors.
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// [`Transport::poll_read`] as a future. Cancel-safe.
    fn read(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send {
        std::future::poll_fn(move |cx| self.poll_read(cx, buf))
    }

    /// Writes all of `data`.
    fn write(&mut self, mut data: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(move |cx| self.poll_write(cx, &mut data))
    }
}

/// Decodes `bytes` fed in reads of `cut` bytes as a session of MQTT 3.1.1 (or 5) does,
/// re-encoding each packet (for the fuzz targets: see [`crate::fuzzing`]).
#[doc(hidden)]
pub fn fuzz_codec(bytes: &[u8], cut: usize, max: usize, mqtt5: bool) {
    let version = match mqtt5 {
        true => codec::Version::V5,
        false => codec::Version::V4,
    };
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for read in bytes.chunks(cut) {
        buf.extend_from_slice(read);
        let _ = codec::connect_protocol_level(&buf);
        let _ = codec::packet_len(&buf);
        if version == codec::Version::V5 {
            let mut copy = buf.clone();
            let _ = v5::read_connect(&mut copy, max);
        }
        loop {
            let decoded = match version {
                codec::Version::V4 => codec::decode_checked(&mut buf, max)
                    .map(|p| p.map(|p| (p, ())))
                    .map_err(|_| rumqttc::mqttbytes::Error::MalformedPacket),
                codec::Version::V5 => v5::decode(&mut buf, max)
                    .map(|p| p.map(|(p, _)| (p, ())))
                    .map_err(|_| rumqttc::mqttbytes::Error::MalformedPacket),
            };
            match decoded {
                Ok(Some((packet, _))) => match version {
                    codec::Version::V4 => codec::encode(packet, &mut out),
                    codec::Version::V5 => v5::encode(packet, &mut out),
                },
                Ok(None) => break,
                // A session closes the connection here.
                Err(_) => return,
            }
        }
        out.clear();
    }
}

/// Broker-side client ids are `<user id>.<client id>`: user and client ids never contain `.`,
/// so no user can name (and so take over) another user's session.
pub fn namespaced_client_id(user_id: &str, client_id: &str) -> String {
    format!("{user_id}.{client_id}")
}

/// A pre-CONNECT socket's share of `pending_connect_bytes`, given back when it is dropped.
pub(crate) struct PendingBytes<'a> {
    total: &'a AtomicUsize,
    held: usize,
}

impl<'a> PendingBytes<'a> {
    pub(crate) fn new(total: &'a AtomicUsize) -> Self {
        Self { total, held: 0 }
    }

    /// Holds `len` bytes in all (more or fewer than before); false, holding nothing more, when
    /// that would take every pre-CONNECT socket's total past `budget`.
    pub(crate) fn hold(&mut self, len: usize, budget: usize) -> bool {
        if len <= self.held {
            return true;
        }
        let more = len - self.held;
        let before = self.total.fetch_add(more, Ordering::Relaxed);
        if before + more > budget {
            self.total.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.held = len;
        true
    }
}

impl Drop for PendingBytes<'_> {
    fn drop(&mut self) {
        self.total.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// What every connection shares: the hub, the bus, the policy, the limits, the shutdown signal.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<GatewayInner>,
}

struct GatewayInner {
    hub: Arc<Hub>,
    publisher: Publisher,
    bridge: Bridge,
    limits: GatewayConfig,
    permits: Arc<Semaphore>,
    /// Sockets not yet past CONNECT.
    pending: crate::net::Gate,
    /// Bytes those sockets hold together (see [`PendingBytes`]).
    pending_bytes: AtomicUsize,
    connect_rate: crate::rate::KeyedRate<std::net::IpAddr>,
    shutdown: CancellationToken,
    /// Where sessions run (so that shutdown can wait for them).
    tracker: TaskTracker,
    /// Drops clients silent past their keepalive.
    keepalive: Arc<keepalive::Keepalive>,
}

impl Gateway {
    pub fn new(
        hub: Arc<Hub>,
        publisher: Publisher,
        bridge: Bridge,
        limits: GatewayConfig,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let pending = crate::net::Gate::new(
            crate::net::share_of_files(limits.max_pending_connects),
            &crate::metrics::PENDING_REFUSED,
        );
        let per_address = limits.connect_rate_per_address;
        let connect_rate = crate::rate::KeyedRate::new(f64::from(per_address), per_address);
        // At shutdown every session is told through its mailbox.
        let on_shutdown = (hub.clone(), shutdown.clone());
        tokio::spawn(async move {
            on_shutdown.1.cancelled().await;
            on_shutdown.0.shutdown();
        });
        Self {
            inner: Arc::new(GatewayInner {
                hub,
                publisher,
                bridge,
                limits,
                permits,
                pending,
                pending_bytes: AtomicUsize::new(0),
                connect_rate,
                keepalive: keepalive::Keepalive::start(shutdown.clone()),
                shutdown,
                tracker,
            }),
        }
    }

    pub fn limits(&self) -> &GatewayConfig {
        &self.inner.limits
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The gate of sockets not yet past CONNECT (TCP sockets enter it at accept, WebSockets at
    /// the upgrade).
    pub fn pending(&self) -> &crate::net::Gate {
        &self.inner.pending
    }

    /// Runs one client connection from `peer` to its end; `kind` names the transport in logs.
    /// `pending` is its place among the sockets not yet past CONNECT (told to go when newer
    /// ones need it), given back at CONNECT, where it takes a connection slot instead.
    pub async fn serve<T: Transport>(
        &self,
        transport: T,
        kind: Kind,
        peer: SocketAddr,
        pending: crate::net::Place,
    ) {
        let span = tracing::info_span!("mqtt", %kind, %peer, client = tracing::field::Empty);
        let origin = session::Origin { kind, peer };
        async move {
            let mut transport = transport;
            let admitted = connect::admit(self, &mut transport, peer.ip(), &pending).await;
            drop(pending);
            let Some((admitted, permit)) = admitted else {
                transport.close().await;
                return;
            };
            let Some((session, replayed)) =
                session::start(self, &mut transport, admitted, origin).await
            else {
                return;
            };
            match replayed {
                // Replaying what was kept already ended it.
                Err(end) => session.finish(transport, end).await,
                // The rest runs on a task of its own: this one (admission, setup) ends here,
                // and an idle connection keeps only what its session needs (not this span:
                // the session makes its log context when it writes a line).
                Ok(()) => {
                    let run = session::serve(session, transport, permit);
                    self.inner.tracker.spawn(run);
                }
            }
        }
        .instrument(span)
        .await
    }
}
