//! Call-setup throughput: C caller/callee pairs each run the whole flow in a loop — initiate
//! (REST), notification.created (MQTT), offer, answer, accept (REST) + call.accepted, end (REST)
//! + call.end — against one callbus with durable (fsynced) state.

use callbus::auth::Role;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::util::{mqtt_client, percentile, Api, Callbus};

pub(crate) const STEPS: [&str; 6] = [
    "initiate",
    "ring (notification.created)",
    "offer",
    "answer",
    "accept + call.accepted",
    "end + call.end",
];

pub(crate) struct Party {
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<Value>,
}

impl Party {
    pub(crate) async fn connect(cb: &impl Api, user: &str) -> anyhow::Result<Party> {
        let topic = format!("users/{user}/notifications");
        let (client, mut events) = mqtt_client(
            cb.mqtt_port(),
            &format!("{user}-dev"),
            user,
            &cb.token(user, Role::User),
            &[topic],
        )
        .await?;
        let (tx, inbox) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Party { client, inbox })
    }

    async fn expect(&mut self, kind: &str) -> anyhow::Result<Value> {
        loop {
            let v = tokio::time::timeout(Duration::from_secs(10), self.inbox.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
            if v["type"] == kind {
                return Ok(v);
            }
        }
    }

    async fn signal(&self, cid: &str, msg: Value) -> anyhow::Result<()> {
        self.client
            .publish(
                format!("chat/{cid}"),
                QoS::AtLeastOnce,
                false,
                msg.to_string(),
            )
            .await?;
        Ok(())
    }
}

/// One whole flow; per-step durations in µs, and the whole.
pub(crate) async fn flow(
    cb: &impl Api,
    caller: (&str, &mut Party),
    callee: (&str, &mut Party),
    cid: &str,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let (caller_id, a) = caller;
    let (callee_id, b) = callee;
    let start = Instant::now();
    let mut marks = Vec::with_capacity(STEPS.len());
    let mut lap = Instant::now();
    let mut mark = |marks: &mut Vec<f64>| {
        marks.push(lap.elapsed().as_secs_f64() * 1e6);
        lap = Instant::now();
    };
    let call = cb
        .post(
            "/api/calls/initiate/",
            caller_id,
            json!({"receiver_id": callee_id, "call_type": "video", "conversation_id": cid}),
        )
        .await?;
    let id = call["id"].as_u64().unwrap_or_default().to_string();
    mark(&mut marks);
    b.expect("notification.created").await?;
    mark(&mut marks);
    a.signal(cid, json!({"type": "call.offer", "call_id": id, "offer": {"type": "offer", "sdp": "o".repeat(3000)}})).await?;
    b.expect("call.offer").await?;
    mark(&mut marks);
    b.signal(cid, json!({"type": "call.answer", "call_id": id, "answer": {"type": "answer", "sdp": "a".repeat(3000)}})).await?;
    a.expect("call.answer").await?;
    mark(&mut marks);
    cb.post(&format!("/api/calls/{id}/accept/"), callee_id, json!({}))
        .await?;
    a.expect("call.accepted").await?;
    mark(&mut marks);
    cb.post(&format!("/api/calls/{id}/end/"), caller_id, json!({}))
        .await?;
    b.expect("call.end").await?;
    mark(&mut marks);
    Ok((marks, start.elapsed().as_secs_f64() * 1e6))
}

async fn run_level(pairs: usize, secs: u64) -> anyhow::Result<()> {
    let cb = std::sync::Arc::new(Callbus::start().await?);
    print!("| {pairs} |");
    run_on(std::slice::from_ref(&cb), pairs, secs, "").await?;
    if let Ok(cb) = std::sync::Arc::try_unwrap(cb) {
        cb.server.stop().await;
    }
    Ok(())
}

/// `pairs` pairs on `nodes`: pair i's caller on node i, its callee on node i + 1 (the same
/// node when there is one), the caller's REST calls on the caller's node. Prints the rest of
/// a table row.
pub(crate) async fn run_on(
    nodes: &[std::sync::Arc<Callbus>],
    pairs: usize,
    secs: u64,
    tag: &str,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let (caller, callee, cid) = (
            format!("c{tag}{i}"),
            format!("r{tag}{i}"),
            format!("p{tag}{i}"),
        );
        let cb = nodes[i % nodes.len()].clone();
        cb.set_members(&cid, &[caller.clone(), callee.clone()])
            .await?;
        let mut a = Party::connect(&*cb, &caller).await?;
        let mut b = Party::connect(&*nodes[(i + 1) % nodes.len()], &callee).await?;
        tasks.push(async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut results = Vec::new();
            while Instant::now() < deadline {
                match flow(&*cb, (&caller, &mut a), (&callee, &mut b), &cid).await {
                    Ok(r) => results.push(r),
                    Err(e) => {
                        eprintln!("flow failed: {e}");
                        break;
                    }
                }
            }
            results
        });
    }
    let started = Instant::now();
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    let mut results = Vec::new();
    for h in handles {
        results.extend(h.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut whole: Vec<f64> = results.iter().map(|(_, w)| *w).collect();
    whole.sort_by(f64::total_cmp);
    print!(
        " {} | {:.0} | {:.2} | {:.2} |",
        results.len(),
        results.len() as f64 / elapsed,
        percentile(&whole, 50.0) / 1000.0,
        percentile(&whole, 99.0) / 1000.0
    );
    for step in 0..STEPS.len() {
        let mut s: Vec<f64> = results.iter().map(|(m, _)| m[step]).collect();
        s.sort_by(f64::total_cmp);
        print!(
            " {:.2} / {:.2} |",
            percentile(&s, 50.0) / 1000.0,
            percentile(&s, 99.0) / 1000.0
        );
    }
    println!();
    Ok(())
}

pub async fn run(levels: &[usize], secs: u64) -> anyhow::Result<()> {
    println!(
        "\n## calls: whole flow per pair, {secs} s per level; times in ms (p50 / p99 per step)"
    );
    print!("| pairs C | flows | flows/s | whole p50 | whole p99 |");
    for s in STEPS {
        print!(" {s} |");
    }
    println!();
    println!("|---|---|---|---|---|{}", "---|".repeat(STEPS.len()));
    for &c in levels {
        run_level(c, secs).await?;
    }
    Ok(())
}

/// Server CPU per whole flow: `pairs` pairs against a separate callbus process for `secs` s;
/// the process's CPU time (utime + stime from `/proc`) over the run divided by the flows.
pub async fn cpu_per_flow(levels: &[usize], secs: u64) -> anyhow::Result<()> {
    println!("\n## calls, server CPU: whole flows against a separate callbus process, {secs} s per level");
    println!("| pairs C | flows | flows/s | server CPU per flow | server CPU use | flushes per flow | commits per flush | context switches per flow |");
    println!("|---|---|---|---|---|---|---|---|");
    for &pairs in levels {
        let cb = std::sync::Arc::new(crate::util::Remote::start().await?);
        let mut tasks = Vec::new();
        for i in 0..pairs {
            let (caller, callee, cid) = (format!("c{i}"), format!("r{i}"), format!("p{i}"));
            let path = format!("/api/conversations/{cid}/");
            let members = json!({ "members": [&caller, &callee] });
            let service = ("bench-app", Role::Service);
            cb.send(reqwest::Method::PUT, &path, service, members)
                .await?;
            let mut a = Party::connect(&*cb, &caller).await?;
            let mut b = Party::connect(&*cb, &callee).await?;
            let cb = cb.clone();
            tasks.push(async move {
                let deadline = Instant::now() + Duration::from_secs(secs);
                let mut flows = 0u64;
                while Instant::now() < deadline {
                    match flow(&*cb, (&caller, &mut a), (&callee, &mut b), &cid).await {
                        Ok(_) => flows += 1,
                        Err(e) => {
                            eprintln!("flow failed: {e}");
                            break;
                        }
                    }
                }
                flows
            });
        }
        let pid = cb.pid();
        let counts = || async {
            [
                crate::util::metric(cb.http, "callbus_store_flushes_total").await,
                crate::util::metric(cb.http, "callbus_store_commits_total").await,
                crate::util::context_switches(pid),
            ]
        };
        let before = counts().await;
        let (ticks, started) = (crate::util::cpu_ticks(pid), Instant::now());
        let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
        let mut flows = 0;
        for h in handles {
            flows += h.await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_secs = (crate::util::cpu_ticks(pid) - ticks) as f64 / 100.0;
        let after = counts().await;
        let [flushes, commits, switches] = [0, 1, 2].map(|i| after[i] - before[i]);
        let per_flow = |n: u64| n as f64 / flows.max(1) as f64;
        println!(
            "| {pairs} | {flows} | {:.0} | {:.3} ms | {:.0}% | {:.2} | {:.2} | {:.1} |",
            flows as f64 / elapsed,
            cpu_secs * 1000.0 / flows.max(1) as f64,
            cpu_secs * 100.0 / elapsed,
            per_flow(flushes),
            commits as f64 / flushes.max(1) as f64,
            per_flow(switches),
        );
    }
    Ok(())
}
