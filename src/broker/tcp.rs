//! Plain MQTT 3.1.1 over TCP, for mobile clients and `mosquitto_sub`/`mosquitto_pub`.

use bytes::{Bytes, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{Gateway, Transport};

struct TcpTransport(TcpStream);

impl Transport for TcpTransport {
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
pub async fn serve(listener: TcpListener, gateway: Gateway, tracker: TaskTracker) {
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
                tracker.spawn(async move {
                    gateway
                        .serve(TcpTransport(stream), format!("tcp:{peer}"))
                        .await
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
