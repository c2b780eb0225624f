//! MQTT over TCP (TLS where configured), for mobile clients and `mosquitto_sub`/`mosquitto_pub`.

use bytes::{Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::task::TaskTracker;

use super::{Gateway, Transport};
use crate::net::{accept_loop, Stream};

struct TcpTransport(Stream);

thread_local! {
    /// Where plain TCP reads land before they are copied to the session's buffer.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 4096]);
}

impl Transport for TcpTransport {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let Either::Left(tcp) = &mut self.0 else {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            return self.0.read_buf(buf).await;
        };
        // Wait for data holding no buffer, then read through the thread's scratch chunk: the
        // session's buffer holds only what arrived (an idle connection's, nearly nothing). (A
        // chunk on the stack was zeroed on every read: a tenth of a call flow's instructions.)
        loop {
            // (Polled directly: `readable()` is a 152-byte future in every idle connection.)
            std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
            let read: io::Result<usize> = SCRATCH.with_borrow_mut(|chunk| {
                let n = tcp.try_read(chunk)?;
                buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            });
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => return read,
            }
        }
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await
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
    accept_loop(listener, tls, shutdown, tracker, move |stream, peer| {
        let gateway = gateway.clone();
        async move {
            let kind = match &stream {
                Either::Left(_) => "tcp",
                Either::Right(_) => "tls",
            };
            gateway.serve(TcpTransport(stream), kind, peer).await
        }
    })
    .await
}
