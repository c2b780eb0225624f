//! A minimal HTTP/1.1 POST for the push webhook over hyper's client connection (http:// only:
//! the app's backend is expected on the same network; put a TLS proxy in front otherwise).

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::net::TcpStream;

/// Per-attempt bound: connecting, sending and reading the status.
const ATTEMPT: Duration = Duration::from_secs(5);

/// An `http://host[:port]/path` URL.
#[derive(Debug, Clone)]
pub struct Url {
    authority: String,
    path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("bad webhook URL {url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("webhook URL {url}: only http:// is supported"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("webhook URL {url} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            authority: format!("{}:{port}", authority.host()),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
        })
    }
}

/// POSTs `body` as JSON; returns the response status.
pub async fn post(url: &Url, body: &str, signature: &str, key: &str) -> Result<u16, String> {
    tokio::time::timeout(ATTEMPT, attempt(url, body, signature, key))
        .await
        .map_err(|_| "timed out".to_owned())?
}

async fn attempt(url: &Url, body: &str, signature: &str, key: &str) -> Result<u16, String> {
    let stream = TcpStream::connect(&url.authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::post(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("X-Callbus-Signature", signature)
        .header("Idempotency-Key", key)
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}
