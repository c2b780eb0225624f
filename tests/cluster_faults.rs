//! Cluster mode under faults that overlap, each at a chosen moment: a node paused (SIGSTOP)
//! while its persistent session moves elsewhere, a node killed right after it acknowledged, a
//! NATS server paused while a publisher's messages are in flight. What every QoS 1 message a
//! node acknowledged must do: arrive, in the order its publisher sent it, soon after the
//! session is back.

mod common;

use common::cluster::Cluster;
use common::process::Proc;
use common::{granted, Client, Via};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// How soon a resumed session must get what waits for it.
const PROMPT: Duration = Duration::from_secs(5);
/// How long a paused NATS server sleeps (a fault drill's pauses were 2 to 9 s).
const PAUSE: Duration = Duration::from_secs(9);

fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a child this process spawned and has not reaped.
    let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

fn signal(proc: &Proc, signal: libc::c_int) {
    signal_pid(proc.child.id(), signal);
}

/// bob's phone (client id `phone`, a persistent session) on `node`.
async fn phone(node: &Proc) -> Client {
    node.connect_with(Via::Tcp, "bob", "phone", |o| {
        o.set_clean_session(false);
    })
    .await
}

/// Alice says `n` on `chat/c1` through `writer`; returns once the node acknowledged it.
async fn say(writer: &mut Client, n: u64) {
    let said = serde_json::json!({"type": "message", "text": n.to_string()});
    writer.publish_json("chat/c1", said).await;
}

/// The numbers the phone gets, in order, until it has `last` (duplicates allowed, none
/// skipped, none out of order); how long the first took.
async fn until_through(phone: &mut Client, first: u64, last: u64) -> Duration {
    let started = Instant::now();
    let mut took = None;
    let mut next = first;
    while next <= last {
        let got = phone.recv().await.json();
        let n: u64 = got["text"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .expect("a number");
        took.get_or_insert(started.elapsed());
        assert!(n <= next, "{n} came before {next}");
        if n == next {
            next += 1;
        }
    }
    took.unwrap_or_default()
}

/// The bus's stream, seen from the first NATS server.
async fn callbus_stream(cluster: &Cluster) -> async_nats::jetstream::stream::Stream {
    let url = cluster.nats.urls_from(0);
    let first = url.split(',').next().expect("a NATS URL");
    let nats = async_nats::connect(first).await.expect("NATS");
    let stream = async_nats::jetstream::new(nats).get_stream("CALLBUS").await;
    stream.expect("the stream")
}

/// The name of the one queue there is.
async fn the_queue(stream: &async_nats::jetstream::stream::Stream) -> String {
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|name| async move { name.ok() })
        .collect()
        .await;
    assert_eq!(names.len(), 1, "one queue: {names:?}");
    names[0].clone()
}

/// Waits (at most 10 s) until the one queue has nothing delivered and unacknowledged.
async fn until_acknowledged(cluster: &Cluster) {
    let stream = callbus_stream(cluster).await;
    let name = the_queue(&stream).await;
    for _ in 0..100 {
        let info = stream.consumer_info(&name).await.expect("consumer info");
        if info.num_ack_pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the queue's delivery was not acknowledged within 10 s");
}

/// Waits (at most 30 s) until JetStream answers for the one queue again: after a paused
/// server wakes, the queue's replicas may elect a leader for seconds (longer on a loaded
/// machine than a client waits for a message), and nothing can be delivered meanwhile.
async fn until_the_queue_answers(cluster: &Cluster) {
    let stream = callbus_stream(cluster).await;
    let name = the_queue(&stream).await;
    for _ in 0..300 {
        if stream.consumer_info(&name).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("JetStream did not answer for the queue within 30 s");
}

/// A live persistent session whose node is paused, which a third node resumes before the
/// first wakes, while another node acknowledges messages to it: every acknowledged message
/// arrives on the third, the first within seconds, also after the first node wakes.
#[tokio::test]
async fn a_session_resumed_elsewhere_while_its_node_is_paused_loses_nothing() {
    let cluster = Cluster::start(3).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    a.set_members("c1", &["alice", "bob"]).await;
    let mut first = phone(a).await;
    assert!(granted(&first.subscribe(&["chat/c1"]).await[0]));
    let mut writer = b.connect(Via::Tcp, "alice").await;
    say(&mut writer, 0).await;
    assert_eq!(first.recv().await.json()["text"], "0");
    until_acknowledged(&cluster).await; // nothing in flight: the queue alone could be reused

    signal(a, libc::SIGSTOP);
    drop(first); // its connection goes while node 1 sleeps
    let mut phone = phone(c).await;
    assert!(phone.session_present);
    // Node 1's feed still has a pull request waiting on the queue: what node 2 acknowledges
    // now must not go to it.
    for n in 1..=6 {
        say(&mut writer, n).await;
    }
    let woke = tokio::spawn({
        let pid = a.child.id();
        async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            signal_pid(pid, libc::SIGCONT);
        }
    });
    let took = until_through(&mut phone, 1, 6).await;
    assert!(took < PROMPT, "the first waiting message took {took:?}");
    woke.await.expect("node 1 woken");
    // And after node 1 woke: what comes next arrives too, in order.
    for n in 7..=9 {
        say(&mut writer, n).await;
    }
    let took = until_through(&mut phone, 7, 9).await;
    assert!(took < PROMPT, "a message after node 1 woke took {took:?}");
}

/// The number of the NATS server leading the bus's stream.
async fn stream_leader(cluster: &Cluster) -> usize {
    let mut stream = callbus_stream(cluster).await;
    let info = stream.info().await.expect("stream info");
    let leader = info
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a leader");
    leader.trim_start_matches("nats-").parse().expect("nats-N")
}

/// A publisher's QoS 1 messages in flight while the NATS server leading the stream and holding
/// a persistent session's queue is paused (the stream elects another leader meanwhile; the
/// server catches up when it wakes) are stored, and all reach the session, in the order the
/// publisher sent them (MQTT-4.6.0-6). Sent side by side, a first attempt lost to the paused
/// leader was stored after newer ones; a queue of one replica on that server skipped what the
/// server had not caught up with, delivering newer messages first, or none.
#[tokio::test]
async fn messages_in_flight_while_the_streams_leader_is_paused_keep_their_order() {
    let cluster = Cluster::start(3).await;
    cluster.node(0).set_members("c1", &["alice", "bob"]).await;
    let mut away = phone(cluster.node(0)).await;
    assert!(granted(&away.subscribe(&["chat/c1"]).await[0]));
    away.leave().await;
    // The server paused leads the stream and the session's queue.
    let leader = queue_leader(&cluster).await;
    stream_led_by(&cluster, leader).await;
    let (near, far) = ((leader + 1) % 3, (leader + 2) % 3);

    let mut writer = cluster.node(near).connect(Via::Tcp, "alice").await;
    let pid = cluster.nats.pid(leader).expect("the leader runs");
    signal_pid(pid, libc::SIGSTOP);
    let woke = tokio::spawn(async move {
        tokio::time::sleep(PAUSE).await;
        signal_pid(pid, libc::SIGCONT);
    });
    // A message every 50 ms for 10 s, not waiting for PUBACKs: the leader sleeps for most of
    // it.
    const SENT: u64 = 200;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for n in 0..SENT {
        tick.tick().await;
        let said = serde_json::json!({"type": "message", "text": n.to_string()});
        (writer.client)
            .publish(
                "chat/c1",
                rumqttc::QoS::AtLeastOnce,
                false,
                said.to_string(),
            )
            .await
            .expect("queue a publish");
    }
    writer.acknowledged(SENT as usize).await;
    woke.await.expect("the leader woken");
    until_the_queue_answers(&cluster).await;

    let mut phone = phone(cluster.node(far)).await;
    assert!(phone.session_present);
    until_through(&mut phone, 0, SENT - 1).await;
}

/// Has NATS server `to` lead the stream (asking the leader to step down until the election
/// lands there).
async fn stream_led_by(cluster: &Cluster, to: usize) {
    let url = cluster.nats.urls_from(to);
    let first = url.split(',').next().expect("a NATS URL");
    let nats = async_nats::connect(first).await.expect("NATS");
    for _ in 0..50 {
        if stream_leader(cluster).await == to {
            return;
        }
        let subject = "$JS.API.STREAM.LEADER.STEPDOWN.CALLBUS";
        let _ = nats.request(subject, "".into()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("the stream's leader never moved to nats-{to}");
}

/// The NATS server (its index) that leads the one queue's replicas.
async fn queue_leader(cluster: &Cluster) -> usize {
    let stream = callbus_stream(cluster).await;
    let name = the_queue(&stream).await;
    let info = stream.consumer_info(&name).await.expect("consumer info");
    let leader = info.cluster.and_then(|c| c.leader).expect("a leader");
    leader.trim_start_matches("nats-").parse().expect("nats-N")
}

/// A persistent session that leaves one node and resumes on another at once (a phone
/// switching from Wi-Fi to cellular): the first node's feed had a pull request waiting on the
/// session's queue, which JetStream keeps for a while; nothing published after the move may
/// go to it (unacknowledged, it would come again only 30 s later, behind newer messages).
#[tokio::test]
async fn a_session_that_moves_at_once_gets_everything_promptly_and_in_order() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.set_members("c1", &["alice", "bob"]).await;
    let mut first = phone(a).await;
    assert!(granted(&first.subscribe(&["chat/c1"]).await[0]));
    let mut writer = b.connect(Via::Tcp, "alice").await;
    say(&mut writer, 0).await;
    assert_eq!(first.recv().await.json()["text"], "0");
    first.leave().await;

    let mut phone = phone(b).await;
    assert!(phone.session_present);
    for n in 1..=5 {
        say(&mut writer, n).await;
    }
    let took = until_through(&mut phone, 1, 5).await;
    assert!(took < PROMPT, "the first message took {took:?}");
}
