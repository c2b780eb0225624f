//! The embedded rumqttd router and callbus's client-facing MQTT listeners (TCP and WebSocket).
//!
//! rumqttd has no topic ACL, so none of its listeners is ever started: clients talk only to
//! callbus's own listeners ([`session`]), which authenticate each CONNECT, check every SUBSCRIBE
//! and PUBLISH with the bridge's policy, and hand allowed traffic to the router through an
//! in-process rumqttd link per connection. Every rumqttd type stays inside this module.

mod codec;
mod registry;
pub mod session;
pub mod tcp;
pub mod ws;

use bytes::Bytes;
use serde::Deserialize;
use std::sync::{Arc, Mutex};

pub use session::{Gateway, Transport};

/// rumqttd's router settings (the `[router]` table of the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct RouterSettings(rumqttd::RouterConfig);

impl RouterSettings {
    /// Checks what rumqttd would otherwise panic on.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.0;
        if r.max_segment_size < 1024 || r.max_segment_count == 0 {
            return Err(
                "router.max_segment_size must be >= 1024 and max_segment_count >= 1".into(),
            );
        }
        if r.max_connections == 0 || r.max_outgoing_packet_count == 0 {
            return Err("router.max_connections and max_outgoing_packet_count must be > 0".into());
        }
        if let Some(custom) = &r.custom_segment {
            if custom
                .values()
                .any(|s| s.max_segment_size < 1024 || s.max_segment_count == 0)
            {
                return Err("router.custom_segment sizes must be >= 1024".into());
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("router refused the link: {0}")]
    Link(String),
    #[error("router is gone")]
    RouterGone,
}

/// The router plus one link of callbus's own for the events it publishes.
#[derive(Clone)]
pub struct Broker {
    router: Arc<rumqttd::Broker>,
    internal: Arc<Mutex<rumqttd::local::LinkTx>>,
}

/// Broker-side client ids are `<user id>.<client id>`: user and client ids never contain `.`,
/// so no user can name (and so take over) another user's session. callbus's own links use ids
/// without a dot for the same reason.
pub fn namespaced_client_id(user_id: &str, client_id: &str) -> String {
    format!("{user_id}.{client_id}")
}

impl Broker {
    /// Starts the router thread. No rumqttd listener is started.
    pub async fn start(router: RouterSettings) -> Result<Self, BrokerError> {
        let config = rumqttd::Config {
            id: 0,
            router: router.0,
            ..Default::default()
        };
        let router = tokio::task::spawn_blocking(move || Arc::new(rumqttd::Broker::new(config)))
            .await
            .map_err(|_| BrokerError::RouterGone)?;
        let (tx, mut rx) = Self::make_link(&router, "callbus-internal".to_owned()).await?;
        // The internal link subscribes to nothing; drain it so the router never waits on it.
        tokio::spawn(async move { while let Ok(Some(_)) = rx.next().await {} });
        Ok(Self {
            router,
            internal: Arc::new(Mutex::new(tx)),
        })
    }

    async fn make_link(
        router: &Arc<rumqttd::Broker>,
        client_id: String,
    ) -> Result<(rumqttd::local::LinkTx, rumqttd::local::LinkRx), BrokerError> {
        let router = router.clone();
        // link() blocks until the router answers, so keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            router
                .link(&client_id)
                .map_err(|e| BrokerError::Link(e.to_string()))
        })
        .await
        .map_err(|_| BrokerError::RouterGone)?
    }

    /// An in-process link to the router for one client session.
    pub(crate) async fn link(
        &self,
        client_id: String,
    ) -> Result<(rumqttd::local::LinkTx, rumqttd::local::LinkRx), BrokerError> {
        Self::make_link(&self.router, client_id).await
    }

    /// Publishes an event of callbus's own (notifications, mirrored signaling, errors).
    pub fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), BrokerError> {
        let mut tx = self.internal.lock().map_err(|_| BrokerError::RouterGone)?;
        tx.publish(topic.to_owned(), payload.into())
            .map(|_| ())
            .map_err(|_| BrokerError::RouterGone)
    }
}
