//! MQTT over WebSocket at `/mqtt` on the HTTP port, for browser clients (MQTT.js). Each binary
//! frame carries MQTT bytes; packets may span frames or share one.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use std::io;
use std::net::SocketAddr;
use std::task::{ready, Context, Poll};

use super::{Gateway, Kind, Transport};

/// Boxed: a WebSocket is 368 bytes, and each move of the transport in an async fn keeps its
/// own copy in the connection task's state.
struct WsTransport(Box<WebSocket>);

impl Transport for WsTransport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        loop {
            match ready!(self.0.poll_next_unpin(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(0)),
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    buf.extend_from_slice(&data);
                    return Poll::Ready(Ok(data.len()));
                }
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary frames",
                    )))
                }
                Some(Ok(_)) => {} // ping, pong, empty frame
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        // One frame per write: once the frame is handed over, `data` is empty and what is left
        // is the flush.
        if !data.is_empty() {
            ready!(self.0.poll_ready_unpin(cx)).map_err(io::Error::other)?;
            let frame = Message::Binary(std::mem::take(data));
            self.0.start_send_unpin(frame).map_err(io::Error::other)?;
        }
        self.0.poll_flush_unpin(cx).map_err(io::Error::other)
    }

    async fn close(&mut self) {
        let _ = self.0.send(Message::Close(None)).await;
    }
}

/// `GET /mqtt`: upgrades to a WebSocket, answering the subprotocol the client offered (`mqtt`,
/// or `mqttv3.1` for older clients; browsers drop the socket on any other answer).
pub async fn upgrade(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    // Room for the largest packet plus framing.
    let max = gateway.limits().max_payload_size + 16;
    // tungstenite's read buffer is allocated per socket up front (its default, 128 KiB, would
    // dominate an idle connection's memory; 4 KiB was still a third of it). Most MQTT packets
    // fit in 1 KiB; a larger frame is read in several chunks.
    ws.protocols(["mqtt", "mqttv3.1"])
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            gateway
                .serve(WsTransport(Box::new(socket)), Kind::Ws, peer)
                .await
        })
}
