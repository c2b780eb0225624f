//! MQTT over TCP (TLS where configured), for mobile clients and `mosquitto_sub`/`mosquitto_pub`.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
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
    accept_loop(listener, tls, shutdown, tracker, move |stream, peer| {
        let gateway = gateway.clone();
        async move {
            let kind = match &stream {
                Either::Left(_) => Kind::Tcp,
                Either::Right(_) => Kind::Tls,
            };
            gateway.serve(TcpTransport(stream), kind, peer).await
        }
    })
    .await
}
