//! MQTT over WebSocket at `/mqtt` on the HTTP port, for browser clients (MQTT.js). Each binary
//! frame carries MQTT bytes; packets may span frames or share one.
//!
//! The WebSocket layer answers pings and closes by itself, and would queue those answers
//! without limit for a client that sends them and never reads. Two bounds hold instead: the
//! socket's write buffer is capped at one 64 KiB frame (writes are cut into such frames, and a
//! pong that does not fit replaces the one waiting), and control frames (pings, pongs) are budgeted; a client past the budget is
//! disconnected and counted (`callbus_ws_control_flood_total`). Browsers cannot send pings at
//! all, and libraries that can send one every few seconds.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use std::io;
use std::net::SocketAddr;
use std::task::{ready, Context, Poll};

use super::{Gateway, Kind, Transport};
use crate::metrics;
use crate::rate::TokenBucket;

/// The largest frame written: a session's write (a replayed queue, say) is cut into frames.
const FRAME_BYTES: usize = 64 * 1024;
/// What a socket may hold unsent: one frame, plus the pong and close that ride along.
const MAX_UNSENT: usize = FRAME_BYTES + 4096;

/// Control frames a connection may send per second, sustained.
const CONTROL_RATE: u32 = 10;
/// Control frames a connection may send at once above the sustained rate.
const CONTROL_BURST: u32 = 100;

/// Boxed: a WebSocket is 368 bytes, and each move of the transport in an async fn keeps its
/// own copy in the connection task's state.
struct WsTransport(Box<(WebSocket, TokenBucket)>);

impl WsTransport {
    /// Takes one control frame from the budget; an error once the client is past it.
    fn control_frame(&mut self) -> io::Result<()> {
        match self.0 .1.take(CONTROL_RATE, CONTROL_BURST) {
            Ok(()) => Ok(()),
            Err(_) => {
                metrics::WS_CONTROL_FLOOD.inc();
                tracing::info!("WebSocket control frames past the budget: disconnecting");
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "too many WebSocket control frames",
                ))
            }
        }
    }
}

impl Transport for WsTransport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        loop {
            match ready!(self.0 .0.poll_next_unpin(cx)) {
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
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => self.control_frame()?,
                Some(Ok(_)) => {} // an empty binary frame
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        // Frames of at most FRAME_BYTES (MQTT packets may span frames), each handed over once
        // the last is out: what the socket holds unsent stays under its bound.
        while !data.is_empty() {
            ready!(self.0 .0.poll_ready_unpin(cx)).map_err(io::Error::other)?;
            let frame = Message::Binary(data.split_to(data.len().min(FRAME_BYTES)));
            self.0
                 .0
                .start_send_unpin(frame)
                .map_err(io::Error::other)?;
        }
        self.0 .0.poll_flush_unpin(cx).map_err(io::Error::other)
    }

    async fn close(&mut self) {
        let _ = self.0 .0.send(Message::Close(None)).await;
    }
}

/// `GET /mqtt`: upgrades to a WebSocket, answering the subprotocol the client offered (`mqtt`,
/// or `mqttv3.1` for older clients; browsers drop the socket on any other answer).
pub async fn upgrade(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    // A WebSocket is a socket that has not CONNECTed yet, like a new TCP one.
    let pending = gateway.pending().enter();
    // Room for the largest packet plus framing.
    let max = gateway.limits().max_payload_size + 16;
    // tungstenite's read buffer is allocated per socket up front (its default, 128 KiB, would
    // dominate an idle connection's memory; 4 KiB was still a third of it). Most MQTT packets
    // fit in 1 KiB; a larger frame is read in several chunks.
    ws.protocols(["mqtt", "mqttv3.1"])
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_UNSENT)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            gateway
                .serve(
                    WsTransport(Box::new((socket, TokenBucket::full(CONTROL_BURST)))),
                    Kind::Ws,
                    peer,
                    pending,
                )
                .await
        })
}
