//! TLS on both listeners when a certificate is configured: MQTT over TLS, HTTPS, and MQTT over
//! secure WebSocket, with a real rustls client trusting the test certificate.

mod common;

use common::{TestServer, WAIT};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{rustls, TlsConnector};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

async fn tls_server() -> TestServer {
    TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.tls = Some(
            callbus::tls::acceptor(
                &Path::new(FIXTURES).join("localhost.crt"),
                &Path::new(FIXTURES).join("localhost.key"),
            )
            .expect("test certificate"),
        )
    })
    .await
}

fn connector() -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(Path::new(FIXTURES).join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(port: u16) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector().connect(name, tcp).await.expect("TLS handshake")
}

/// A CONNECT (MQTT 3.1.1, keepalive 30) with `password`.
fn connect_packet(password: &str) -> Vec<u8> {
    common::raw_connect(4, 30, password)
}

#[tokio::test]
async fn mqtt_over_tls() {
    let s = tls_server().await;
    let mut good = tls_connect(s.mqtt.port()).await;
    good.write_all(&connect_packet(&s.token("alice")))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, good.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    let mut bad = tls_connect(s.mqtt.port()).await;
    bad.write_all(&connect_packet("garbage")).await.unwrap();
    tokio::time::timeout(WAIT, bad.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 5], "not authorised");

    // Plain MQTT on the TLS port gets no CONNACK.
    let mut plain = TcpStream::connect(s.mqtt).await.unwrap();
    plain
        .write_all(&connect_packet(&s.token("alice")))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        n < 4 || buf[..4] != [0x20, 2, 0, 0],
        "plain MQTT accepted on the TLS port"
    );
}

#[tokio::test]
async fn https_and_secure_websocket() {
    let s = tls_server().await;
    let mut stream = tls_connect(s.http.port()).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // MQTT over wss: the upgrade, then CONNECT/CONNACK in binary frames.
    let mut ws = tls_connect(s.http.port()).await;
    ws.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(WAIT, ws.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
    // One masked binary frame carrying the CONNECT.
    let payload = connect_packet(&s.token("alice"));
    assert!((126..65536).contains(&payload.len()));
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | 126];
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    ws.write_all(&frame).await.unwrap();
    let mut answer = [0u8; 6];
    tokio::time::timeout(WAIT, ws.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        answer,
        [0x82, 4, 0x20, 2, 0, 0],
        "CONNACK in a binary frame"
    );
}
