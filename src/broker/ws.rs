//! MQTT over WebSocket at `/mqtt` on the HTTP port, for browser clients (MQTT.js). Each binary
//! frame carries MQTT bytes; packets may span frames or share one.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use std::io;
use std::net::SocketAddr;

use super::{Gateway, Transport};

/// Boxed: a WebSocket is 368 bytes, and each move of the transport in an async fn keeps its
/// own copy in the connection task's state.
struct WsTransport(Box<WebSocket>);

impl Transport for WsTransport {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.0.recv().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    buf.extend_from_slice(&data);
                    return Ok(data.len());
                }
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary frames",
                    ))
                }
                Some(Ok(_)) => {} // ping, pong, empty frame
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0
            .send(Message::Binary(data))
            .await
            .map_err(io::Error::other)
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
                .serve(WsTransport(Box::new(socket)), "ws", peer)
                .await
        })
}
