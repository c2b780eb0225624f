//! The per-connection publish rate: a token bucket. Over the rate a session stops reading its
//! socket until a token is back (TCP backpressure, as EMQX does) instead of disconnecting.
//! The rate and the burst are the caller's (the same for every bucket of a kind), so a bucket
//! is its tokens and a time: 24 bytes in every session.

use std::time::Duration;
use tokio::time::Instant;

pub(super) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens.
    pub(super) fn full(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Whether the bucket has refilled completely (so forgetting it changes nothing).
    pub(super) fn is_full(&self, rate: u32, burst: u32) -> bool {
        let elapsed = Instant::now().duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * f64::from(rate.max(1)) >= f64::from(burst.max(1))
    }

    /// Takes a token at `rate` per second up to `burst` held, or says how long until one is
    /// back.
    pub(super) fn take(&mut self, rate: u32, burst: u32) -> Result<(), Duration> {
        let (rate, burst) = (f64::from(rate.max(1)), f64::from(burst.max(1)));
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
        assert!(!bucket.is_full(10, 2));
    }
}
