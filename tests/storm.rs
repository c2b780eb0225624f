//! A publish storm: many publishers at full speed into a few subscribers, through each embedded
//! bus: the direct one, and rumqttd's router with a log far smaller than the traffic (the bus
//! slows publishers down instead of letting the router skip messages). Every accepted publish
//! reaches every subscriber, in each publisher's order.

mod common;

use common::{granted, TestServer, Via};
use serde_json::json;
use std::collections::HashMap;

const PUBLISHERS: usize = 50;
const EACH: usize = 20;
const SUBSCRIBERS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_storm_through_the_direct_bus_loses_nothing() {
    storm("direct").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_storm_through_rumqttd_loses_nothing() {
    storm("rumqttd").await
}

async fn storm(engine: &str) {
    // For rumqttd: a 2 MiB router log (two 1 MiB segments) against 16 MB of traffic per
    // subscriber.
    let config = callbus::config::DEFAULT_CONFIG
        .replace("engine = \"direct\"", &format!("engine = \"{engine}\""))
        .replace("max_segment_size = 4194304", "max_segment_size = 1048576")
        .replace("max_segment_count = 3", "max_segment_count = 2")
        .replace("publish_rate = 200", "publish_rate = 100000")
        .replace("publish_burst = 500", "publish_burst = 100000");
    assert!(config.contains(&format!("engine = \"{engine}\"")));
    let s = TestServer::start_with(&config).await;
    let users: Vec<String> = (0..PUBLISHERS).map(|i| format!("p{i}")).collect();
    let mut members: Vec<&str> = users.iter().map(String::as_str).collect();
    members.extend(["s0", "s1"]);
    s.set_members("storm", &members).await;

    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut sub = s.connect(Via::Tcp, &format!("s{i}")).await;
        assert!(granted(&sub.subscribe(&["chat/storm"]).await[0]));
        subscribers.push(sub);
    }
    let pad = "x".repeat(16 * 1024);
    let mut publishers = Vec::new();
    for user in &users {
        let mut client = s.connect(Via::Tcp, user).await;
        let pad = pad.clone();
        publishers.push(tokio::spawn(async move {
            let payloads =
                (0..EACH).map(|n| json!({"type": "message", "n": n, "pad": pad}).to_string());
            client.publish_all("chat/storm", payloads).await;
        }));
    }
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut sub| {
            tokio::spawn(async move {
                let mut next: HashMap<String, u64> = HashMap::new();
                for _ in 0..PUBLISHERS * EACH {
                    let msg = sub.recv().await.json();
                    let sender = msg["sender_id"].as_str().expect("sender").to_owned();
                    let expected = next.entry(sender.clone()).or_default();
                    assert_eq!(msg["n"], *expected, "out of order from {sender}");
                    *expected += 1;
                }
                next.values().sum::<u64>()
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    for r in readers {
        assert_eq!(r.await.expect("subscriber"), (PUBLISHERS * EACH) as u64);
    }
    let waits = s.metric("callbus_bus_publisher_waits_total").await;
    let lost = s.metric("callbus_bus_lost_total").await;
    let dropped = s.metric("callbus_sessions_dropped_slow_total").await;
    println!(
        "storm: {PUBLISHERS} publishers x {EACH} x 16 KiB, {SUBSCRIBERS} subscribers: \
         every message delivered; publishes that waited for the bus: {waits}; lost: {lost}"
    );
    assert_eq!(lost, 0);
    assert_eq!(dropped, 0);
}
