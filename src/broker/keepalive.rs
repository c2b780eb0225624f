//! Keepalive without a timer per connection. MQTT lets the server drop a client it has not
//! heard from for one and a half keepalive periods. A session notes when it last heard its
//! client (an atomic store per read) and is entered once on a wheel of 100 ms slots under the
//! time its silence would run out. Each tick the wheel looks at the slot that came due: a
//! session heard since is moved to its new deadline's slot, a silent one is told through its
//! mailbox, a finished one is let go. So each session is looked at about once per keepalive
//! period, whatever it sends, and an idle connection carries no timer (tokio's is a 100-byte
//! future, inserted and removed on every message).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::hub::Watch;
use crate::sync::lock;

/// How long one slot spans (and how late a silent client may be told, at most).
const TICK_MS: u64 = 100;
/// Slots on the wheel: deadlines further out than this many ticks are looked at again later.
const SLOTS: usize = 1024;
/// A session told it was silent is looked at again after this long (it may be throttled, so
/// not reading on purpose; once it ends, the wheel lets go of it).
const RECHECK_MS: u64 = 1000;

/// The keepalive clock: milliseconds since the process first asked.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) struct Keepalive {
    wheel: Mutex<Wheel>,
}

struct Wheel {
    slots: Vec<Vec<Watch>>,
    /// Where the slots not yet looked at start (ms, a multiple of [`TICK_MS`]).
    swept: u64,
}

impl Wheel {
    fn enter(&mut self, watch: Watch, deadline: u64) {
        let last = self.swept + (SLOTS as u64 - 1) * TICK_MS;
        let at = deadline.clamp(self.swept, last);
        self.slots[(at / TICK_MS) as usize % SLOTS].push(watch);
    }
}

impl Keepalive {
    /// A wheel that turns until `shutdown`.
    pub(crate) fn start(shutdown: CancellationToken) -> Arc<Self> {
        let keepalive = Arc::new(Self {
            wheel: Mutex::new(Wheel {
                slots: (0..SLOTS).map(|_| Vec::new()).collect(),
                swept: now_ms() / TICK_MS * TICK_MS,
            }),
        });
        let turning = keepalive.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(TICK_MS));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => turning.sweep(now_ms()),
                    _ = shutdown.cancelled() => break,
                }
            }
        });
        keepalive
    }

    /// Watches a session whose client's silence runs out at `deadline` (see [`now_ms`]).
    pub(crate) fn watch(&self, watch: Watch, deadline: u64) {
        lock(&self.wheel).enter(watch, deadline);
    }

    /// Looks at every slot that came due by `now`.
    fn sweep(&self, now: u64) {
        let mut wheel = lock(&self.wheel);
        while wheel.swept + TICK_MS <= now {
            let slot = (wheel.swept / TICK_MS) as usize % SLOTS;
            let due = std::mem::take(&mut wheel.slots[slot]);
            wheel.swept += TICK_MS;
            for watch in due {
                match watch.deadline() {
                    None => {} // the session is gone
                    Some(deadline) if deadline <= now => {
                        watch.tell_silent();
                        wheel.enter(watch, now + RECHECK_MS);
                    }
                    Some(deadline) => wheel.enter(watch, deadline),
                }
            }
        }
    }
}
