//! Real MQTT clients for the tests: rumqttc over TCP or WebSocket, and hand-made packets.

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode, Transport,
};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{TestServer, WAIT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Ws,
}

pub const BOTH: [Via; 2] = [Via::Tcp, Via::Ws];

/// A message a client received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }
}

/// A real MQTT client (rumqttc) with its event loop on a task.
pub struct Client {
    pub client: AsyncClient,
    /// The CONNACK's session-present flag.
    pub session_present: bool,
    events: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
    /// Messages that arrived while waiting for an acknowledgement; `recv` returns them first.
    held: std::collections::VecDeque<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    pub(super) async fn connect(
        server: &TestServer,
        via: Via,
        client_id: &str,
        username: &str,
        password: &str,
        configure: impl FnOnce(&mut MqttOptions),
    ) -> Result<Client, ConnectionError> {
        let ports = (server.http.port(), server.mqtt.port());
        Self::connect_to(ports, via, client_id, username, password, configure).await
    }

    /// Connects to the server listening on `(http, mqtt)` ports of 127.0.0.1.
    pub async fn connect_to(
        (http, mqtt): (u16, u16),
        via: Via,
        client_id: &str,
        username: &str,
        password: &str,
        configure: impl FnOnce(&mut MqttOptions),
    ) -> Result<Client, ConnectionError> {
        let mut options = match via {
            Via::Tcp => MqttOptions::new(client_id, "127.0.0.1", mqtt),
            Via::Ws => {
                let url = format!("ws://127.0.0.1:{http}/mqtt");
                let mut o = MqttOptions::new(client_id, url, http);
                o.set_transport(Transport::Ws);
                o
            }
        };
        options
            .set_credentials(username, password)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(256 * 1024, 256 * 1024);
        configure(&mut options);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return; // no reconnects: tests see every disconnect
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("CONNACK in time")
            .expect("event loop alive");
        match first {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(Client {
                client,
                session_present: ack.session_present,
                events,
                held: Default::default(),
                task,
            }),
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(e) => {
                task.abort();
                Err(e)
            }
        }
    }

    /// Next packet (or the connection's end), bounded by [`WAIT`].
    pub async fn next_packet(&mut self) -> Result<Packet, ConnectionError> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an MQTT event in time")
            .unwrap_or(Err(ConnectionError::RequestsDone))
    }

    /// Subscribes and waits for the SUBACK's return codes.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let topics: Vec<_> = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce))
            .collect();
        self.client.subscribe_many(topics).await.expect("subscribe");
        loop {
            match self.next_packet().await {
                Ok(Packet::SubAck(ack)) => return ack.return_codes,
                Ok(Packet::Publish(p)) => self.hold(p),
                Ok(_) => {}
                Err(e) => panic!("connection ended before SUBACK: {e:?}"),
            }
        }
    }

    /// Publishes with QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
        loop {
            match self.next_packet().await {
                Ok(Packet::PubAck(_)) => return,
                Ok(Packet::Publish(p)) => self.hold(p),
                Ok(_) => {}
                Err(e) => panic!("connection ended before PUBACK: {e:?}"),
            }
        }
    }

    /// Queues every payload at once with QoS 1 (the client keeps up to 100 in flight), then
    /// waits for all their PUBACKs: a publisher at full speed.
    pub async fn publish_all(&mut self, topic: &str, payloads: impl IntoIterator<Item = String>) {
        let mut sent = 0;
        for payload in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue publish");
            sent += 1;
        }
        self.acknowledged(sent).await;
    }

    /// Waits for `sent` PUBACKs (messages that come meanwhile are kept for `recv`).
    pub async fn acknowledged(&mut self, sent: usize) {
        let mut acked = 0;
        while acked < sent {
            match self.next_packet().await {
                Ok(Packet::PubAck(_)) => acked += 1,
                Ok(Packet::Publish(p)) => self.hold(p),
                Ok(_) => {}
                Err(e) => panic!("the publisher was cut off after {acked} PUBACKs: {e:?}"),
            }
        }
    }

    /// Publishes JSON with QoS 1 and waits for the PUBACK.
    pub async fn publish_json(&mut self, topic: &str, value: Value) {
        self.publish(topic, value.to_string()).await;
    }

    fn hold(&mut self, p: rumqttc::Publish) {
        self.held.push_back(Received {
            topic: p.topic,
            payload: p.payload.to_vec(),
            qos: p.qos,
        });
    }

    /// The next message delivered to this client (skipping acks).
    pub async fn recv(&mut self) -> Received {
        if let Some(held) = self.held.pop_front() {
            return held;
        }
        loop {
            match self.next_packet().await {
                Ok(Packet::Publish(p)) => {
                    return Received {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: p.qos,
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("connection ended while waiting for a message: {e:?}"),
            }
        }
    }

    /// The next message whose JSON `type` is `kind` (other messages are skipped).
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let msg = self.recv().await;
            let v = msg.json();
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Ends the connection with DISCONNECT and waits for callbus to close it: by then callbus
    /// has stored a persistent session (it closes the socket after storing).
    pub async fn leave(mut self) {
        self.client.disconnect().await.expect("DISCONNECT");
        assert!(self.closed().await, "a message came instead of the close");
    }

    /// Waits until the server closes this connection; returns false if a message came first.
    pub async fn closed(&mut self) -> bool {
        if !self.held.is_empty() {
            return false;
        }
        loop {
            match self.next_packet().await {
                Err(_) => return true,
                Ok(Packet::Publish(_)) => return false,
                Ok(_) => {}
            }
        }
    }
}

/// Whether a SUBACK return code granted the subscription.
pub fn granted(code: &SubscribeReasonCode) -> bool {
    matches!(code, SubscribeReasonCode::Success(_))
}

/// Encodes a CONNECT by hand (with an arbitrary protocol level), client id `raw1`, clean session.
pub fn raw_connect(level: u8, keep_alive: u16, password: &str) -> Vec<u8> {
    raw_connect_with(level, keep_alive, password, "raw1", true)
}

/// Encodes a CONNECT by hand.
pub fn raw_connect_with(
    level: u8,
    keep_alive: u16,
    password: &str,
    client_id: &str,
    clean: bool,
) -> Vec<u8> {
    let name: &[u8] = if level == 3 { b"MQIsdp" } else { b"MQTT" };
    let mut var = Vec::new();
    var.extend_from_slice(&(name.len() as u16).to_be_bytes());
    var.extend_from_slice(name);
    var.push(level);
    var.push(0b0100_0000 | if clean { 0b10 } else { 0 }); // password flag, clean session
    var.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        var.push(0); // no properties
    }
    var.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    var.extend_from_slice(client_id.as_bytes());
    var.extend_from_slice(&(password.len() as u16).to_be_bytes());
    var.extend_from_slice(password.as_bytes());
    let mut out = vec![0x10];
    let mut len = var.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&var);
    out
}

/// Encodes a SUBSCRIBE (packet id 1) to one filter at QoS 1 by hand.
pub fn raw_subscribe(filter: &str) -> Vec<u8> {
    let filter = filter.as_bytes();
    let mut subscribe = vec![0x82, (2 + 2 + filter.len() + 1) as u8, 0, 1];
    subscribe.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(filter);
    subscribe.push(1);
    subscribe
}

/// A raw TCP connection that has sent a good CONNECT and read its CONNACK.
pub async fn raw_session(s: &TestServer, keep_alive: u16, user: &str) -> TcpStream {
    let mut stream = TcpStream::connect(s.mqtt).await.unwrap();
    stream
        .write_all(&raw_connect(4, keep_alive, &s.token(user)))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    stream
}
