//! callbus benchmarks. `cargo run --release -p callbus-bench -- <relay|calls|conns|all>`
//!
//! - relay [rate] [count] [runs]: 3 KB and 300 B messages from A to B at a fixed rate through a
//!   bare rumqttd, Debian's Mosquitto, callbus's chat path and its signaling path (bridge and
//!   mirror to B's notifications), each in turn, `runs` times (5); medians, ratios and the
//!   servers' CPU and context switches per message. CALLBUS_BENCH_RELAY_PATHS=1,3 runs some.
//! - hops [rate] [count]: relay's Mosquitto, chat and signaling paths once each with their
//!   system calls traced (`perf`): each message's time from the sender's write through the
//!   server's wakeup, read, work and write to the receiver's read, hop by hop.
//! - calls [seconds] [pairs...]: C concurrent caller/callee pairs running the whole flow over
//!   REST and MQTT (1, 10, 100), in process and against a separate process (server CPU per flow).
//! - conns [N...] [ws|tcp|mosquitto...]: N idle MQTT clients against callbus over WebSocket, over
//!   TCP and Mosquitto (or only those named): RSS per connection and the time for one
//!   notification per user to reach all of them.
//! - sessions: N persistent sessions away while M messages each are queued, then all back:
//!   memory per stored session and the time until everything is replayed.
//! - notified N: N distinct users (none connected) notified once through REST: server RSS
//!   along the way and after, against its start (memory is bounded by live state).
//! - storm N: N MQTT clients through a restart of callbus: time until all are back and
//!   notified, peak CPU and RSS, and a probe pair's latency meanwhile.
//! - soak [minutes] [chart.svg]: a steady mixed load (call flows, chat, notifications,
//!   connection churn, stuck consumers) against a callbus process, sampled every 10 s and drawn.
//! - cluster [clients]: three nodes on three nats-servers and PostgreSQL: relay same-node
//!   against cross-node, flows/s on one node against three, failover time.
//! - chaos [minutes] [seed] [phones]: cluster mode under random overlapping faults (nodes
//!   killed and paused, NATS servers killed and paused, PostgreSQL stopped) while phones with
//!   persistent sessions roam and writers publish QoS 1; then a checker: acknowledged
//!   messages never delivered, order violations per publisher connection, duplicates,
//!   acknowledgement-to-delivery latency, resumes silent for over 5 s.
//! - hostile: attacks from one client (a WebSocket ping flood, half-sent HTTP requests and
//!   CONNECTs, stored sessions without end): the server's RSS, files and CPU while attacked,
//!   and how long a new client's CONNACK takes meanwhile.

mod calls;
mod chaos;
mod cluster;
mod conns;
mod engines;
mod hops;
mod hostile;
mod notified;
mod relay;
mod sessions;
mod soak;
mod storm;
mod util;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().map(String::as_str).unwrap_or("all");
    let num = |i: usize, default: usize| -> usize {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
    };
    println!("machine: {}", util::machine());
    match scenario {
        "relay" => relay::run(num(1, 2000), num(2, 10_000), num(3, 5)).await?,
        "hops" => relay::hops(num(1, 2000), num(2, 4000)).await?,
        "calls" | "calls-cpu" => {
            // calls [seconds per level] [pairs...]; calls-cpu runs only the server CPU part
            let mut levels: Vec<usize> =
                args.iter().skip(2).filter_map(|s| s.parse().ok()).collect();
            if levels.is_empty() {
                levels = vec![1, 10, 100];
            }
            if scenario == "calls" {
                calls::run(&levels, num(1, 5) as u64).await?;
            }
            calls::cpu_per_flow(&levels, num(1, 5) as u64).await?
        }
        "conns" => {
            // Sizes, and optionally which servers: `conns 5000 tcp` runs callbus over TCP only.
            let mut sizes: Vec<usize> = args[1..].iter().filter_map(|s| s.parse().ok()).collect();
            if sizes.is_empty() {
                sizes = vec![1_000, 10_000];
            }
            let targets: Vec<&str> = args[1..]
                .iter()
                .filter(|s| s.parse::<usize>().is_err())
                .map(String::as_str)
                .collect();
            conns::run(&sizes, &targets).await?
        }
        "sessions" => sessions::run(num(1, 1000), num(2, 20)).await?,
        "notified" => notified::run(num(1, 1_000_000)).await?,
        "storm" => storm::run(num(1, 10_000)).await?,
        "soak" => {
            let chart = args.get(2).map_or("docs/soak.svg", String::as_str);
            soak::run(num(1, 30) as u64, std::path::Path::new(chart)).await?
        }
        "cluster" => cluster::run(2000, 10_000, 5, num(1, 1000)).await?,
        "hostile" => hostile::run().await?,
        "chaos" => {
            let minutes = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(15.0);
            chaos::run(minutes, num(2, 1) as u64, num(3, 6)).await?
        }
        "all" => {
            relay::run(2000, 10_000, 5).await?;
            calls::run(&[1, 10, 100], 5).await?;
            conns::run(&[1_000, 10_000], &[]).await?;
            sessions::run(1000, 20).await?;
        }
        other => {
            anyhow::bail!(
                "unknown scenario {other}: use relay, hops, calls, calls-cpu, conns, sessions, notified, storm, soak, cluster, chaos, hostile or all"
            )
        }
    }
    Ok(())
}
