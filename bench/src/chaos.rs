//! A fault campaign against cluster mode: 3 callbus nodes (processes), 3 clustered
//! `nats-server`s and PostgreSQL on loopback; phones with persistent sessions that drop and
//! resume on random nodes; writers publishing numbered QoS 1 chat into the phones'
//! conversations, reconnecting to a random node when their connection dies; and two fault
//! threads, overlapping, seeded and logged: SIGKILL and restart of a node, SIGSTOP/SIGCONT of a
//! node or a NATS server, kill and restart of a NATS server (never two at once), PostgreSQL
//! stopped. Then every phone drains on a healthy cluster, and a checker compares what the
//! writers had acknowledged with what the phones received.

use callbus::auth::{Authenticator, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::conns::{spawn_callbus_unwaited, Proc, SECRET};
use crate::engines::free_port;
use crate::engines::{Nats, Postgres};
use crate::util::{lock, percentile};

const NODES: usize = 3;
/// A phone that resumes with messages waiting must get the first within this.
const PROMPT: Duration = Duration::from_secs(5);
/// How long phones have to drain once the faults stop.
const DRAIN: Duration = Duration::from_secs(120);

/// A small seeded generator (splitmix64), so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration between `lo` and `hi` seconds.
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(lo + (hi - lo) * unit)
    }
}

/// What the clients saw, in seconds since the start.
#[derive(Default)]
struct Record {
    /// (writer, n) → (connection first sent on, connection acknowledged on, when).
    acked: HashMap<(usize, u64), (u64, u64, f64)>,
    /// (writer, n) → the connection it was first sent on.
    first_sent: HashMap<(usize, u64), u64>,
    /// Per phone: (its connection, writer n, when), in arrival order.
    got: Vec<Vec<(u64, u64, f64)>>,
    /// Per phone: (its connection, when it connected, when it ended).
    connections: Vec<Vec<(u64, f64, f64)>>,
    /// Per writer: whether it stopped (nothing of it is in flight any more).
    written: Vec<bool>,
    faults: usize,
    /// Resumes that found no session (CONNACK session present 0) after one was made.
    forgotten: usize,
    /// Nodes that exited by themselves.
    exits: usize,
}

/// The processes under test, with what it takes to restart them.
struct Cluster {
    nats: Mutex<Nats>,
    pg: tokio::sync::Mutex<Postgres>,
    nodes: Mutex<Vec<Option<Proc>>>,
    ports: Vec<(u16, u16)>,
    dirs: Vec<PathBuf>,
    args: Vec<Vec<String>>,
    /// Set while a fault holds the component: a NATS server, a node, the database.
    busy: Mutex<HashSet<String>>,
    _root: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let nats = Nats::start(3).await?;
        let pg = Postgres::start().await?;
        let root = tempfile::tempdir()?;
        let config = root.path().join("callbus.toml");
        let text = callbus::config::DEFAULT_CONFIG
            .replace("initiate_per_minute = 20", "initiate_per_minute = 6000000")
            .replace("initiate_burst = 10", "initiate_burst = 100000");
        std::fs::write(&config, text)?;
        let mut cluster = Cluster {
            ports: Vec::new(),
            dirs: Vec::new(),
            args: Vec::new(),
            nodes: Mutex::new(Vec::new()),
            busy: Mutex::default(),
            nats: Mutex::new(nats),
            pg: tokio::sync::Mutex::new(pg),
            _root: root,
        };
        let database = cluster.pg.lock().await.url();
        for i in 0..NODES {
            let urls = lock(&cluster.nats).urls_from(i % 3);
            cluster.ports.push((free_port()?, free_port()?));
            cluster
                .dirs
                .push(cluster._root.path().join(format!("node-{i}")));
            cluster.args.push(vec![
                "--cluster".into(),
                urls,
                "--database".into(),
                database.clone(),
                "--node-id".into(),
                format!("chaos-{i}"),
                "--config".into(),
                config.to_string_lossy().into_owned(),
            ]);
        }
        for i in 0..NODES {
            cluster.spawn(i)?;
        }
        for i in 0..NODES {
            cluster.until_healthy(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&self, i: usize) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        let (http, mqtt) = self.ports[i];
        let proc = spawn_callbus_unwaited(&self.dirs[i], http, mqtt, &args)?;
        let mut nodes = lock(&self.nodes);
        if nodes.len() <= i {
            nodes.resize_with(i + 1, || None);
        }
        nodes[i] = Some(proc);
        Ok(())
    }

    async fn until_healthy(&self, i: usize) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.ports[i].0);
        for _ in 0..3000 {
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("node {i} did not become healthy")
    }

    /// Whether node `i`'s process ended by itself (not killed by a fault); it is started
    /// again.
    fn exited(&self, i: usize) -> bool {
        let mut nodes = lock(&self.nodes);
        let ended = nodes[i]
            .as_mut()
            .is_some_and(|p| p.0.try_wait().is_ok_and(|s| s.is_some()));
        if ended {
            if let Some(proc) = nodes[i].take() {
                std::mem::forget(proc); // reaped
            }
        }
        ended
    }

    fn node_pid(&self, i: usize) -> Option<u32> {
        lock(&self.nodes)[i].as_ref().map(|p| p.0.id())
    }

    fn take(&self, what: &str) -> bool {
        lock(&self.busy).insert(what.to_owned())
    }

    fn free(&self, what: &str) {
        lock(&self.busy).remove(what);
    }
}

/// The kinds of fault `CALLBUS_CHAOS_FAULTS` allows (all when unset), by name: `node-kill`,
/// `node-stop`, `nats-kill`, `nats-stop`, `pg`; to narrow a hunt down.
fn allowed(kind: u64) -> bool {
    const NAMES: [&str; 5] = ["node-kill", "node-stop", "nats-kill", "nats-stop", "pg"];
    match std::env::var("CALLBUS_CHAOS_FAULTS") {
        Ok(list) => list
            .split(',')
            .any(|name| name.trim() == NAMES[kind as usize]),
        Err(_) => true,
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a child this process spawned and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// One fault, chosen by `rng`, held for a while and then healed; what it was.
async fn fault(cluster: &Cluster, rng: &mut Rng) -> Option<String> {
    let kind = rng.below(5);
    if !allowed(kind) {
        return None;
    }
    let which = rng.below(3) as usize;
    let hold = rng.secs(2.0, 9.0);
    let name = match kind {
        0 | 1 => format!("node-{which}"),
        2 | 3 => "nats".to_owned(), // one NATS server at a time
        _ => "pg".to_owned(),
    };
    if !cluster.take(&name) {
        return None;
    }
    let nats_pid = lock(&cluster.nats).pid(which);
    let node_pid = cluster.node_pid(which);
    let what = match kind {
        0 => {
            let proc = lock(&cluster.nodes)[which].take();
            if let Some(mut proc) = proc {
                let _ = proc.0.kill(); // SIGKILL
                let _ = proc.0.wait();
                std::mem::forget(proc); // reaped: nothing for its Drop to stop
            }
            let down = rng.secs(0.5, 3.0);
            tokio::time::sleep(down).await;
            if let Err(e) = cluster.spawn(which) {
                eprintln!("node {which} did not restart: {e}");
            }
            format!(
                "SIGKILL node {which}, restarted after {:.1} s",
                down.as_secs_f64()
            )
        }
        1 => match node_pid {
            Some(pid) => {
                signal(pid, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(pid, libc::SIGCONT);
                format!("SIGSTOP node {which} for {:.1} s", hold.as_secs_f64())
            }
            None => String::new(),
        },
        2 => {
            lock(&cluster.nats).kill(which);
            tokio::time::sleep(hold).await;
            if let Err(e) = lock(&cluster.nats).start_server(which) {
                eprintln!("nats-server {which} did not restart: {e}");
            }
            format!(
                "kill nats-server {which}, restarted after {:.1} s",
                hold.as_secs_f64()
            )
        }
        3 => match nats_pid {
            Some(pid) => {
                signal(pid, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(pid, libc::SIGCONT);
                format!(
                    "SIGSTOP nats-server {which} for {:.1} s",
                    hold.as_secs_f64()
                )
            }
            None => String::new(),
        },
        _ => {
            let mut pg = cluster.pg.lock().await;
            let stopped = pg.stop().is_ok();
            tokio::time::sleep(hold).await;
            if let Err(e) = pg.resume().await {
                eprintln!("postgres did not restart: {e}");
            }
            match stopped {
                true => format!("PostgreSQL stopped for {:.1} s", hold.as_secs_f64()),
                false => String::new(),
            }
        }
    };
    cluster.free(&name);
    (!what.is_empty()).then_some(what)
}

fn token(user: &str) -> String {
    let auth = Authenticator::new(SECRET.as_bytes());
    auth.issue(user, None, Role::User, 24 * 3600)
        .expect("token")
}

fn options(client_id: &str, user: &str, port: u16, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_clean_session(clean)
        .set_credentials(user, token(user))
        .set_keep_alive(Duration::from_secs(5))
        .set_inflight(100);
    options
}

/// Writer `w`: a numbered QoS 1 message into `chat/c<w>` every 250 ms, over connections to
/// random nodes, each one's unacknowledged messages sent again on the next. Once stopped, and
/// done with what was in flight, it says so in the record.
async fn writer(
    w: usize,
    cluster: Arc<Cluster>,
    record: Arc<Mutex<Record>>,
    start: Instant,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    write(w, cluster, record.clone(), start, stop, seed).await;
    lock(&record).written[w] = true;
}

async fn write(
    w: usize,
    cluster: Arc<Cluster>,
    record: Arc<Mutex<Record>>,
    start: Instant,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let mut unacked: VecDeque<u64> = VecDeque::new();
    let mut next = 0u64;
    let user = format!("writer{w}");
    // Once stopped, what is unacknowledged is tried for at most this long.
    let mut give_up: Option<Instant> = None;
    let done = |unacked: &VecDeque<u64>, give_up: &mut Option<Instant>| {
        if !stop.load(Ordering::Relaxed) {
            return false;
        }
        let at = *give_up.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
        unacked.is_empty() || Instant::now() > at
    };
    for conn in 0u64.. {
        if done(&unacked, &mut give_up) {
            return;
        }
        let node = rng.below(NODES as u64) as usize;
        let port = cluster.ports[node].1;
        let (client, mut events) =
            AsyncClient::new(options(&format!("w{w}-{conn}"), &user, port, true), 1000);
        let text =
            |n: u64| serde_json::json!({"type": "message", "text": format!("{w} {conn} {n}")});
        // Publishes in the order they go out: pkid → n as rumqttc numbers them.
        let mut queued: VecDeque<u64> = VecDeque::new();
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        for &n in &unacked {
            let topic = format!("chat/c{w}");
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, text(n).to_string())
                .is_ok()
            {
                queued.push_back(n);
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if stop.load(Ordering::Relaxed) {
                        if done(&unacked, &mut give_up) {
                            return;
                        }
                        continue;
                    }
                    let n = next;
                    next += 1;
                    lock(&record).first_sent.insert((w, n), conn);
                    unacked.push_back(n);
                    let topic = format!("chat/c{w}");
                    if client.try_publish(topic, QoS::AtLeastOnce, false, text(n).to_string()).is_ok() {
                        queued.push_back(n);
                    }
                }
                event = events.poll() => match event {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(n) = queued.pop_front() {
                            by_pkid.insert(pkid, n);
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let at = start.elapsed().as_secs_f64();
                        eprintln!("writer {w} connection {conn} on node {node} at {at:.1} s");
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(n) = by_pkid.remove(&ack.pkid) {
                            unacked.retain(|m| *m != n);
                            let at = start.elapsed().as_secs_f64();
                            let mut record = lock(&record);
                            let sent = record.first_sent.get(&(w, n)).copied().unwrap_or(conn);
                            record.acked.entry((w, n)).or_insert((sent, conn, at));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Phone `p`: a persistent session subscribed to `chat/c<p>` at QoS 1, connected to a random
/// node for 5 to 20 s at a time, with gaps, until `stop`; then on one node until it has
/// everything that was acknowledged to its conversation, or `DRAIN` passed.
async fn phone(
    p: usize,
    cluster: Arc<Cluster>,
    record: Arc<Mutex<Record>>,
    start: Instant,
    stop: Arc<AtomicBool>,
    seed: u64,
    subscribed_once: Arc<tokio::sync::Semaphore>,
) {
    let mut rng = Rng(seed);
    let user = format!("phone{p}");
    let mut subscribed = false;
    let mut drain_until: Option<Instant> = None;
    for conn in 0u64.. {
        let draining = stop.load(Ordering::Relaxed);
        if draining {
            let until = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN);
            if Instant::now() > until || drained(&record, p) {
                return;
            }
        }
        let node = if draining {
            conn as usize % NODES
        } else {
            rng.below(NODES as u64) as usize
        };
        let port = cluster.ports[node].1;
        let (client, mut events) =
            AsyncClient::new(options(&format!("phone{p}"), &user, port, false), 100);
        let stay = if draining {
            Duration::from_secs(10)
        } else {
            rng.secs(5.0, 20.0)
        };
        let began = start.elapsed().as_secs_f64();
        let ends = tokio::time::Instant::now() + stay;
        let mut connected = false;
        loop {
            let event = tokio::select! {
                event = events.poll() => event,
                _ = tokio::time::sleep_until(ends) => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    let at = start.elapsed().as_secs_f64();
                    let present = ack.session_present;
                    eprintln!("phone {p} connection {conn} on node {node} at {at:.1} s, present {present}");
                    if !ack.session_present {
                        if subscribed {
                            lock(&record).forgotten += 1;
                        }
                        let _ = client.try_subscribe(format!("chat/c{p}"), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if !subscribed {
                        subscribed_once.add_permits(1);
                    }
                    subscribed = true;
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let at = start.elapsed().as_secs_f64();
                    let text = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                        .ok()
                        .and_then(|v| v["text"].as_str().map(str::to_owned));
                    let n = text.and_then(|t| t.split(' ').nth(2).and_then(|n| n.parse().ok()));
                    if let Some(n) = n {
                        lock(&record).got[p].push((conn, n, at));
                    }
                    if draining && drained(&record, p) {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if connected {
            let ended = start.elapsed().as_secs_f64();
            lock(&record).connections[p].push((conn, began, ended));
        }
        drop(client);
        drop(events); // the socket goes, without DISCONNECT
        let gap = if draining {
            Duration::from_millis(100)
        } else {
            rng.secs(0.2, 3.0)
        };
        tokio::time::sleep(gap).await;
    }
}

/// Whether phone `p` has every message acknowledged to its conversation, its writer done.
fn drained(record: &Mutex<Record>, p: usize) -> bool {
    let record = lock(record);
    if !record.written[p] {
        return false; // more may be acknowledged yet
    }
    let got: HashSet<u64> = record.got[p].iter().map(|(_, n, _)| *n).collect();
    record
        .acked
        .keys()
        .filter(|(w, _)| *w == p)
        .all(|(_, n)| got.contains(n))
}

pub async fn run(minutes: f64, seed: u64, phones: usize) -> anyhow::Result<()> {
    let cluster = Arc::new(Cluster::start().await?);
    let (http, _) = cluster.ports[0];
    let client = reqwest::Client::new();
    let service =
        Authenticator::new(SECRET.as_bytes()).issue("chaos", None, Role::Service, 3600)?;
    for p in 0..phones {
        let body = serde_json::json!({"members": [format!("writer{p}"), format!("phone{p}")]});
        let url = format!("http://127.0.0.1:{http}/api/conversations/c{p}/");
        let resp = client
            .put(url)
            .bearer_auth(&service)
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "members: {}", resp.status());
    }
    let record = Arc::new(Mutex::new(Record {
        got: vec![Vec::new(); phones],
        connections: vec![Vec::new(); phones],
        written: vec![false; phones],
        ..Default::default()
    }));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut seeds = Rng(seed);
    let mut clients = Vec::new();
    // Writers start once every phone's session is subscribed: what they send is for it.
    let subscribed = Arc::new(tokio::sync::Semaphore::new(0));
    for p in 0..phones {
        let (c, r, s) = (cluster.clone(), record.clone(), stop.clone());
        let once = subscribed.clone();
        clients.push(tokio::spawn(phone(p, c, r, start, s, seeds.next(), once)));
    }
    let all = u32::try_from(phones)?;
    let ready = tokio::time::timeout(Duration::from_secs(60), subscribed.acquire_many(all));
    let _ready = ready
        .await
        .map_err(|_| anyhow::anyhow!("the phones did not subscribe"))??;
    for p in 0..phones {
        let (c, r, s) = (cluster.clone(), record.clone(), stop.clone());
        clients.push(tokio::spawn(writer(p, c, r, start, s, seeds.next())));
    }
    println!("\n## chaos: {minutes} min of faults, seed {seed}, {phones} phones and writers");
    let deadline = start + Duration::from_secs_f64(minutes * 60.0);
    let mut nemeses = Vec::new();
    for k in 0..2 {
        let (cluster, record) = (cluster.clone(), record.clone());
        let mut rng = Rng(seeds.next());
        nemeses.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(rng.secs(4.0, 10.0)).await;
                let began = start.elapsed().as_secs_f64();
                if let Some(what) = fault(&cluster, &mut rng).await {
                    eprintln!("fault {k} at {began:.1} s: {what}");
                    lock(&record).faults += 1;
                }
                for i in 0..NODES {
                    if cluster.take(&format!("node-{i}")) {
                        if cluster.exited(i) {
                            eprintln!("node {i} exited by itself; started again");
                            lock(&record).exits += 1;
                            let _ = cluster.spawn(i);
                        }
                        cluster.free(&format!("node-{i}"));
                    }
                }
            }
        }));
    }
    for nemesis in nemeses {
        nemesis.await?;
    }
    // Healed: every node runs.
    for i in 0..NODES {
        if cluster.exited(i) {
            lock(&record).exits += 1;
            cluster.spawn(i)?;
        }
        if let Some(pid) = cluster.node_pid(i) {
            signal(pid, libc::SIGCONT);
        }
        cluster.until_healthy(i).await?;
    }
    eprintln!(
        "faults over at {:.1} s; draining",
        start.elapsed().as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await?;
    }
    let lost = report(&lock(&record), phones);
    if !lost.is_empty() {
        let urls = lock(&cluster.nats).urls_from(0);
        // Every client is done: the record is taken whole, not locked across the awaits.
        let record = std::mem::take(&mut *lock(&record));
        if let Err(e) = postmortem(&urls, &lost, &record).await {
            eprintln!("postmortem: {e}");
        }
    }
    Ok(())
}

/// Where JetStream has what was never delivered: in the stream or not, and against the ack
/// floor of the queue meant to deliver it.
async fn postmortem(urls: &str, lost: &[(usize, u64)], record: &Record) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, consumer};
    let servers: Vec<&str> = urls.split(',').collect();
    let client = async_nats::connect(servers).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream("CALLBUS").await?;
    // (writer, n) -> (stream sequence, when stored), every copy.
    let mut stored: HashMap<(usize, u64), Vec<(u64, String)>> = HashMap::new();
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "callbus.t.chat.>".into(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = reader.messages().await?;
    use futures_util::StreamExt;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(message))) = next else { break };
        let Ok(info) = message.info() else { continue };
        let (seq, pending) = (info.stream_sequence, info.pending);
        let at = info.published.to_string();
        let text = String::from_utf8_lossy(&message.payload);
        if let Some(i) = text.find("\"text\":\"") {
            let rest = &text[i + 8..];
            let mut words = rest.split(['"', ' ']);
            let w = words.next().and_then(|w| w.parse().ok());
            let n = words.nth(1).and_then(|n| n.parse().ok());
            if let (Some(w), Some(n)) = (w, n) {
                stored.entry((w, n)).or_default().push((seq, at));
            }
        }
        if pending == 0 {
            break;
        }
    }
    let mut queues = stream.consumers();
    let mut listing_errors = 0;
    while let Some(listed) = queues.next().await {
        let info = match listed {
            Ok(info) => info,
            // Said, and the listing goes on (a few times) past a page JetStream cannot give.
            Err(e) => {
                eprintln!("queue listing: {e}");
                listing_errors += 1;
                if listing_errors >= 5 {
                    break;
                }
                continue;
            }
        };
        eprintln!(
            "queue {} on {}: delivered {} ack floor {} ack pending {} pending {} redelivered {} waiting {} leader {:?}",
            info.name,
            info.config.filter_subject,
            info.delivered.stream_sequence,
            info.ack_floor.stream_sequence,
            info.num_ack_pending,
            info.num_pending,
            info.num_redelivered,
            info.num_waiting,
            info.cluster.and_then(|c| c.leader),
        );
    }
    for (w, n) in lost {
        let got = &record.got[*w];
        let before = got
            .iter()
            .filter(|(_, m, _)| m < n)
            .max_by_key(|(_, m, _)| *m);
        let after = got
            .iter()
            .filter(|(_, m, _)| m > n)
            .min_by_key(|(_, m, _)| *m);
        eprintln!(
            "lost {w}/{n}: stored {:?}; phone got {:?} before, {:?} after (connection, n, at)",
            stored.get(&(*w, *n)),
            before,
            after
        );
    }
    Ok(())
}

/// Prints the table; gives back what was never delivered (writer, n).
fn report(record: &Record, phones: usize) -> Vec<(usize, u64)> {
    let acked = record.acked.len();
    let mut lost = 0;
    let mut lost_ones = Vec::new();
    let mut violations = 0;
    let mut duplicates = 0;
    let mut latencies = Vec::new();
    let (mut waiting_resumes, mut silent) = (0, 0);
    for p in 0..phones {
        let got = &record.got[p];
        let mut first: HashMap<u64, (u64, f64)> = HashMap::new();
        for (conn, n, at) in got {
            if first.contains_key(n) {
                duplicates += 1;
            } else {
                first.insert(*n, (*conn, *at));
            }
        }
        let mine: Vec<(u64, (u64, u64, f64))> = (record.acked.iter())
            .filter(|((w, _), _)| *w == p)
            .map(|((_, n), v)| (*n, *v))
            .collect();
        for (n, (sent, acked_on, acked_at)) in &mine {
            match first.get(n) {
                Some((_, at)) => latencies.push((at - acked_at).max(0.0)),
                None => {
                    lost += 1;
                    lost_ones.push((p, *n));
                    eprintln!(
                        "never delivered: writer {p} message {n}, acknowledged at {acked_at:.1} s \
                         (sent on its connection {sent}, acknowledged on {acked_on})"
                    );
                }
            }
        }
        // Order within one publisher connection: sent and acknowledged on it.
        let mut by_conn: HashMap<u64, Vec<u64>> = HashMap::new();
        for (n, (sent, acked_on, _)) in &mine {
            if sent == acked_on {
                by_conn.entry(*sent).or_default().push(*n);
            }
        }
        for ns in by_conn.values_mut() {
            ns.sort_unstable();
            let arrivals: Vec<f64> = ns
                .iter()
                .filter_map(|n| first.get(n).map(|f| f.1))
                .collect();
            for (i, a) in arrivals.iter().enumerate() {
                violations += arrivals[i + 1..].iter().filter(|b| *b < a).count();
            }
        }
        // Resumes with something acknowledged and not yet received waiting.
        for (conn, began, ended) in &record.connections[p] {
            let waiting = mine.iter().any(|(n, (_, _, acked_at))| {
                acked_at < began && first.get(n).is_none_or(|(_, at)| at >= began)
            });
            if !waiting || ended - began < PROMPT.as_secs_f64() {
                continue;
            }
            waiting_resumes += 1;
            let delivered = got
                .iter()
                .find(|(c, _, _)| c == conn)
                .map(|(_, _, at)| at - began);
            if delivered.is_none_or(|d| d > PROMPT.as_secs_f64()) {
                silent += 1;
                eprintln!("silent resume: phone {p} connection {conn} at {began:.1} s, first delivery after {delivered:?} s");
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&latencies, 99.0);
    let max = latencies.last().copied().unwrap_or(0.0);
    println!("| faults | QoS 1 acknowledged | never delivered | order violations | duplicates | ack to delivery p99 / max | resumes silent > 5 s | sessions forgotten | node exits |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {acked} | {lost} | {violations} | {duplicates} | {p99:.1} / {max:.1} s | {silent} of {waiting_resumes} | {} | {} |",
        record.faults, record.forgotten, record.exits
    );
    lost_ones
}
