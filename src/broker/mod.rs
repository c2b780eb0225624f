//! The embedded rumqttd router and callbus's client-facing MQTT listeners (TCP and WebSocket).
//!
//! rumqttd has no topic ACL, so none of its listeners is ever started: clients talk only to
//! callbus's own listeners ([`session`]), which authenticate each CONNECT, check every SUBSCRIBE
//! and PUBLISH with the bridge's policy, and hand allowed traffic to the router through one
//! shared in-process rumqttd link ([`hub`]). Every rumqttd type stays inside this module.

mod codec;
mod hub;
mod registry;
pub mod session;
pub mod tcp;
pub mod ws;

use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

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
    /// Kept alive: dropping rumqttd's Broker would leave the router without its handle.
    _router: Arc<rumqttd::Broker>,
    hub: Arc<hub::Hub>,
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
        let (mut tx, mut rx) = Self::make_link(&router, "callbus-hub".to_owned()).await?;
        // Subscribe the shared link to everything and wait until the router has it, so nothing
        // published after startup can miss a session.
        tx.subscribe("#")
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        loop {
            match rx.next().await {
                Ok(Some(rumqttd::Notification::DeviceAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(BrokerError::Link(e.to_string())),
            }
        }
        let hub = hub::Hub::start(tx, rx);
        Ok(Self {
            _router: router,
            hub,
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

    pub(crate) fn hub(&self) -> &Arc<hub::Hub> {
        &self.hub
    }

    /// Publishes an event of callbus's own (notifications, mirrored signaling, errors).
    pub fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), BrokerError> {
        self.hub
            .publish(topic.to_owned(), payload.into())
            .map_err(|_| BrokerError::RouterGone)
    }
}
