//! Process-wide counters, served as Prometheus text at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A counter or gauge.
pub struct Metric {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    value: AtomicU64,
}

impl Metric {
    const fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            value: AtomicU64::new(0),
        }
    }

    pub fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

pub static CONNECTIONS_OPEN: Metric = Metric::new(
    "callbus_mqtt_connections_open",
    "gauge",
    "MQTT client sessions currently connected (TCP and WebSocket).",
);
pub static CONNECTIONS_TOTAL: Metric = Metric::new(
    "callbus_mqtt_connections_total",
    "counter",
    "MQTT client sessions accepted since start.",
);
pub static CONNECTS_REFUSED: Metric = Metric::new(
    "callbus_mqtt_connects_refused_total",
    "counter",
    "CONNECTs refused (bad token, client id, protocol level or connection limit).",
);
pub static ACCEPTS_OUT_OF_FILES: Metric = Metric::new(
    "callbus_accepts_out_of_files_total",
    "counter",
    "Accepts that failed because the process ran out of file descriptors (retried after a pause).",
);
pub static CONNECTS_OVER_USER_LIMIT: Metric = Metric::new(
    "callbus_mqtt_connects_over_user_limit_total",
    "counter",
    "CONNECTs refused because the user already had max_connections_per_user live connections.",
);
pub static CONNECTS_OVER_RATE: Metric = Metric::new(
    "callbus_mqtt_connects_over_rate_total",
    "counter",
    "CONNECTs refused because their source address passed connect_rate_per_address.",
);
pub static SUBSCRIPTIONS_OVER_LIMIT: Metric = Metric::new(
    "callbus_mqtt_subscriptions_over_limit_total",
    "counter",
    "SUBSCRIBE filters refused because the connection held max_subscriptions.",
);
pub static PUBLISHES_RELAYED: Metric = Metric::new(
    "callbus_mqtt_publishes_relayed_total",
    "counter",
    "Client publishes that passed the ACL and validation.",
);
pub static MESSAGES_SENT: Metric = Metric::new(
    "callbus_mqtt_messages_sent_total",
    "counter",
    "PUBLISH packets written to clients.",
);
pub static PUBLISHES_REFUSED: Metric = Metric::new(
    "callbus_mqtt_publishes_refused_total",
    "counter",
    "Client publishes refused (answered with an error event).",
);
pub static SUBSCRIPTIONS_REFUSED: Metric = Metric::new(
    "callbus_mqtt_subscriptions_refused_total",
    "counter",
    "SUBSCRIBE filters refused by the ACL.",
);
pub static PUBLISHES_THROTTLED: Metric = Metric::new(
    "callbus_mqtt_publishes_throttled_total",
    "counter",
    "Times a connection went over its publish rate and its socket was left unread until a token returned.",
);
pub static SESSIONS_DROPPED_SLOW: Metric = Metric::new(
    "callbus_sessions_dropped_slow_total",
    "counter",
    "Sessions dropped because their mailbox passed its bound (a client that stopped reading).",
);
pub static SESSIONS_STORED: Metric = Metric::new(
    "callbus_sessions_stored",
    "gauge",
    "Persistent sessions kept while their clients are away.",
);
pub static SESSIONS_EXPIRED: Metric = Metric::new(
    "callbus_sessions_expired_total",
    "counter",
    "Persistent sessions dropped because their client stayed away past the expiry.",
);
pub static SESSION_QUEUE_DROPPED: Metric = Metric::new(
    "callbus_session_queue_dropped_total",
    "counter",
    "Messages dropped (oldest first) from stored sessions' queues at their bound.",
);
pub static CONNECTIONS_V5: Metric = Metric::new(
    "callbus_mqtt5_connections_total",
    "counter",
    "MQTT client sessions accepted that speak MQTT 5 (the rest speak 3.1.1).",
);
pub static DELIVERIES_HELD: Metric = Metric::new(
    "callbus_mqtt_deliveries_held_total",
    "counter",
    "QoS 1 messages held back because an MQTT 5 client had its Receive Maximum unacknowledged.",
);
pub static DELIVERIES_TOO_LARGE: Metric = Metric::new(
    "callbus_mqtt_deliveries_too_large_total",
    "counter",
    "Messages not sent to an MQTT 5 client because they exceeded its Maximum Packet Size.",
);
pub static BUS_PUBLISHER_WAITS: Metric = Metric::new(
    "callbus_bus_publisher_waits_total",
    "counter",
    "Publishes that waited for the bus to drain (backpressure) before entering it.",
);
pub static BUS_LOST: Metric = Metric::new(
    "callbus_bus_lost_total",
    "counter",
    "Messages the bus accepted but never delivered back (should stay 0).",
);
pub static BUS_PUBLISHED: Metric = Metric::new(
    "callbus_cluster_published_total",
    "counter",
    "Messages this node published on the cluster bus (NATS).",
);
pub static BUS_RECEIVED: Metric = Metric::new(
    "callbus_cluster_received_total",
    "counter",
    "Messages this node received from the cluster bus, one per subscribed filter (interest).",
);
pub static BUS_INTEREST: Metric = Metric::new(
    "callbus_cluster_interest",
    "gauge",
    "Filters this node subscribes to on the cluster bus.",
);
pub static PUSHES_DELIVERED: Metric = Metric::new(
    "callbus_pushes_delivered_total",
    "counter",
    "Push webhook calls answered with a 2xx.",
);
pub static PUSH_RETRIES: Metric = Metric::new(
    "callbus_push_retries_total",
    "counter",
    "Push webhook attempts that failed and were retried.",
);
pub static PUSHES_DROPPED: Metric = Metric::new(
    "callbus_pushes_dropped_total",
    "counter",
    "Push webhook calls given up at their deadline.",
);
pub static STORAGE_FULL: Metric = Metric::new(
    "callbus_storage_full",
    "gauge",
    "1 while the data dir's free space is under [storage] min_free_bytes and writes get 503.",
);
pub static STORAGE_REFUSED: Metric = Metric::new(
    "callbus_storage_refused_total",
    "counter",
    "Writes refused because the data dir's free space was under [storage] min_free_bytes.",
);
pub static STORE_FLUSHES: Metric = Metric::new(
    "callbus_store_flushes_total",
    "counter",
    "Flushes of the data dir (group commits and the periodic flush).",
);
pub static STORE_COMMITS: Metric = Metric::new(
    "callbus_store_commits_total",
    "counter",
    "Writes that waited for a flush before their reply (commits per flush: the group size).",
);
pub static CALLS_INITIATED: Metric =
    Metric::new("callbus_calls_initiated_total", "counter", "Calls created.");
pub static CALL_TRANSITIONS: Metric = Metric::new(
    "callbus_call_transitions_total",
    "counter",
    "Call state changes after creation (accept, reject, end, missed).",
);
pub static WS_CONTROL_FLOOD: Metric = Metric::new(
    "callbus_ws_control_flood_total",
    "counter",
    "WebSocket connections closed for sending control frames (pings) past the budget.",
);
pub static HTTP_REFUSED: Metric = Metric::new(
    "callbus_http_refused_total",
    "counter",
    "HTTP connections closed, oldest first, to make room past [http] max_connections.",
);
pub static HTTP_HEADER_TIMEOUTS: Metric = Metric::new(
    "callbus_http_header_timeouts_total",
    "counter",
    "HTTP connections closed because a request's head did not arrive in time (or it sat idle).",
);
pub static PENDING_REFUSED: Metric = Metric::new(
    "callbus_mqtt_pending_refused_total",
    "counter",
    "MQTT sockets closed before CONNECT: the oldest past max_pending_connects, or past pending_connect_bytes.",
);
pub static SESSIONS_EVICTED: Metric = Metric::new(
    "callbus_sessions_evicted_total",
    "counter",
    "Stored sessions expired early because their user made more than sessions.max_per_user.",
);
pub static CALLS_RATE_LIMITED: Metric = Metric::new(
    "callbus_calls_rate_limited_total",
    "counter",
    "Call initiations refused with 429 (past [calls] initiate_per_minute).",
);
pub static CALLS_PRUNED: Metric = Metric::new(
    "callbus_calls_pruned_total",
    "counter",
    "Ended calls removed from the store past [storage] call_history_secs.",
);

const ALL: [&Metric; 40] = [
    &CONNECTIONS_OPEN,
    &CONNECTIONS_TOTAL,
    &CONNECTS_REFUSED,
    &ACCEPTS_OUT_OF_FILES,
    &CONNECTS_OVER_USER_LIMIT,
    &CONNECTS_OVER_RATE,
    &SUBSCRIPTIONS_OVER_LIMIT,
    &PUBLISHES_RELAYED,
    &MESSAGES_SENT,
    &PUBLISHES_REFUSED,
    &SUBSCRIPTIONS_REFUSED,
    &PUBLISHES_THROTTLED,
    &SESSIONS_DROPPED_SLOW,
    &SESSIONS_STORED,
    &SESSIONS_EXPIRED,
    &SESSION_QUEUE_DROPPED,
    &CONNECTIONS_V5,
    &DELIVERIES_HELD,
    &DELIVERIES_TOO_LARGE,
    &BUS_PUBLISHER_WAITS,
    &BUS_LOST,
    &BUS_PUBLISHED,
    &BUS_RECEIVED,
    &BUS_INTEREST,
    &PUSHES_DELIVERED,
    &PUSH_RETRIES,
    &PUSHES_DROPPED,
    &STORAGE_FULL,
    &STORAGE_REFUSED,
    &STORE_FLUSHES,
    &STORE_COMMITS,
    &CALLS_INITIATED,
    &CALL_TRANSITIONS,
    &CALLS_PRUNED,
    &WS_CONTROL_FLOOD,
    &HTTP_REFUSED,
    &HTTP_HEADER_TIMEOUTS,
    &PENDING_REFUSED,
    &SESSIONS_EVICTED,
    &CALLS_RATE_LIMITED,
];

/// Everything, in Prometheus text exposition format.
pub fn render() -> String {
    let mut out = String::new();
    for m in ALL {
        let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind);
        let _ = writeln!(out, "{} {}", m.name, m.get());
    }
    out
}
