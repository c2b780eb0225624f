//! New connections per second per source address: a token bucket per address, kept only while
//! it is below full (a full bucket is the same as none).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::throttle::TokenBucket;
use crate::sync::lock;

/// Buckets kept before full ones are swept out.
const SWEEP_AT: usize = 10_000;

pub(super) struct ConnectRate {
    /// Connections per second per address; 0 = unlimited.
    rate: u32,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl ConnectRate {
    pub(super) fn new(rate: u32) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
        }
    }

    /// Whether a new connection from `ip` is within the rate (and takes its token).
    pub(super) fn admit(&self, ip: IpAddr) -> bool {
        if self.rate == 0 {
            return true;
        }
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, bucket| !bucket.is_full(self.rate, self.rate));
        }
        let bucket = buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(self.rate));
        bucket.take(self.rate, self.rate).is_ok()
    }
}
