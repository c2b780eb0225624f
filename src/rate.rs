//! Rates: a token bucket, and buckets kept per key. A session's publish rate (over it a session
//! stops reading its socket until a token is back: TCP backpressure, as EMQX does), a
//! WebSocket's control frames, new connections per address, calls started per user.
//! The rate and the burst are the caller's (the same for every bucket of a kind), so a bucket
//! is its tokens and a time: 24 bytes in every session.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use crate::sync::lock;

/// Tokens that refill at a rate up to a burst; each thing rated takes one.
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens.
    pub fn full(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Whether the bucket has refilled completely (so forgetting it changes nothing).
    fn is_full(&self, rate: f64, burst: f64) -> bool {
        let elapsed = Instant::now().duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate >= burst
    }

    /// Takes a token at `rate` per second up to `burst` held, or says how long until one is
    /// back.
    pub fn take(&mut self, rate: u32, burst: u32) -> Result<(), Duration> {
        self.take_at(f64::from(rate.max(1)), f64::from(burst.max(1)))
    }

    /// [`TokenBucket::take`] at `rate` (> 0) tokens per second.
    fn take_at(&mut self, rate: f64, burst: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Buckets kept before full ones are swept out.
const SWEEP_AT: usize = 10_000;

/// A token bucket per key (an address, a user), kept only while it is below full (a full
/// bucket is the same as none).
pub struct KeyedRate<K> {
    /// Tokens per second; 0 = unlimited.
    per_sec: f64,
    burst: u32,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq> KeyedRate<K> {
    /// `per_sec` tokens per second (0: no limit), `burst` at once.
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Self {
            per_sec,
            burst: burst.max(1),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `key`, or says how long until one is back.
    pub fn admit(&self, key: K) -> Result<(), Duration> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(self.burst);
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, bucket| !bucket.is_full(self.per_sec, burst));
        }
        let bucket = buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::full(self.burst));
        bucket.take_at(self.per_sec, burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_how_long_until_the_next_token() {
        let mut bucket = TokenBucket::full(2);
        assert!(bucket.take(10, 2).is_ok());
        assert!(bucket.take(10, 2).is_ok());
        let wait = bucket.take(10, 2).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        assert!(!bucket.is_full(10.0, 2.0));
    }

    #[test]
    fn keys_have_buckets_of_their_own() {
        let rate = KeyedRate::new(1.0 / 60.0, 2);
        assert!(rate.admit("a").is_ok());
        assert!(rate.admit("a").is_ok());
        let wait = rate.admit("a").unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert!(rate.admit("b").is_ok());
        assert!(KeyedRate::new(0.0, 1).admit("a").is_ok());
    }
}
