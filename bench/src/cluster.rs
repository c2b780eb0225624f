//! Cluster mode with the real engines: three clustered `nats-server`s and a PostgreSQL, and
//! three callbus nodes in this process (the nodes share the machine's cores with the engines
//! and the clients, as they would not in production; the figures compare layouts side by side).
//!
//! - relay: signaling between two clients on the same node, then on two nodes.
//! - calls: whole flows per second with every pair on one node, then spread over three.
//! - failover: N clients on a node that is killed (a separate process, SIGKILL); each
//!   reconnects to another node: time until it is subscribed again, and until a notification
//!   sent after the kill reaches it; then the same with persistent sessions, the notification
//!   sent while they are away and brought by the resumed session.

use callbus::auth::Role;
use callbus::cluster::ClusterOptions;
use rumqttc::{Event, Packet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conns::spawn_callbus_with;
use crate::engines::{Nats, Postgres};
use crate::relay::{ratio_row, row, through, Route};
use crate::util::{mqtt_client, mqtt_client_with, percentile, Callbus};

async fn node(nats: &Nats, pg: &Postgres, i: usize) -> anyhow::Result<Arc<Callbus>> {
    let options = ClusterOptions {
        nats: nats.urls_from(i % 3).split(',').map(String::from).collect(),
        database: pg.url(),
        node_id: format!("bench-{i}"),
    };
    Ok(Arc::new(Callbus::start_with(Some(options)).await?))
}

pub async fn run(rate: usize, count: usize, secs: u64, clients: usize) -> anyhow::Result<()> {
    let nats = Nats::start(3).await?;
    let pg = Postgres::start().await?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(node(&nats, &pg, i).await?);
    }
    let port = |i: usize| nodes[i].server.mqtt_addr.port();

    println!("\n## cluster relay: {count} messages at {rate} msg/s (as in relay), latency in µs");
    println!("| path | p50 | p90 | p99 | max | lost |");
    println!("|---|---|---|---|---|---|");
    let signaling = |to: usize, ids| {
        let ports = (port(0), port(to));
        through(nodes[0].as_ref(), ports, ids, Route::Signaling, rate, count)
    };
    let same = signaling(0, ("sa", "sb")).await?;
    row("same node (NATS bus)", &same);
    let cross = signaling(1, ("xa", "xb")).await?;
    row("cross node (node 1 → NATS → node 2)", &cross);
    ratio_row("ratio cross/same", &cross, &same);

    println!("\n## cluster calls: whole flow per pair, {secs} s per row; times in ms (p50 / p99 per step)");
    print!("| nodes | pairs C | flows | flows/s | whole p50 | whole p99 |");
    for s in crate::calls::STEPS {
        print!(" {s} |");
    }
    println!();
    println!(
        "|---|---|---|---|---|---|{}",
        "---|".repeat(crate::calls::STEPS.len())
    );
    for pairs in [1, 10, 100] {
        print!("| 1 | {pairs} |");
        crate::calls::run_on(&nodes[..1], pairs, secs, &format!("one{pairs}-")).await?;
        print!("| 3 | {pairs} |");
        crate::calls::run_on(&nodes, pairs, secs, &format!("three{pairs}-")).await?;
    }

    failover(&nats, &pg, nodes[0].clone(), clients, false).await?;
    failover(&nats, &pg, nodes[0].clone(), clients, true).await
}

/// `clients` clients on a node process that is SIGKILLed; each comes back on `to`. With
/// `persistent`, their sessions are persistent and the notification is sent while they are
/// away: it comes from the session's queue when they are back.
async fn failover(
    nats: &Nats,
    pg: &Postgres,
    to: Arc<Callbus>,
    clients: usize,
    persistent: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let urls = nats.urls_from(1);
    let database = pg.url();
    let args = [
        "--cluster",
        &urls,
        "--database",
        &database,
        "--node-id",
        if persistent { "doomed-p" } else { "doomed" },
    ];
    let (mut doomed, _, doomed_mqtt) = spawn_callbus_with(dir.path(), &args).await?;
    let mut loops = Vec::with_capacity(clients);
    for i in 0..clients {
        let user = format!("f{i}");
        let topic = format!("users/{user}/notifications");
        let token = to.token(&user, Role::User);
        let subscribed =
            mqtt_client_with(doomed_mqtt, &user, &user, &token, &[topic], !persistent).await;
        let (_client, events) = subscribed?;
        loops.push((user, token, _client, events));
    }
    let mut tasks = Vec::with_capacity(clients);
    let to_port = to.server.mqtt_addr.port();
    let killed = Instant::now();
    doomed.0.kill()?;
    for (user, token, client, mut events) in loops {
        let to = to.clone();
        tasks.push(tokio::spawn(async move {
            // The old connection's end is what the client notices.
            while events.poll().await.is_ok() {}
            drop(client);
            let body = serde_json::json!({"user_id": user, "payload": {"back": true}});
            let (client, mut events, resumed) = if persistent {
                // Sent while away; the session, not a new SUBSCRIBE, brings it.
                to.post_as("/api/notifications/", "bench-app", Role::Service, body)
                    .await?;
                let again = mqtt_client_with(to_port, &user, &user, &token, &[], false).await;
                let (client, mut events) = again?;
                loop {
                    let event = tokio::time::timeout(Duration::from_secs(30), events.poll());
                    if let Event::Incoming(Packet::ConnAck(ack)) = event.await?? {
                        anyhow::ensure!(ack.session_present, "{user}: session not found");
                        break (client, events, killed.elapsed());
                    }
                }
            } else {
                let topic = format!("users/{user}/notifications");
                let again = mqtt_client(to_port, &user, &user, &token, &[topic]).await;
                let (client, events) = again?;
                let resumed = killed.elapsed();
                to.post_as("/api/notifications/", "bench-app", Role::Service, body)
                    .await?;
                (client, events, resumed)
            };
            loop {
                let event = tokio::time::timeout(Duration::from_secs(30), events.poll()).await;
                if let Event::Incoming(Packet::Publish(_)) = event?? {
                    drop(client);
                    return anyhow::Ok((resumed, killed.elapsed()));
                }
            }
        }));
    }
    let mut resumed = Vec::new();
    let mut delivered = Vec::new();
    for task in tasks {
        let (r, d) = task.await??;
        resumed.push(r.as_secs_f64() * 1000.0);
        delivered.push(d.as_secs_f64() * 1000.0);
    }
    resumed.sort_by(f64::total_cmp);
    delivered.sort_by(f64::total_cmp);
    let (kind, back, received) = match persistent {
        false => (
            "clients",
            "subscribed again",
            "a notification sent once back, received",
        ),
        true => (
            "persistent sessions",
            "resumed (session present)",
            "the notification sent while away, received",
        ),
    };
    println!("\n## cluster failover: {clients} {kind} on a node that is SIGKILLed, back on another node; ms after the kill");
    println!("| | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, v) in [(back, &resumed), (received, &delivered)] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
