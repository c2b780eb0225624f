//! The `callbus` command: `serve` runs the service, `token` prints a JWT.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::TcpListener;
use tracing::{info, warn};

use callbus::api::turn::TurnConfig;
use callbus::auth::{Authenticator, Role};
use callbus::config::{FileConfig, DEFAULT_CONFIG};
use callbus::server::{Server, Settings};

/// The secret `--dev` falls back to when CALLBUS_JWT_SECRET is unset. Never for production:
/// `--dev` refuses non-loopback addresses.
const DEV_SECRET: &str = "callbus-dev-secret-do-not-use-in-production";

#[derive(Parser)]
#[command(
    name = "callbus",
    version,
    about = "WebRTC call signaling and notifications over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker, the MQTT listeners (TCP and WebSocket) and the REST API.
    Serve(Box<ServeArgs>),
    /// Print a JWT signed with CALLBUS_JWT_SECRET.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (router settings and listener limits).
    #[arg(long, env = "CALLBUS_CONFIG")]
    config: Option<PathBuf>,
    /// Where sled keeps calls and conversations.
    #[arg(long, env = "CALLBUS_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// HTTP address: REST API, demo page and MQTT over WebSocket at /mqtt.
    #[arg(long, env = "CALLBUS_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// MQTT over TCP address.
    #[arg(long, env = "CALLBUS_MQTT", default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Seconds a call may ring before it is missed.
    #[arg(long, env = "CALLBUS_RING_TIMEOUT", default_value_t = 60)]
    ring_timeout: u64,
    /// Seconds an active call survives with neither party connected (then it ends with
    /// reason connection_lost).
    #[arg(long, env = "CALLBUS_CALL_LOST_GRACE", default_value_t = 120)]
    call_lost_grace: u64,
    /// Longest an active call lasts, in seconds (then it ends with reason max_duration).
    #[arg(long, env = "CALLBUS_MAX_CALL_DURATION", default_value_t = 14_400)]
    max_call_duration: u64,
    /// The app backend's push webhook (http://): POSTed when a call starts and stops ringing,
    /// so it can wake sleeping phones through FCM/APNs (with --push-secret).
    #[arg(long, env = "CALLBUS_PUSH_WEBHOOK", requires = "push_secret")]
    push_webhook: Option<String>,
    /// Secret for the webhook's X-Callbus-Signature (HMAC-SHA256).
    #[arg(long, env = "CALLBUS_PUSH_SECRET", requires = "push_webhook")]
    push_secret: Option<String>,
    /// Shared secret for TURN REST credentials (coturn's static-auth-secret).
    #[arg(long, env = "CALLBUS_TURN_SECRET")]
    turn_secret: Option<String>,
    /// TURN URIs handed out with credentials, comma separated.
    #[arg(long, env = "CALLBUS_TURN_URIS", value_delimiter = ',')]
    turn_uris: Vec<String>,
    /// Origins allowed to call the REST API from a browser (repeatable).
    #[arg(
        long = "cors-origin",
        env = "CALLBUS_CORS_ORIGIN",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// PEM certificate chain: serve TLS on both listeners (with --tls-key).
    #[arg(long, env = "CALLBUS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "CALLBUS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Development mode: dev tokens for the demo page, a fixed secret if none is set,
    /// loopback addresses only.
    #[arg(long, env = "CALLBUS_DEV")]
    dev: bool,
    /// Cluster mode: NATS servers (comma separated nats:// URLs) to use as the bus between
    /// callbus nodes (with --database).
    #[arg(
        long,
        env = "CALLBUS_CLUSTER",
        value_delimiter = ',',
        requires = "database"
    )]
    cluster: Vec<String>,
    /// Cluster mode: the PostgreSQL database nodes share, postgres://user@host:port/db
    /// (with --cluster).
    #[arg(long, env = "CALLBUS_DATABASE", requires = "cluster")]
    database: Option<String>,
    /// Cluster mode: this node's name (default: random).
    #[arg(long, env = "CALLBUS_NODE_ID", requires = "cluster")]
    node_id: Option<String>,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// User id (the token's sub).
    #[arg(long)]
    sub: String,
    /// Display name.
    #[arg(long)]
    username: Option<String>,
    #[arg(long, value_enum, default_value_t = Role::User)]
    role: Role,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
}

fn jwt_secret(dev: bool) -> anyhow::Result<Vec<u8>> {
    match std::env::var("CALLBUS_JWT_SECRET") {
        Ok(s) if !s.is_empty() => Ok(s.into_bytes()),
        _ if dev => {
            warn!("CALLBUS_JWT_SECRET is not set: using the fixed development secret");
            Ok(DEV_SECRET.as_bytes().to_vec())
        }
        _ => bail!("CALLBUS_JWT_SECRET must be set (or run with --dev for a local demo)"),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.dev && !(args.http.ip().is_loopback() && args.mqtt.ip().is_loopback()) {
        bail!("--dev serves development tokens to anyone: it only binds loopback addresses");
    }
    let config = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::parse(DEFAULT_CONFIG)?,
    };
    if args.ring_timeout == 0 {
        bail!("--ring-timeout must be at least 1 second");
    }
    match callbus::net::raise_open_file_limit() {
        Ok((soft, hard)) => info!(soft, hard, "open-file limit (each connection takes one)"),
        Err(e) => warn!(error = %e, "could not read or raise the open-file limit"),
    }
    let mut settings = Settings::new(config, args.data_dir.clone(), jwt_secret(args.dev)?);
    settings.ring_timeout = std::time::Duration::from_secs(args.ring_timeout);
    if args.call_lost_grace == 0 || args.max_call_duration == 0 {
        bail!("--call-lost-grace and --max-call-duration must be at least 1 second");
    }
    settings.call_lost_grace = std::time::Duration::from_secs(args.call_lost_grace);
    settings.max_call_duration = std::time::Duration::from_secs(args.max_call_duration);
    settings.dev = args.dev;
    if let (Some(url), Some(secret)) = (&args.push_webhook, &args.push_secret) {
        let webhook =
            callbus::push::Webhook::new(url, secret.as_bytes()).map_err(anyhow::Error::msg)?;
        settings.push = Some(webhook);
    }
    settings.cors_origins = args.cors_origins.clone();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        settings.tls = Some(callbus::tls::acceptor(cert, key)?);
    }
    settings.turn = match &args.turn_secret {
        Some(secret) if !secret.is_empty() => {
            if args.turn_uris.is_empty() {
                bail!("--turn-secret needs --turn-uris (e.g. turn:turn.example.com:3478)");
            }
            Some(TurnConfig {
                secret: secret.clone(),
                uris: args.turn_uris.clone(),
                ttl_secs: 24 * 3600,
            })
        }
        _ => None,
    };
    if let Some(database) = &args.database {
        let node_id = match &args.node_id {
            Some(id) if callbus::ids::is_valid_id(id) => id.clone(),
            Some(_) => bail!("--node-id must be 1-64 characters of [A-Za-z0-9_-]"),
            None => format!("node-{}", callbus::ids::random_hex::<4>()),
        };
        if args.cluster.iter().any(|url| url.trim().is_empty()) {
            bail!("--cluster takes nats:// URLs separated by commas");
        }
        settings.cluster = Some(callbus::cluster::ClusterOptions {
            nats: args.cluster.clone(),
            database: database.clone(),
            node_id,
        });
    }
    let http = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding HTTP on {}", args.http))?;
    let mqtt = TcpListener::bind(args.mqtt)
        .await
        .with_context(|| format!("binding MQTT on {}", args.mqtt))?;
    let server = Server::start(settings, http, mqtt).await?;
    if args.dev {
        println!(
            "callbus (dev) on http://{} and mqtt://{}: try `callbus token --sub alice`",
            server.http_addr, server.mqtt_addr
        );
    }
    let token = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    server.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    if !callbus::ids::is_valid_id(&args.sub) {
        bail!("--sub must be 1-64 characters of [A-Za-z0-9_-]");
    }
    let secret = jwt_secret(false)?;
    let token = Authenticator::new(&secret).issue(
        &args.sub,
        args.username.as_deref(),
        args.role,
        args.ttl,
    )?;
    println!("{token}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: not in files or the journal (nor in the text each
        // connection's span keeps).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Token(args) => token(args),
    }
}
