//! Per-user bounds in cluster mode, where a user's stored sessions sit in PostgreSQL and
//! JetStream rather than on any one node: the bound holds over the whole cluster.

mod common;

use common::cluster::Cluster;
use common::process::Proc;
use common::{granted, Via};
use futures_util::StreamExt;
use std::time::Duration;

/// Waits (at most 30 s) until no session of `user` is held live by any node: every node wrote
/// its client's leaving.
fn until_all_away(cluster: &Cluster, user: &str) {
    let query =
        format!("SELECT count(*) FROM sessions WHERE starts_with(client_id, '{user}.') AND node IS NOT NULL");
    for _ in 0..300 {
        if cluster.pg.sql(&query).expect("psql").trim() == "0" {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{user}'s sessions are still held live after 30 s");
}

async fn evicted(nodes: &[Proc]) -> u64 {
    let mut sum = 0;
    for node in nodes {
        sum += node.metric("callbus_sessions_evicted_total").await;
    }
    sum
}

/// One user who makes persistent sessions one after another on alternate nodes keeps
/// `sessions.max_per_user` of them in the cluster, not that many per node: the ones away
/// longest are expired, with their JetStream queues; the newest resume.
#[tokio::test]
async fn one_user_keeps_a_bounded_number_of_stored_sessions_over_the_cluster() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("callbus.toml");
    let config = callbus::config::DEFAULT_CONFIG.replace("max_per_user = 32", "max_per_user = 4");
    std::fs::write(&path, config).expect("config");
    let path = path.to_str().expect("UTF-8 path");
    let cluster = Cluster::start_with(2, &["--config", path]).await;

    for n in 0..10usize {
        let node = cluster.node(n % 2);
        let mut phone = node
            .connect_with(Via::Tcp, "mallory", &format!("m{n}"), |o| {
                o.set_clean_session(false);
            })
            .await;
        let topic = "users/mallory/notifications";
        assert!(granted(&phone.subscribe(&[topic]).await[0]));
        phone.leave().await;
        until_all_away(&cluster, "mallory");
    }
    let count = "SELECT count(*) FROM sessions WHERE starts_with(client_id, 'mallory.')";
    assert_eq!(cluster.pg.sql(count).expect("psql").trim(), "4");
    assert_eq!(evicted(&cluster.nodes).await, 6);
    // Their queues went with them: four consumers are left in the stream.
    let url = cluster.nats.urls_from(0);
    let first = url.split(',').next().expect("a NATS URL");
    let nats = async_nats::connect(first).await.expect("NATS");
    let stream = async_nats::jetstream::new(nats)
        .get_stream("CALLBUS")
        .await
        .expect("the stream");
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|name| async move { name.ok() })
        .collect()
        .await;
    assert_eq!(names.len(), 4, "{names:?}");

    // The newest is there on either node; the oldest was expired first.
    let newest = (cluster.node(0))
        .connect_with(Via::Tcp, "mallory", "m9", |o| {
            o.set_clean_session(false);
        })
        .await;
    assert!(newest.session_present);
    let oldest = (cluster.node(1))
        .connect_with(Via::Tcp, "mallory", "m0", |o| {
            o.set_clean_session(false);
        })
        .await;
    assert!(!oldest.session_present);
}
