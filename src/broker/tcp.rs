//! Plain MQTT 3.1.1 over TCP, for mobile clients and `mosquitto_sub`/`mosquitto_pub`.

use bytes::{Bytes, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{Gateway, Transport};

/// A byte stream: a plain TCP socket or TLS over one.
struct TcpTransport<S>(S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for TcpTransport<S> {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        self.0.read_buf(buf).await
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// Accepts TCP clients until the gateway shuts down. Each connection runs on its own task,
/// tracked by `tracker`; an accept error backs off briefly and never ends the loop.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    tracker: TaskTracker,
    tls: Option<crate::tls::TlsAcceptor>,
) {
    let shutdown = gateway.shutdown_token().clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Signaling is small and latency-bound: never wait on Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    warn!(error = %e, "set_nodelay failed");
                }
                let gateway = gateway.clone();
                let tls = tls.clone();
                tracker.spawn(async move {
                    let Some(tls) = tls else {
                        let peer = format!("tcp:{peer}");
                        return gateway.serve(TcpTransport(stream), peer).await;
                    };
                    // The TLS handshake counts against the CONNECT deadline.
                    let limit = gateway.limits().connect_timeout();
                    match tokio::time::timeout(limit, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let peer = format!("tls:{peer}");
                            gateway.serve(TcpTransport(stream), peer).await
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
