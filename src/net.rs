//! Accepting TCP connections, with TLS when configured: the one accept loop behind the MQTT
//! listener and the HTTPS listener, with one handshake timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::tls::TlsAcceptor;

/// An accepted connection: plain TCP, or TLS over it.
pub type Stream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections until `shutdown`, running `handle` for each on its own task tracked by
/// `tracker`. Sockets set `TCP_NODELAY` (signaling is small and latency-bound); an accept error
/// backs off briefly and never ends the loop; a failed handshake ends only its connection.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(Stream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        if let Err(e) = stream.set_nodelay(true) {
            warn!(error = %e, "set_nodelay failed");
        }
        let (tls, handle) = (tls.clone(), handle.clone());
        tracker.spawn(async move {
            let Some(tls) = tls else {
                return handle(Either::Left(stream), peer).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => handle(Either::Right(stream), peer).await,
                Ok(Err(e)) => info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
