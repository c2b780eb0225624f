//! callbus: WebRTC call signaling and per-user notifications over MQTT.
//!
//! - [`model`]: the pure model beneath everything: calls and their state machine, topics.
//! - [`bus`]: the one way a publish travels (embedded: the rumqttd router, in one order;
//!   cluster mode: NATS, by interest).
//! - [`broker`]: callbus's client-facing MQTT listeners (TCP, TLS, WebSocket), the sessions, and
//!   the hub that owns them and routes the bus's deliveries.
//! - [`bridge`]: policy — topic ACL, payload validation, sender stamping, signaling rules.
//! - [`api`]: the axum REST API.
//! - [`calls`]: the service that changes and announces calls; [`conversations`]: membership;
//!   [`push`]: the webhook that wakes sleeping phones.
//! - [`store`]: durable state in sled (cluster mode: what nodes share, in PostgreSQL).
//! - [`cluster`]: what a node knows of the others (liveness, membership changes).
//! - [`auth`], [`ids`], [`config`]: identity, identifiers, configuration; [`rate`]: token
//!   buckets; [`net`]: accepting sockets.
//! - [`sys`]: `$SYS/#` figures for operators.
//! - [`server`]: wires the parts together.

pub mod api;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod bus;
pub mod calls;
pub mod cluster;
pub mod config;
pub mod conversations;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod metrics;
pub mod model;
pub mod net;
pub mod push;
pub mod rate;
pub mod server;
pub mod store;
pub mod sync;
pub mod sys;
pub mod tls;
