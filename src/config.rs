//! Configuration file (`config/rumqttd.toml`): rumqttd's router settings plus the limits of
//! callbus's own client-facing listeners. Unknown keys are refused, and so are rumqttd listener
//! sections (`v4`, `v5`, `ws`, `console`, ...): clients must never reach the router without the
//! ACL checks, so callbus never opens a rumqttd port.

use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

use crate::bus::embedded::RouterSettings;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// How a publish reaches the sessions in the embedded mode.
    #[serde(default)]
    pub bus: BusConfig,
    /// rumqttd's router (`[router]` as in rumqttd's own config), for `[bus] engine = "rumqttd"`.
    pub router: RouterSettings,
    /// callbus's listeners.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// Persistent sessions (`clean_session = 0`).
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// The embedded store (sled).
    #[serde(default)]
    pub storage: StorageConfig,
    /// The HTTP port (REST, `/mqtt` before the upgrade).
    #[serde(default)]
    pub http: HttpConfig,
    /// Limits on starting calls.
    #[serde(default)]
    pub calls: CallsConfig,
}

/// The HTTP listener's bounds on sockets that have not finished a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// HTTP connections at once (a WebSocket counts as an MQTT connection once upgraded); a
    /// socket past it is closed at accept. 0: a quarter of the open-file limit.
    pub max_connections: usize,
    /// Time allowed for a request's head to arrive, counted from the connection's start or the
    /// end of the previous response (so also how long an idle keep-alive connection stays).
    pub header_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            header_timeout_ms: 10_000,
        }
    }
}

impl HttpConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
}

/// How often one user may start calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Calls a user may start per minute, sustained; past it `initiate` answers 429.
    pub initiate_per_minute: u32,
    /// Calls a user may start at once above the sustained rate.
    pub initiate_burst: u32,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            initiate_per_minute: 20,
            initiate_burst: 10,
        }
    }
}

/// The embedded mode's bus.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub engine: BusEngine,
}

/// What carries publishes to the sessions in the embedded mode (cluster mode: NATS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusEngine {
    /// The publishing task routes each message to the sessions itself, under the hub's lock.
    #[default]
    Direct,
    /// rumqttd's router, through one in-process link.
    Rumqttd,
}

/// The embedded store: how much of it sled keeps in memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Bytes of sled's page cache (sled's own default is 1 GiB: memory would grow with the
    /// data on disk, not with live state).
    pub cache_bytes: u64,
    /// Free bytes the data dir's filesystem must keep: below it, writes get 503 (sled cannot
    /// recover from a full disk without a restart; this keeps it from ever seeing one).
    pub min_free_bytes: u64,
    /// Seconds an ended call stays in the store (its record and both parties' history) after
    /// it ended; 0 keeps every call. sled holds about 1 KiB of memory per stored call, so
    /// without a bound memory grows with the history, not with live state.
    pub call_history_secs: u64,
}

impl StorageConfig {
    /// How long ended calls are kept (None: for good).
    pub fn call_history(&self) -> Option<std::time::Duration> {
        (self.call_history_secs > 0).then(|| std::time::Duration::from_secs(self.call_history_secs))
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 32 * 1024 * 1024,
            min_free_bytes: 64 * 1024 * 1024,
            call_history_secs: 0,
        }
    }
}

/// Persistent sessions: how long one is kept while its client is away, and how much it queues.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Seconds a session is kept after its connection ends.
    pub expiry_secs: u64,
    /// Most QoS 1 messages queued for one session while it is away; past it the oldest go.
    pub queue_messages: usize,
    /// Most payload bytes queued for one session while it is away; past it the oldest go.
    pub queue_bytes: usize,
    /// Most persistent sessions one user keeps; a new one past it expires the user's session
    /// that has been away longest.
    pub max_per_user: usize,
    /// Most payload bytes queued for all of one user's sessions while they are away; past it
    /// the oldest of the session being queued to go.
    pub user_queue_bytes: usize,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            expiry_secs: 600,
            queue_messages: 1000,
            queue_bytes: 4 * 1024 * 1024,
            max_per_user: 32,
            user_queue_bytes: 16 * 1024 * 1024,
        }
    }
}

impl SessionsConfig {
    pub fn expiry(&self) -> Duration {
        Duration::from_secs(self.expiry_secs)
    }
}

/// Limits of the client-facing MQTT listeners (TCP and WebSocket).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Largest MQTT packet accepted, in bytes (SDP offers run 2 to 16 KB).
    pub max_payload_size: usize,
    /// Most client connections at once, TCP and WebSocket together.
    pub max_connections: usize,
    /// Longest keepalive honoured; a client asking for 0 (none) or more gets this.
    pub max_keepalive_secs: u16,
    /// Time allowed between accepting a socket and its CONNECT.
    pub connect_timeout_ms: u64,
    /// Denied publishes a connection may make before it is disconnected.
    pub violation_limit: u32,
    /// Sustained publishes per second per connection.
    pub publish_rate: u32,
    /// Publishes a connection may burst above the sustained rate.
    pub publish_burst: u32,
    /// Most filters one connection may hold; past it a filter gets SUBACK failure.
    pub max_subscriptions: usize,
    /// Most live connections of one user (devices, tabs); past it CONNACK "server unavailable".
    pub max_connections_per_user: usize,
    /// New MQTT connections per second from one source address (burst the same); past it
    /// CONNACK "server unavailable". 0 turns it off (the default: carrier NAT puts many phones
    /// behind one address).
    pub connect_rate_per_address: u32,
    /// Sockets (TCP or WebSocket) accepted and not yet past CONNECT; one past it is closed at
    /// once. 0: a quarter of the open-file limit.
    pub max_pending_connects: usize,
    /// Bytes all sockets not yet past CONNECT may hold together past the first 8 KiB of each;
    /// one that would take the total past it is closed.
    pub pending_connect_bytes: usize,
    /// Largest CONNECT without a Last Will (one with a will may be `max_payload_size`).
    pub max_connect_size: usize,
    /// Threads that run MQTT over TCP (each its own single-threaded runtime, sharing the
    /// listening socket); 0 picks half the CPUs, at least one. MQTT over WebSocket and the
    /// REST API run on the shared worker pool.
    pub mqtt_tcp_threads: usize,
}

impl GatewayConfig {
    /// How many threads run MQTT over TCP.
    pub fn tcp_threads(&self) -> usize {
        match self.mqtt_tcp_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_payload_size: 128 * 1024,
            max_connections: 20_000,
            max_keepalive_secs: 600,
            connect_timeout_ms: 5_000,
            violation_limit: 50,
            publish_rate: 200,
            publish_burst: 500,
            max_subscriptions: 100,
            max_connections_per_user: 32,
            connect_rate_per_address: 0,
            max_pending_connects: 0,
            pending_connect_bytes: 16 * 1024 * 1024,
            max_connect_size: 16 * 1024,
            mqtt_tcp_threads: 0,
        }
    }
}

impl GatewayConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(what.to_owned()));
        if self.max_payload_size < 64 * 1024 {
            return bad("gateway.max_payload_size must be at least 65536 (SDP offers need it)");
        }
        if self.max_connections == 0 || self.max_keepalive_secs == 0 || self.publish_rate == 0 {
            return bad("gateway.max_connections, max_keepalive_secs and publish_rate must be > 0");
        }
        if self.max_connect_size < 1024 || self.pending_connect_bytes < self.max_payload_size {
            return bad("gateway.max_connect_size must be at least 1024 and pending_connect_bytes at least max_payload_size");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl FileConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: String::new(),
            source,
        })?;
        config.gateway.validate()?;
        let sessions = &config.sessions;
        let counts = [sessions.queue_messages, sessions.queue_bytes];
        if counts.contains(&0) || sessions.max_per_user == 0 || sessions.user_queue_bytes == 0 {
            return Err(ConfigError::Invalid(
                "sessions.queue_messages, queue_bytes, max_per_user and user_queue_bytes must be > 0"
                    .into(),
            ));
        }
        if config.calls.initiate_per_minute == 0 || config.calls.initiate_burst == 0 {
            return Err(ConfigError::Invalid(
                "calls.initiate_per_minute and initiate_burst must be > 0".into(),
            ));
        }
        config.router.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }
}

/// The configuration shipped in `config/rumqttd.toml`, also used when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("../config/rumqttd.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses() {
        let c = FileConfig::parse(DEFAULT_CONFIG).unwrap();
        assert!(c.gateway.max_payload_size >= 64 * 1024);
    }

    #[test]
    fn rumqttd_listeners_are_refused() {
        let text = format!(
            "{DEFAULT_CONFIG}\n[v4.1]\nname = \"v4\"\nlisten = \"0.0.0.0:1883\"\nnext_connection_delay_ms = 1\n"
        );
        let err = FileConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("v4"), "{err}");
    }

    #[test]
    fn small_payload_limit_is_refused() {
        let text = format!("{DEFAULT_CONFIG}\n[gateway]\nmax_payload_size = 20480\n");
        assert!(FileConfig::parse(&text).is_err());
    }
}
