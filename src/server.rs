//! Wires the parts together: store, bus, hub, MQTT listeners and the HTTP API, under one
//! cancellation token. Takes already-bound listeners so tests can use ephemeral ports.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::api::turn::TurnConfig;
use crate::api::{self, AppState, Services};
use crate::auth::Authenticator;
use crate::bridge::Bridge;
use crate::broker::{self, Gateway, Hub};
use crate::bus::direct::DirectBus;
use crate::bus::embedded::EmbeddedBus;
use crate::bus::nats::NatsBus;
use crate::bus::Publisher;
use crate::calls::{CallLimits, Calls};
use crate::cluster::{Cluster, ClusterOptions};
use crate::config::{BusEngine, FileConfig};
use crate::conversations::ConversationService;
use crate::net;
use crate::store::pg::Pg;
use crate::store::Store;

/// Everything `serve` needs besides its listeners.
pub struct Settings {
    pub config: FileConfig,
    pub data_dir: PathBuf,
    pub jwt_secret: Vec<u8>,
    /// How long a call rings before it is missed.
    pub ring_timeout: Duration,
    /// How long an active call survives with neither party connected.
    pub call_lost_grace: Duration,
    /// The longest an active call lasts.
    pub max_call_duration: Duration,
    pub turn: Option<TurnConfig>,
    pub cors_origins: Vec<String>,
    /// Development mode: `/api/dev/token` on.
    pub dev: bool,
    /// TLS for both listeners.
    pub tls: Option<crate::tls::TlsAcceptor>,
    /// Push hand-off webhook.
    pub push: Option<crate::push::Webhook>,
    /// How often `$SYS/#` is published.
    pub sys_interval: Duration,
    /// Cluster mode: NATS and PostgreSQL instead of the embedded router and sled alone.
    pub cluster: Option<ClusterOptions>,
}

impl Settings {
    /// Defaults for everything but the file config, data dir and secret.
    pub fn new(config: FileConfig, data_dir: PathBuf, jwt_secret: Vec<u8>) -> Self {
        Self {
            config,
            data_dir,
            jwt_secret,
            ring_timeout: Duration::from_secs(60),
            call_lost_grace: CallLimits::default().lost_grace,
            max_call_duration: CallLimits::default().max_duration,
            turn: None,
            cors_origins: Vec::new(),
            dev: false,
            tls: None,
            push: None,
            sys_interval: Duration::from_secs(5),
            cluster: None,
        }
    }
}

type Request = axum::http::Request<hyper::body::Incoming>;

/// HTTP/1.1 with upgrades (for `/mqtt`) on each accepted socket, TLS first when configured.
/// At most `[http] max_connections` at once; a request's head must arrive within the header
/// timeout, counted from the connection's start or its previous response (so an idle keep-alive
/// connection ends then too). At shutdown each connection finishes the request in progress
/// (bounded) and closes.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    limits: &crate::config::HttpConfig,
    tls: Option<crate::tls::TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let gate = net::Gate::new(
        net::share_of_files(limits.max_connections),
        &crate::metrics::HTTP_REFUSED,
    );
    let header_timeout = limits.header_timeout();
    let handle = {
        let shutdown = shutdown.clone();
        move |stream, peer, place: net::Place| {
            let app = app.clone();
            let shutdown = shutdown.clone();
            async move {
                // The peer's address goes into each request as it comes (a layer on a router
                // per connection rebuilt every route: tens of KiB a connection).
                let service = hyper::service::service_fn(move |mut request: Request| {
                    let info = axum::extract::ConnectInfo(peer);
                    request.extensions_mut().insert(info);
                    tower::ServiceExt::oneshot(app.clone(), request)
                });
                // `place` is held until the connection ends (or is upgraded to a WebSocket); a
                // connection told to make room is dropped.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    ended = conn.as_mut() => {
                        if ended.is_err_and(|e| e.is_timeout()) {
                            crate::metrics::HTTP_HEADER_TIMEOUTS.inc();
                        }
                        return;
                    }
                    _ = place.evicted() => return,
                    _ = shutdown.cancelled() => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        }
    };
    net::accept_loop(listener, tls, gate, shutdown, tracker, handle).await
}

/// Connects to NATS and PostgreSQL, puts the hub on the NATS bus, and joins the cluster.
async fn join_cluster(
    options: &ClusterOptions,
    store: &Store,
    hub: &std::sync::Arc<Hub>,
    sessions: &crate::config::SessionsConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Publisher, std::sync::Arc<Cluster>)> {
    let nats = crate::cluster::connect_nats(options)
        .await
        .with_context(|| format!("connecting to NATS at {}", options.nats.join(",")))?;
    let pg = Pg::open(&options.database)
        .await
        .context("opening the database (--database)")?;
    let nats_client = nats.client.clone();
    let bus = NatsBus::start(nats.client.clone(), hub.clone(), shutdown.clone());
    hub.set_interest(bus.clone());
    let cluster = Cluster::start(
        options,
        nats,
        pg,
        crate::cluster::Replicas {
            conversations: store.conversations.clone(),
            calls: crate::store::CallReplica::default(),
        },
        hub.clone(),
        shutdown.clone(),
    )
    .await
    .context("joining the cluster")?;
    hub.set_peers(cluster.clone());
    let queues = crate::cluster::Queues::start(
        nats_client,
        cluster.pg.clone(),
        &options.node_id,
        options.nats.len(),
        sessions,
        hub,
        shutdown.clone(),
    )
    .await
    .context("keeping persistent sessions in JetStream")?;
    cluster.keep_sessions(queues.clone());
    hub.set_durable(queues);
    Ok((Publisher::new(bus), cluster))
}

/// A started server.
pub struct Server {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// Starts every part; returns once all of them accept connections.
    pub async fn start(
        settings: Settings,
        http: TcpListener,
        mqtt: TcpListener,
    ) -> anyhow::Result<Server> {
        let cors_origins = settings
            .cors_origins
            .iter()
            .map(|o| {
                axum::http::HeaderValue::from_str(o.trim_end_matches('/'))
                    .with_context(|| format!("bad --cors-origin {o}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let http_addr = http.local_addr()?;
        let mqtt_addr = mqtt.local_addr()?;
        let data_dir = settings.data_dir.clone();
        let storage = settings.config.storage.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, &storage))
            .await?
            .with_context(|| format!("opening the store in {}", settings.data_dir.display()))?;
        let auth = Authenticator::new(&settings.jwt_secret);
        // The hub owns the sessions; the bus hands it every message, in bus order.
        let hub = Hub::new(store.clone(), settings.config.sessions.clone())
            .context("restoring persistent sessions")?;
        let shutdown = CancellationToken::new();
        let (publisher, cluster) = match &settings.cluster {
            None if settings.config.bus.engine == BusEngine::Direct => {
                let bus = DirectBus::new(hub.clone());
                (Publisher::new(std::sync::Arc::new(bus)), None)
            }
            None => {
                let bus = EmbeddedBus::start(settings.config.router.clone(), hub.clone())
                    .await
                    .context("starting the embedded bus (rumqttd router)")?;
                (Publisher::new(std::sync::Arc::new(bus)), None)
            }
            Some(options) => {
                let (publisher, cluster) =
                    join_cluster(options, &store, &hub, &settings.config.sessions, &shutdown)
                        .await?;
                (publisher, Some(cluster))
            }
        };
        let limits = CallLimits {
            ring_timeout: settings.ring_timeout,
            lost_grace: settings.call_lost_grace,
            max_duration: settings.max_call_duration,
            keep_ended: settings.config.storage.call_history(),
        };
        let push = (settings.push.clone()).map(|webhook| match &cluster {
            Some(c) => crate::push::start_shared(c.pg.clone(), webhook, shutdown.clone()),
            None => crate::push::start(store.clone(), webhook, shutdown.clone()),
        });
        let shared = cluster.as_ref().map(|c| {
            let nodes: std::sync::Arc<dyn crate::calls::Nodes> = c.clone();
            let shared = crate::calls::Shared::new(c.pg.clone(), c.calls().clone(), nodes);
            std::sync::Arc::new(shared)
        });
        let calls = Calls::start(
            store.clone(),
            publisher.clone(),
            hub.clone(),
            limits,
            push,
            shared,
            shutdown.clone(),
        )
        .await
        .context("loading live calls")?;
        tokio::spawn(crate::sys::run(
            publisher.clone(),
            calls.clone(),
            store.clone(),
            settings.sys_interval,
            shutdown.clone(),
        ));
        let bridge = Bridge::new(auth.clone(), store.clone(), calls.clone());
        let storage = cluster.is_none().then(|| store.gate());
        let conversations = ConversationService::new(store, hub.clone(), cluster.clone());
        // Connections and the sessions they start: shutdown waits for them.
        let tracker = TaskTracker::new();
        let gateway = Gateway::new(
            hub,
            publisher,
            bridge,
            settings.config.gateway.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        let threads = settings.config.gateway.tcp_threads();
        broker::tcp::serve_on_threads(
            mqtt,
            threads,
            gateway.clone(),
            tracker.clone(),
            settings.tls.clone(),
        )
        .context("starting the MQTT listener's threads")?;
        let state = AppState::new(Services {
            conversations,
            auth,
            gateway,
            calls,
            turn: settings.turn,
            dev: settings.dev,
            cluster,
            storage,
            initiations: crate::rate::KeyedRate::new(
                f64::from(settings.config.calls.initiate_per_minute) / 60.0,
                settings.config.calls.initiate_burst,
            ),
        });
        let app = api::router(state, &cors_origins);
        let token = shutdown.clone();
        let tls = settings.tls.clone();
        let http_limits = settings.config.http.clone();
        let task = tokio::spawn(async move {
            serve_http(http, app, &http_limits, tls, token, tracker.clone()).await;
            tracker.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        });
        info!(%http_addr, %mqtt_addr, "callbus ready");
        Ok(Server {
            http_addr,
            mqtt_addr,
            shutdown,
            task,
        })
    }

    /// Stops accepting, closes every session and waits (bounded) for them to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    /// Resolves when the server has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
