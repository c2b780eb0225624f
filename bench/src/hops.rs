//! Where a relayed message's time goes, hop by hop: `perf` traces the system calls of the
//! bench (sender and receiver) and of the server while a relay path runs, and each message is
//! followed from the sender's `write` through the server's wakeup, read and write to the
//! receiver's read. Tracing slows every system call a little, on every path alike: the hops
//! are for comparing the paths, the relay bench's figures for their latency.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::percentile;

/// The hops, in order: what each measures.
const HOPS: [&str; 6] = [
    "sender's write (into the loopback, waking the server)",
    "server wakes (sender's write done → its epoll_wait returns)",
    "server reads (epoll_wait returns → read done)",
    "server's work (read done → write to the receiver starts)",
    "server's write to the receiver",
    "receiver wakes and reads (server's write done → read done)",
];

/// A message smaller than this is an acknowledgement or a wakeup, not a relayed publish.
const PUBLISH_BYTES: i64 = 250;

/// One traced path's hops, µs per message: p50 and p90 of each, and of the whole.
pub(crate) struct Hops {
    messages: usize,
    hops: Vec<(f64, f64)>,
    total: (f64, f64),
}

/// A `perf record` of the bench and one server process, running until [`Trace::finish`].
pub(crate) struct Trace {
    perf: Child,
    file: PathBuf,
    server: u32,
}

impl Trace {
    /// Starts tracing the bench and `server`, writing into `dir`.
    pub(crate) fn attach(server: u32, dir: &Path) -> anyhow::Result<Trace> {
        let file = dir.join("hops.data");
        let pids = format!("{},{server}", std::process::id());
        let perf = Command::new("perf")
            .args(["record", "-q", "-e", "raw_syscalls:sys_enter"])
            .args(["-e", "raw_syscalls:sys_exit", "-p", &pids, "-o"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("perf (Debian's linux-perf) could not start: {e}"))?;
        Ok(Trace { perf, file, server })
    }

    /// Stops the trace and follows every relayed message through it.
    pub(crate) fn finish(mut self) -> anyhow::Result<Hops> {
        // perf writes its file out on SIGINT.
        Command::new("kill")
            .args(["-INT", &self.perf.id().to_string()])
            .status()?;
        self.perf.wait()?;
        let script = Command::new("perf")
            .args(["script", "-F", "pid,tid,time,event,trace", "-i"])
            .arg(&self.file)
            .stderr(Stdio::null())
            .output()?;
        let calls = parse(&String::from_utf8_lossy(&script.stdout));
        Ok(follow(&calls, std::process::id(), self.server))
    }
}

/// One finished system call.
struct Call {
    pid: u32,
    tid: u32,
    nr: u32,
    fd: u64,
    ret: i64,
    enter: f64,
    exit: f64,
}

/// System calls from `perf script` text (times in µs).
fn parse(text: &str) -> Vec<Call> {
    let mut open: HashMap<u32, (u32, u64, f64)> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(ids), Some(time), Some(event)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some((pid, tid)) = ids.split_once('/') else {
            continue;
        };
        let (Ok(pid), Ok(tid)) = (pid.parse::<u32>(), tid.parse::<u32>()) else {
            continue;
        };
        let Ok(time) = time.trim_end_matches(':').parse::<f64>() else {
            continue;
        };
        let time = time * 1e6;
        // "NR 44 (b, 7f.., ...)" on entry, "NR 44 = 26" on exit.
        let rest: Vec<&str> = words.collect();
        let nr = rest.get(1).and_then(|n| n.parse::<u32>().ok());
        match (event, nr) {
            ("raw_syscalls:sys_enter:", Some(nr)) => {
                let first = rest
                    .get(2)
                    .map_or("", |a| a.trim_matches(|c| "(),".contains(c)));
                let fd = u64::from_str_radix(first, 16).unwrap_or(u64::MAX);
                open.insert(tid, (nr, fd, time));
            }
            ("raw_syscalls:sys_exit:", Some(nr)) => {
                let ret = rest.get(3).and_then(|r| r.parse::<i64>().ok());
                if let (Some((enr, fd, enter)), Some(ret)) = (open.remove(&tid), ret) {
                    if enr == nr {
                        calls.push(Call {
                            pid,
                            tid,
                            nr,
                            fd,
                            ret,
                            enter,
                            exit: time,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    calls.sort_by(|a, b| a.enter.total_cmp(&b.enter));
    calls
}

const READS: [u32; 4] = [0, 17, 19, 45]; // read, pread64, readv, recvfrom
const WRITES: [u32; 4] = [1, 18, 20, 44]; // write, pwrite64, writev, sendto
const WAITS: [u32; 2] = [232, 281]; // epoll_wait, epoll_pwait

/// `pid`'s publish-sized reads or writes on the descriptor most of them use (the relay's
/// socket, not the REST API's).
fn publishes<'a>(calls: &'a [Call], pid: u32, nrs: &[u32]) -> Vec<&'a Call> {
    let sized: Vec<&Call> = calls
        .iter()
        .filter(|c| c.pid == pid && nrs.contains(&c.nr) && c.ret >= PUBLISH_BYTES)
        .collect();
    let mut uses: HashMap<u64, usize> = HashMap::new();
    for c in &sized {
        *uses.entry(c.fd).or_default() += 1;
    }
    let fd = uses.into_iter().max_by_key(|(_, n)| *n).map(|(fd, _)| fd);
    sized.into_iter().filter(|c| Some(c.fd) == fd).collect()
}

/// When a call started or ended.
type Key = fn(&Call) -> f64;

fn enter(c: &Call) -> f64 {
    c.enter
}

fn exit(c: &Call) -> f64 {
    c.exit
}

/// The first of `calls` (sorted by `key`) whose `key` is past `t`.
fn first_after<'a>(calls: &[&'a Call], key: Key, t: f64) -> Option<&'a Call> {
    let i = calls.partition_point(|c| key(c) <= t);
    calls.get(i).copied()
}

/// Follows each of the bench's sends through the server to the bench's receipt: the server's
/// first read after the send, its first write after that read and the bench's first read after
/// that write (sends are 500 µs apart at 2,000 msg/s; a chain that reaches past the next send
/// is not one message's and is left out).
fn follow(calls: &[Call], bench: u32, server: u32) -> Hops {
    let sends = publishes(calls, bench, &WRITES);
    let server_reads = publishes(calls, server, &READS);
    let server_writes = publishes(calls, server, &WRITES);
    let receipts = publishes(calls, bench, &READS);
    let waits: Vec<&Call> = calls
        .iter()
        .filter(|c| c.pid == server && WAITS.contains(&c.nr))
        .collect();
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for (n, send) in sends.iter().enumerate() {
        let next_send = sends.get(n + 1).map_or(f64::INFINITY, |c| c.enter);
        let Some(read) = first_after(&server_reads, exit, send.enter) else {
            continue;
        };
        let Some(write) = first_after(&server_writes, enter, read.exit) else {
            continue;
        };
        let Some(receipt) = first_after(&receipts, exit, write.exit) else {
            continue;
        };
        if read.enter > next_send || write.enter > next_send {
            continue;
        }
        // The server's wakeup: its reading thread's last epoll_wait before the read.
        let woke = waits
            .iter()
            .rev()
            .find(|c| c.tid == read.tid && c.exit <= read.enter && c.exit >= send.enter)
            .map_or(read.enter, |c| c.exit);
        rows.push([
            send.exit - send.enter,
            woke - send.exit,
            read.exit - woke,
            write.enter - read.exit,
            write.exit - write.enter,
            receipt.exit - write.exit,
            receipt.exit - send.enter,
        ]);
    }
    let column = |i: usize| {
        let mut v: Vec<f64> = rows.iter().map(|row| row[i]).collect();
        v.sort_by(f64::total_cmp);
        (percentile(&v, 50.0), percentile(&v, 90.0))
    };
    Hops {
        messages: rows.len(),
        hops: (0..HOPS.len()).map(column).collect(),
        total: column(HOPS.len()),
    }
}

/// Prints the paths' hops side by side.
pub(crate) fn table(paths: &[(&str, Hops)]) {
    let names: Vec<&str> = paths.iter().map(|(name, _)| *name).collect();
    println!("\n| hop, µs p50 / p90 | {} |", names.join(" | "));
    println!("|---{}|", "|---".repeat(paths.len()));
    let cells = |f: &dyn Fn(&Hops) -> (f64, f64)| {
        let cells: Vec<String> = paths
            .iter()
            .map(|(_, h)| {
                let (p50, p90) = f(h);
                format!("{p50:.0} / {p90:.0}")
            })
            .collect();
        cells.join(" | ")
    };
    for (i, hop) in HOPS.iter().enumerate() {
        println!("| {hop} | {} |", cells(&|h| h.hops[i]));
    }
    println!("| whole relay, write to read | {} |", cells(&|h| h.total));
    let counted: Vec<String> = paths.iter().map(|(_, h)| h.messages.to_string()).collect();
    println!("| messages followed | {} |", counted.join(" | "));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message: the bench (pid 10) writes 300 bytes on fd 7, the server (pid 20) wakes
    /// from epoll_wait, reads them on fd 9, writes 320 bytes on fd 12, the bench reads them on
    /// fd 8. Times in seconds, as perf prints them.
    const TRACE: &str = "\
 10/11 100.000010: raw_syscalls:sys_enter: NR 1 (7, 7f00, 12c, 0, 0, 0)
 20/20 100.000011: raw_syscalls:sys_enter: NR 232 (3, 5500, 400, ffffffff, 0, 0)
 10/11 100.000016: raw_syscalls:sys_exit: NR 1 = 300
 20/20 100.000025: raw_syscalls:sys_exit: NR 232 = 1
 20/20 100.000030: raw_syscalls:sys_enter: NR 45 (9, 5600, 1000, 0, 0, 0)
 20/20 100.000034: raw_syscalls:sys_exit: NR 45 = 300
 20/20 100.000041: raw_syscalls:sys_enter: NR 44 (c, 5700, 140, 0, 0, 0)
 10/12 100.000045: raw_syscalls:sys_enter: NR 0 (8, 7f10, 2000, 0, 0, 0)
 20/20 100.000049: raw_syscalls:sys_exit: NR 44 = 320
 10/12 100.000070: raw_syscalls:sys_exit: NR 0 = 320
 10/12 100.000071: raw_syscalls:sys_enter: NR 0 (8, 7f10, 2000, 0, 0, 0)
 10/12 100.000072: raw_syscalls:sys_exit: NR 0 = -11
";

    #[test]
    fn a_message_is_followed_hop_by_hop() {
        let calls = parse(TRACE);
        assert_eq!(calls.len(), 6);
        let hops = follow(&calls, 10, 20);
        assert_eq!(hops.messages, 1);
        let p50: Vec<f64> = hops.hops.iter().map(|h| h.0.round()).collect();
        assert_eq!(p50, [6.0, 9.0, 9.0, 7.0, 8.0, 21.0]);
        assert_eq!(hops.total.0.round(), 60.0);
    }

    #[test]
    fn small_reads_and_writes_are_not_messages() {
        let acks = TRACE.replace("= 300", "= 4").replace("= 320", "= 4");
        assert_eq!(follow(&parse(&acks), 10, 20).messages, 0);
    }
}
