//! Hand-made WebSocket clients and process figures, for tests that misbehave on purpose (a
//! library would hide the case: frames it never sends, replies it always reads).

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// WebSocket opcodes used here.
pub const BINARY: u8 = 0x2;
pub const PING: u8 = 0x9;

/// Opens a WebSocket to `/mqtt` at `http` offering `protocols`; the stream and the response
/// head (lower case).
pub async fn ws_open(http: SocketAddr, protocols: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(http)
        .await
        .expect("connect to the HTTP port");
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {protocols}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("handshake answer in time")
            .expect("read");
        assert!(n > 0, "closed during handshake");
        head.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&head).to_lowercase())
}

/// One masked client frame (the mask is fixed: the server must unmask whatever it is).
pub fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one server frame (unmasked); its opcode and payload.
pub async fn ws_read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0u8; 2];
            stream.read_exact(&mut n).await?;
            u64::from(u16::from_be_bytes(n))
        }
        127 => {
            let mut n = [0u8; 8];
            stream.read_exact(&mut n).await?;
            u64::from_be_bytes(n)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await?;
    Ok((head[0] & 0x0f, payload))
}

/// A process's resident memory in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many file descriptors a process holds.
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// User plus system CPU seconds a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / 100.0 // USER_HZ
}

/// An MQTT remaining length.
pub fn varint(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            return;
        }
    }
}

/// A packet from its first byte and body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// An MQTT string or binary field.
pub fn field(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A CONNECT written by hand, for what client libraries will not send.
#[derive(Clone, Default)]
pub struct RawConnect {
    /// 4 (3.1.1) or 5.
    pub level: u8,
    pub client_id: String,
    pub clean: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5: the Session Expiry Interval property.
    pub session_expiry: Option<u32>,
    /// (topic, payload) of a Last Will.
    pub will: Option<(String, Vec<u8>)>,
    /// MQTT 5: the Will's properties, encoded.
    pub will_properties: Vec<u8>,
    /// MQTT 5: more CONNECT properties, encoded (after the Session Expiry Interval).
    pub properties: Vec<u8>,
    /// Overrides the first byte (0x10) and the flags byte the fields above make.
    pub first_byte: Option<u8>,
    pub flags: Option<u8>,
}

impl RawConnect {
    pub fn v5(client_id: &str, user: &str, token: &str) -> Self {
        Self {
            level: 5,
            client_id: client_id.into(),
            clean: true,
            username: Some(user.into()),
            password: Some(token.into()),
            ..Self::default()
        }
    }

    pub fn v4(client_id: &str, user: &str, token: &str) -> Self {
        Self {
            level: 4,
            ..Self::v5(client_id, user, token)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        field(b"MQTT", &mut body);
        body.push(self.level);
        let mut flags = u8::from(self.clean) << 1;
        flags |= if self.will.is_some() { 0x04 } else { 0 };
        flags |= if self.username.is_some() { 0x80 } else { 0 };
        flags |= if self.password.is_some() { 0x40 } else { 0 };
        body.push(self.flags.unwrap_or(flags));
        body.extend_from_slice(&60u16.to_be_bytes());
        if self.level == 5 {
            let mut props = Vec::new();
            if let Some(secs) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&secs.to_be_bytes());
            }
            props.extend_from_slice(&self.properties);
            varint(props.len(), &mut body);
            body.extend_from_slice(&props);
        }
        field(self.client_id.as_bytes(), &mut body);
        if let Some((topic, payload)) = &self.will {
            if self.level == 5 {
                varint(self.will_properties.len(), &mut body);
                body.extend_from_slice(&self.will_properties);
            }
            field(topic.as_bytes(), &mut body);
            field(payload, &mut body);
        }
        for text in [&self.username, &self.password].into_iter().flatten() {
            field(text.as_bytes(), &mut body);
        }
        packet(self.first_byte.unwrap_or(0x10), &body)
    }
}

/// A raw MQTT connection: bytes out, whole packets (first byte, body) in.
pub struct RawMqtt {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawMqtt {
    pub async fn open(mqtt: SocketAddr) -> Self {
        let stream = TcpStream::connect(mqtt)
            .await
            .expect("connect to the MQTT port");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Opens a connection and sends `connect`; the CONNACK's (session present, code).
    pub async fn connect(mqtt: SocketAddr, connect: &RawConnect) -> (Self, (bool, u8)) {
        let mut raw = Self::open(mqtt).await;
        raw.send(&connect.encode()).await;
        let (first, body) = raw.next().await.expect("CONNACK");
        assert_eq!(first, 0x20, "expected CONNACK");
        (raw, (body[0] & 1 == 1, body[1]))
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next whole packet, or `None` once the server closed (bounded by [`WAIT`]).
    pub async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        let packet = self.next_whole().await?;
        let (head, _) = header(&packet)?;
        Some((packet[0], packet[head..].to_vec()))
    }

    /// The next whole packet's bytes, fixed header included.
    pub async fn next_whole(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some((head, len)) = header(&self.buf) {
                if self.buf.len() >= head + len {
                    return Some(self.buf.drain(..head + len).collect());
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a packet or the end in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the server closes the connection without sending anything more.
    pub async fn closed_silently(&mut self) -> bool {
        self.next().await.is_none()
    }

    /// Subscribes to `filter` at QoS 1 (packet id 1, v5 with empty properties at `level` 5)
    /// and returns the SUBACK's first code.
    pub async fn subscribe(&mut self, filter: &str, level: u8) -> u8 {
        self.subscribe_with(filter, level, 1).await
    }

    /// Subscribes to `filter` with subscription `options` (QoS in bits 0-1, v5's No Local
    /// bit 2); the SUBACK's first code.
    pub async fn subscribe_with(&mut self, filter: &str, level: u8, options: u8) -> u8 {
        let mut body = vec![0, 1];
        if level == 5 {
            body.push(0);
        }
        field(filter.as_bytes(), &mut body);
        body.push(options);
        self.send(&packet(0x82, &body)).await;
        loop {
            let (first, body) = self.next().await.expect("SUBACK");
            if first == 0x90 {
                return *body.last().expect("a SUBACK code");
            }
        }
    }
}

/// The fixed header's length and the remaining length of the packet at the start of `buf`, once
/// the header is in.
fn header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((2 + i, len));
        }
    }
    None
}

/// A v5 connection of `user` (Clean Start, no expiry) subscribed to `chat/c1` with `options`
/// (QoS in bits 0-1, No Local bit 2).
pub async fn subscribed_v5(mqtt: SocketAddr, user: &str, token: &str, options: u8) -> RawMqtt {
    let connect = RawConnect::v5(&format!("{user}-v5"), user, token);
    let (mut raw, (_, code)) = RawMqtt::connect(mqtt, &connect).await;
    assert_eq!(code, 0);
    let mut body = vec![0, 1, 0];
    field(b"chat/c1", &mut body);
    body.push(options);
    raw.send(&packet(0x82, &body)).await;
    let (kind, ack) = raw.next().await.expect("SUBACK");
    assert_eq!((kind, ack.last().copied()), (0x90, Some(1)));
    raw
}

/// A v5 QoS 1 PUBLISH on `chat/c1` (packet id `pkid`) with `properties` (encoded).
pub fn publish_v5(pkid: u16, properties: &[u8], text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    field(b"chat/c1", &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    varint(properties.len(), &mut body);
    body.extend_from_slice(properties);
    body.extend_from_slice(
        serde_json::json!({"type": "message", "text": text})
            .to_string()
            .as_bytes(),
    );
    packet(0x32, &body)
}

/// Sends `text` on `chat/c1` (QoS 1, packet id `pkid`) and reads up to its PUBACK, asserting
/// that no PUBLISH comes first (the sender holds `chat/c1` with No Local).
pub async fn publish_unechoed(raw: &mut RawMqtt, pkid: u16, text: &str) {
    raw.send(&publish_v5(pkid, &[], text)).await;
    loop {
        let (kind, _) = raw.next().await.expect("PUBACK");
        assert_ne!(kind >> 4, 3, "its own message came back");
        if kind == 0x40 {
            return;
        }
    }
}

/// Whether the next PUBLISH (acknowledged) says `text`.
pub async fn next_v5_says(raw: &mut RawMqtt, text: &str) -> bool {
    let got = next_v5_publish(raw).await;
    String::from_utf8_lossy(&got.payload).contains(text)
}

/// The next PUBLISH as rumqttc's v5 codec reads it (acknowledged).
pub async fn next_v5_publish(raw: &mut RawMqtt) -> rumqttc::v5::mqttbytes::v5::Publish {
    use rumqttc::v5::mqttbytes::v5::Packet;
    loop {
        let (first, body) = raw.next().await.expect("a PUBLISH");
        let mut bytes = bytes::BytesMut::from(&packet(first, &body)[..]);
        if let Ok(Packet::Publish(p)) = Packet::read(&mut bytes, None) {
            raw.send(&packet(0x40, &[(p.pkid >> 8) as u8, p.pkid as u8, 0, 0]))
                .await;
            return p;
        }
    }
}
