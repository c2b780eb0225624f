//! A push webhook receiver on loopback for the tests: records every request, answers 503 to
//! its first `fail` ones, then 200.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};

use super::WAIT;

pub const PUSH_SECRET: &str = "push-secret";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub signature: String,
    pub key: String,
    pub body: String,
    pub answered: u16,
}

/// An HTTP receiver that answers 503 to its first `fail` requests, then 200.
pub struct Receiver {
    pub fail: AtomicUsize,
    pub hits: Mutex<Vec<Hit>>,
    /// Told of every request.
    pub attempted: Notify,
    delivered: mpsc::UnboundedSender<Value>,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> StatusCode {
    let header = |name: &str| {
        let value = headers.get(name).and_then(|v| v.to_str().ok());
        value.unwrap_or_default().to_owned()
    };
    let failing = r
        .fail
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let hit = Hit {
        signature: header("x-callbus-signature"),
        key: header("idempotency-key"),
        body: body.clone(),
        answered: status.as_u16(),
    };
    r.hits.lock().unwrap().push(hit);
    r.attempted.notify_one();
    if !failing {
        let _ = r
            .delivered
            .send(serde_json::from_str(&body).expect("JSON body"));
    }
    status
}

/// Starts a receiver on `listener`; returns it and the stream of delivered bodies.
pub fn serve_receiver(
    listener: tokio::net::TcpListener,
    fail: usize,
) -> (Arc<Receiver>, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver {
        fail: AtomicUsize::new(fail),
        hits: Mutex::new(Vec::new()),
        attempted: Notify::new(),
        delivered: tx,
    });
    let app = axum::Router::new()
        .route("/push", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, rx)
}

pub async fn next(delivered: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, delivered.recv())
        .await
        .expect("a push in time")
        .expect("receiver alive")
}
