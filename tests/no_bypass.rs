//! No path around the ACL: the process listens on callbus's two ports and nothing else (no
//! rumqttd listener exists), and a config that asks for rumqttd listeners is refused.
//! Its own test binary, so that no other test's server shares the process.

mod common;

use std::collections::BTreeSet;

/// Ports of the TCP sockets this process is listening on.
fn listening_ports() -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address is col 1 ("ADDR:PORT" in hex), st col 3 (0A = LISTEN), inode col 9.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap_or("0");
                ports.insert(u16::from_str_radix(port, 16).unwrap_or(0));
            }
        }
    }
    ports
}

#[tokio::test]
async fn only_callbus_listeners_are_open() {
    let s = common::TestServer::start().await;
    // Exercise the broker so any lazily started listener would exist by now.
    let mut alice = s.connect(common::Via::Tcp, "alice").await;
    assert!(common::granted(
        &alice.subscribe(&["users/alice/notifications"]).await[0]
    ));
    let expected: BTreeSet<u16> = [s.http.port(), s.mqtt.port()].into();
    assert_eq!(listening_ports(), expected);
}

#[test]
fn rumqttd_listener_sections_are_refused() {
    for section in [
        "[v4.1]",
        "[v5.1]",
        "[ws.1]",
        "[console]",
        "[prometheus]",
        "[bridge]",
    ] {
        let text = format!(
            "{}\n{section}\nlisten = \"127.0.0.1:1884\"\n",
            callbus::config::DEFAULT_CONFIG
        );
        assert!(
            callbus::config::FileConfig::parse(&text).is_err(),
            "{section} accepted"
        );
    }
}
