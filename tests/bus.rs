//! The embedded bus (a real rumqttd router) under a consumer that falls behind: publishers wait
//! instead of the router skipping what the consumer has not read.

use bytes::Bytes;
use callbus::bus::embedded::EmbeddedBus;
use callbus::bus::{Bus, Deliver, Message};
use callbus::config::{FileConfig, DEFAULT_CONFIG};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// A consumer that takes nothing until its gate opens, then forwards every message.
struct Gated {
    open: Mutex<bool>,
    opened: Condvar,
    out: mpsc::UnboundedSender<Message>,
}

impl Deliver for Gated {
    fn deliver(&self, message: Message) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        let _ = self.out.send(message);
    }

    fn deliver_via(&self, _filter: &str, _message: Message) {
        unreachable!("the embedded bus delivers every message once, by topic");
    }

    fn closed(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_slow_consumer_slows_publishers_and_loses_nothing() {
    // A 2 MiB log (two 1 MiB segments); 200 messages of 16 KiB are 3.2 MiB.
    let config = DEFAULT_CONFIG
        .replace("max_segment_size = 4194304", "max_segment_size = 1048576")
        .replace("max_segment_count = 3", "max_segment_count = 2");
    let router = FileConfig::parse(&config).expect("config").router;
    let (out, mut delivered) = mpsc::unbounded_channel();
    let gated = Arc::new(Gated {
        open: Mutex::new(false),
        opened: Condvar::new(),
        out,
    });
    let bus = Arc::new(
        EmbeddedBus::start(router, gated.clone())
            .await
            .expect("bus"),
    );
    const N: usize = 200;
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let pad = "x".repeat(16 * 1024);
            for n in 0..N {
                let payload = Bytes::from(format!("{n:05}{pad}"));
                bus.publish(Message::new("chat/c1", payload))
                    .await
                    .expect("publish");
            }
        })
    };
    // While the consumer reads nothing, the publisher cannot finish: it is held back.
    let mut publisher = publisher;
    let held = tokio::time::timeout(Duration::from_millis(500), &mut publisher).await;
    let waits = callbus::metrics::BUS_PUBLISHER_WAITS.get();
    *gated.open.lock().unwrap() = true;
    gated.opened.notify_all();
    assert!(held.is_err(), "the publisher was never slowed down");
    assert!(waits > 0);
    publisher.await.expect("publisher");
    for n in 0..N {
        let message = tokio::time::timeout(Duration::from_secs(10), delivered.recv())
            .await
            .expect("delivered in time")
            .expect("bus alive");
        assert_eq!(&message.payload[..5], format!("{n:05}").as_bytes());
    }
    assert_eq!(callbus::metrics::BUS_LOST.get(), 0);
}
