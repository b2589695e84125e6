//! Per-route rate limiting: token buckets, one for the route or one per key (client IP or a
//! header), refilled continuously. Key buckets live in a bounded map; idle ones are dropped.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use zhili_model::route::{RateLimitKey, RateLimitSpec};

/// Distinct keys tracked per route; past this, idle buckets are dropped (and, if none is idle,
/// the map starts over: a flood of new keys cannot grow memory).
const MAX_KEYS: usize = 100_000;
const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Allow { remaining: u64 },
    Deny { retry_after: Duration },
}

#[derive(Debug)]
pub struct Limiter {
    pub rate: f64,
    pub burst: f64,
    pub key: Option<RateLimitKey>,
    shards: Vec<Mutex<HashMap<u64, Bucket>>>,
}

impl Limiter {
    pub fn new(spec: &RateLimitSpec) -> Self {
        let burst = f64::from(spec.burst.unwrap_or_else(|| spec.rate.ceil().max(1.0) as u32));
        Self { rate: spec.rate, burst, key: spec.key.clone(), shards: (0..SHARDS).map(|_| Mutex::default()).collect() }
    }

    /// Takes a token for `key` (None: the route's own bucket).
    pub fn check(&self, key: Option<&[u8]>, now: Instant) -> Decision {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let k = h.finish();
        let shard = self.shards.get((k as usize) % SHARDS).expect("new() makes SHARDS shards");
        let mut shard = shard.lock();
        if shard.len() >= MAX_KEYS / SHARDS && !shard.contains_key(&k) {
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            shard.retain(|_, b| now.duration_since(b.at) < full_after);
            if shard.len() >= MAX_KEYS / SHARDS {
                shard.clear();
            }
        }
        let b = shard.entry(k).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Decision::Allow { remaining: b.tokens as u64 }
        } else {
            Decision::Deny { retry_after: Duration::from_secs_f64((1.0 - b.tokens) / self.rate) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_the_rate_and_keys_are_separate() {
        let l = Limiter::new(&RateLimitSpec { rate: 10.0, burst: Some(5), key: None });
        let t0 = Instant::now();
        for n in 0..5 {
            assert_eq!(l.check(Some(b"a"), t0), Decision::Allow { remaining: 4 - n });
        }
        let Decision::Deny { retry_after } = l.check(Some(b"a"), t0) else { panic!("burst exceeded but allowed") };
        assert!(retry_after > Duration::from_millis(90) && retry_after <= Duration::from_millis(100), "{retry_after:?}");
        assert!(matches!(l.check(Some(b"b"), t0), Decision::Allow { .. }), "another key has its own bucket");
        assert!(matches!(l.check(Some(b"a"), t0 + Duration::from_millis(100)), Decision::Allow { .. }), "one token back after 1/rate");
        // 10/s over 10 s: about 100 allowed.
        let mut allowed = 0;
        for i in 0..1000 {
            if matches!(l.check(Some(b"c"), t0 + Duration::from_millis(i * 10)), Decision::Allow { .. }) {
                allowed += 1;
            }
        }
        assert!((100..=106).contains(&allowed), "{allowed}");
    }

    #[test]
    fn key_map_is_bounded() {
        let l = Limiter::new(&RateLimitSpec { rate: 1.0, burst: Some(1), key: Some(RateLimitKey::ClientIp(true)) });
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS as u64 * 2) {
            l.check(Some(&i.to_le_bytes()), t0);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().len()).sum();
        assert!(total <= MAX_KEYS, "{total}");
    }
}
