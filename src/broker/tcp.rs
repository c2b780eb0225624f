//! MQTT over TCP (TLS where configured), for mobile clients and `mosquitto_sub`/`mosquitto_pub`.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::task::TaskTracker;

use super::{Gateway, Kind, Transport};
use crate::net::{accept_loop, Stream};

struct TcpTransport(Stream);

thread_local! {
    /// Where plain TCP reads land before they are copied to the session's buffer.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 4096]);
}

impl Transport for TcpTransport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        // Wait for data holding no buffer, then read through the thread's scratch chunk: the
        // session's buffer holds only what arrived (an idle connection's, nearly nothing). (A
        // chunk on the stack was zeroed on every read: a tenth of a call flow's instructions.)
        // A read that leaves room in the chunk drained the socket, and tokio then waits for
        // the next readiness event without trying another read that would only say
        // `WouldBlock` (a system call per message saved).
        let stream = Pin::new(&mut self.0);
        SCRATCH.with_borrow_mut(|chunk| {
            let mut read = ReadBuf::new(chunk);
            ready!(stream.poll_read(cx, &mut read))?;
            buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(read.filled().len()))
        })
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let mut stream = Pin::new(&mut self.0);
        while !data.is_empty() {
            match ready!(stream.as_mut().poll_write(cx, data))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => data.advance(n),
            }
        }
        stream.poll_flush(cx)
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// Accepts MQTT clients until the gateway shuts down.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    tracker: TaskTracker,
    tls: Option<crate::tls::TlsAcceptor>,
) {
    let shutdown = gateway.shutdown_token().clone();
    let gate = gateway.pending().clone();
    accept_loop(
        listener,
        tls,
        gate,
        shutdown,
        tracker,
        move |stream, peer, pending| {
            let gateway = gateway.clone();
            async move {
                let kind = match &stream {
                    Either::Left(_) => Kind::Tcp,
                    Either::Right(_) => Kind::Tls,
                };
                gateway
                    .serve(TcpTransport(stream), kind, peer, pending)
                    .await
            }
        },
    )
    .await
}

/// Runs the MQTT-over-TCP listener and its sessions on `threads` threads of their own, each a
/// single-threaded runtime accepting from the same socket: a message between two clients of
/// one thread is read, routed and written without waking another thread. (On tokio's shared
/// worker pool every socket event woke an idle worker as well, about 15 µs of a relayed
/// message's latency at a light load: BENCHMARKS.md, relay.) Sessions are tracked by
/// `tracker` like every other; each thread ends once the server stopped and they are done.
/// Returns once every thread accepts.
pub fn serve_on_threads(
    listener: TcpListener,
    threads: usize,
    gateway: Gateway,
    tracker: TaskTracker,
    tls: Option<crate::tls::TlsAcceptor>,
) -> io::Result<()> {
    let listener = listener.into_std()?;
    let (started, starting) = std::sync::mpsc::channel();
    let threads = threads.max(1);
    for n in 0..threads {
        let listener = listener.try_clone()?;
        let (gateway, tracker, tls) = (gateway.clone(), tracker.clone(), tls.clone());
        let started = started.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("mqtt-tcp-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(()));
                    let shutdown = gateway.shutdown_token().clone();
                    tracker.spawn(serve(listener, gateway, tracker.clone(), tls));
                    // Sessions run here until they end after the server stopped (bounded).
                    shutdown.cancelled().await;
                    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
                })
            })?;
    }
    // Only the threads hold senders now: one that ends without starting is noticed.
    drop(started);
    for _ in 0..threads {
        starting
            .recv()
            .map_err(|_| io::Error::other("an MQTT thread ended"))??;
    }
    Ok(())
}
