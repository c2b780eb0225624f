//! Accepting TCP connections, with TLS when configured: the one accept loop behind the MQTT and
//! HTTP listeners, with one handshake timeout and a defined state when file descriptors run
//! out; and raising the open-file limit at startup.
//!
//! Each listener admits sockets through a [`Gate`]: past its size the oldest socket that has
//! not finished its request or CONNECT is closed (and counted), so one port's flood of sockets
//! that never finish (half-sent HTTP requests, CONNECTs that never come) holds at most the
//! gate's share of the process's file descriptors, the other port keeps accepting, and a real
//! client that finishes promptly gets through.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::metrics::{self, Metric};
use crate::sync::lock;
use crate::tls::TlsAcceptor;

/// An accepted connection: plain TCP, or TLS over it.
/// A TCP or TLS stream. The TLS state is boxed: inline, it made every plain TCP connection's
/// task 1.2 KiB larger, several times over (each move in an async fn keeps its own copy).
pub type Stream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// How long accepting pauses after running out of file descriptors (no busy loop).
const FD_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this interval while descriptors stay exhausted.
const FD_LOG_EVERY: Duration = Duration::from_secs(10);

/// Raises this process's soft open-file limit to its hard limit (services often start with a
/// soft limit of 1,024: 1,000 connections). Returns the limits now in force, (soft, hard).
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// The soft open-file limit in force (what the process may hold now).
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur,
        _ => 1024,
    }
}

/// A configured share of the open-file limit: `configured`, or with 0 a quarter of the limit
/// (at least 64).
pub fn share_of_files(configured: usize) -> usize {
    match configured {
        0 => usize::try_from(open_file_limit() / 4).map_or(usize::MAX, |n| n.max(64)),
        n => n,
    }
}

/// How many sockets a listener holds before it has decided what they are (a request head, a
/// CONNECT), and the counter of the ones it closed to make room. When it is full, a newcomer
/// takes the place of the oldest, which is told to go: a flood of sockets that never finish
/// must then open a gate's worth of them within the moment a real client needs to finish its
/// own, instead of merely keeping the gate full.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    max: usize,
    refused: &'static Metric,
    /// The places taken, oldest first (ids only grow), each with what tells it to go.
    places: Mutex<BTreeMap<u64, Arc<Notify>>>,
    next: AtomicU64,
}

/// A socket's place in a [`Gate`], given back when dropped.
pub struct Place {
    gate: Arc<GateInner>,
    id: u64,
    evicted: Arc<Notify>,
}

impl Gate {
    pub fn new(max: usize, refused: &'static Metric) -> Self {
        Self {
            inner: Arc::new(GateInner {
                max: max.max(1),
                refused,
                places: Mutex::default(),
                next: AtomicU64::new(0),
            }),
        }
    }

    /// A place for one more socket; when the gate is full, the oldest socket is told to go
    /// (and counted).
    pub fn enter(&self) -> Place {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut places = lock(&self.inner.places);
        if places.len() >= self.inner.max {
            if let Some((_, oldest)) = places.pop_first() {
                oldest.notify_one();
                self.inner.refused.inc();
            }
        }
        places.insert(id, evicted.clone());
        drop(places);
        Place {
            gate: self.inner.clone(),
            id,
            evicted,
        }
    }
}

impl Place {
    /// Resolves once a newer socket took this place.
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        lock(&self.gate.places).remove(&self.id);
    }
}

/// Whether an accept error means the process (or system) is out of file descriptors.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS handshake within [`HANDSHAKE_TIMEOUT`]; failures are logged. (The stream comes back
/// boxed: the connection's task keeps room for whatever it holds across an await, and an
/// unboxed handshake result is 1.2 KiB.)
async fn handshake(
    tls: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<Box<tokio_rustls::server::TlsStream<TcpStream>>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => Some(Box::new(stream)),
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Accepts connections until `shutdown`, running `handle` for each on its own task tracked by
/// `tracker`, with the place it took in `gate`. Sockets set `TCP_NODELAY` (signaling is small and latency-bound); an accept error
/// backs off briefly and never ends the loop; a failed handshake ends only its connection.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gate: Gate,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(Stream, SocketAddr, Place) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut last_fd_log: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if out_of_descriptors(&e) => {
                    // The connection waits in the listen backlog; sessions already admitted
                    // go on. Pause instead of retrying at once.
                    metrics::ACCEPTS_OUT_OF_FILES.inc();
                    if last_fd_log.is_none_or(|t| t.elapsed() >= FD_LOG_EVERY) {
                        warn!(error = %e, "out of file descriptors: not accepting for now");
                        last_fd_log = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(FD_BACKOFF).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let place = gate.enter();
        if let Err(e) = stream.set_nodelay(true) {
            warn!(error = %e, "set_nodelay failed");
        }
        let (tls, handle) = (tls.clone(), handle.clone());
        tracker.spawn(async move {
            let stream = match tls {
                None => Either::Left(stream),
                Some(tls) => {
                    let shaken = tokio::select! {
                        shaken = handshake(&tls, stream, peer) => shaken,
                        _ = place.evicted() => None,
                    };
                    match shaken {
                        Some(stream) => Either::Right(stream),
                        None => return,
                    }
                }
            };
            handle(stream, peer, place).await
        });
    }
}
