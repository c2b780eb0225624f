//! callbus: WebRTC call signaling and per-user notifications over MQTT.
//!
//! - [`broker`]: the embedded rumqttd router and callbus's own client-facing MQTT listeners
//!   (TCP and WebSocket), which check every packet before the router sees it.
//! - [`bridge`]: policy — topic ACL, payload validation, sender stamping.
//! - [`api`]: the axum REST API.
//! - [`calls`]: the call state machine and the service that changes and announces calls.
//! - [`store`]: durable state in sled.
//! - [`auth`], [`ids`], [`config`]: identity, identifiers, configuration.
//! - [`server`]: wires the parts together.

pub mod api;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod calls;
pub mod config;
pub mod ids;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tls;
