//! Free space on the data dir's filesystem. sled cannot recover from a write that finds the
//! disk full: its error sticks until the process restarts. So callbus keeps a reserve: below
//! `min_free_bytes` it refuses changes (503) before they are applied, and takes them again by
//! itself once space returns. Changes already admitted are flushed into the reserve; only when
//! something else eats half of it too are flushes held back until space returns.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

use crate::metrics;

pub(super) struct Space {
    /// The data dir, for statvfs.
    dir: CString,
    min_free: u64,
    /// Writes are being refused (so the change is logged once, not per request).
    full: AtomicBool,
    /// When free space was last found above the reserve (ms after `epoch`, plus one).
    fine_at: AtomicU64,
    epoch: Instant,
}

/// How long a check that found room holds: statvfs on ext4 sums per-CPU counters, which cost a
/// fifth of the notification throughput when done on every request.
const FINE_FOR: Duration = Duration::from_millis(20);

impl Space {
    pub(super) fn new(dir: &Path, min_free: u64) -> Self {
        let dir = CString::new(dir.as_os_str().as_bytes()).unwrap_or_default();
        Self {
            dir,
            min_free,
            full: AtomicBool::new(false),
            fine_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Bytes an unprivileged writer may still use on the data dir's filesystem.
    fn free_bytes(&self) -> Option<u64> {
        // SAFETY: statvfs reads the NUL-terminated path and writes only the struct passed to it.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(self.dir.as_ptr(), &mut stat) } != 0 {
            return None;
        }
        Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }

    /// Milliseconds after `epoch`, plus one (0 in `fine_at` means never).
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether a check within the last [`FINE_FOR`] found room above the whole reserve (and so
    /// above half of it).
    fn fine_recently(&self) -> bool {
        let fine_at = self.fine_at.load(Ordering::Relaxed);
        fine_at > 0 && self.now().saturating_sub(fine_at) < FINE_FOR.as_millis() as u64
    }

    /// Whether flushing may go ahead: `Err(free bytes)` under half the reserve.
    pub(super) fn may_flush(&self) -> Result<(), u64> {
        if self.fine_recently() {
            return Ok(());
        }
        match self.free_bytes() {
            Some(free) if free < self.min_free / 2 => Err(free),
            _ => Ok(()),
        }
    }

    /// Whether a change may start: `Err(free bytes)` while the reserve is reached. If the free
    /// space cannot be read, changes go ahead.
    pub(super) fn admit(&self) -> Result<(), u64> {
        if self.fine_recently() {
            return Ok(());
        }
        match self.free_bytes() {
            Some(free) if free < self.min_free => {
                if !self.full.swap(true, Ordering::Relaxed) {
                    metrics::STORAGE_FULL.add(1);
                    warn!(
                        free_bytes = free,
                        min_free_bytes = self.min_free,
                        "the data dir is nearly full: refusing changes until space returns"
                    );
                }
                metrics::STORAGE_REFUSED.inc();
                self.fine_at.store(0, Ordering::Relaxed);
                Err(free)
            }
            _ => {
                self.fine_at.store(self.now(), Ordering::Relaxed);
                if self.full.swap(false, Ordering::Relaxed) {
                    metrics::STORAGE_FULL.dec();
                    info!("space returned to the data dir: taking changes again");
                }
                Ok(())
            }
        }
    }
}
