//! A circuit breaker per upstream service: closed → open on a high failure or slow-call share
//! over a sliding window → half-open after the open time (a few probes) → closed if they all
//! succeed, open again if one fails.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use zhili_model::route::Breaker;

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    calls: u32,
    failures: u32,
    slow: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probes_left: u32, successes: u32 },
}

#[derive(Debug)]
struct Inner {
    state: State,
    buckets: [Bucket; BUCKETS],
    /// Start of the bucket at `head`.
    head_at: Instant,
    head: usize,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Mutex<Inner>,
}

/// How a call was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

/// A state change worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    HalfOpened,
    Closed,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self { inner: Mutex::new(Inner { state: State::Closed, buckets: [Bucket::default(); BUCKETS], head_at: Instant::now(), head: 0 }) }
    }
}

impl Inner {
    /// Moves the window forward to `now`, clearing buckets that fell out of it.
    fn advance(&mut self, window: Duration, now: Instant) {
        let width = window / BUCKETS as u32;
        let mut steps = 0;
        while now.duration_since(self.head_at) >= width && steps < BUCKETS {
            self.head = (self.head + 1) % BUCKETS;
            if let Some(b) = self.buckets.get_mut(self.head) {
                *b = Bucket::default();
            }
            self.head_at += width;
            steps += 1;
        }
        if now.duration_since(self.head_at) >= width {
            self.head_at = now;
        }
    }

    fn totals(&self) -> Bucket {
        self.buckets.iter().fold(Bucket::default(), |a, b| Bucket { calls: a.calls + b.calls, failures: a.failures + b.failures, slow: a.slow + b.slow })
    }
}

impl CircuitBreaker {
    pub fn state(&self) -> State {
        self.inner.lock().state
    }

    /// Lets a call through, or answers how long until the breaker may let one through.
    pub fn admit(&self, cfg: &Breaker, now: Instant) -> Result<(Admission, Option<Transition>), Duration> {
        let mut s = self.inner.lock();
        match s.state {
            State::Closed => Ok((Admission::Normal, None)),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } => {
                s.state = State::HalfOpen { probes_left: cfg.half_open_probes - 1, successes: 0 };
                Ok((Admission::Probe, Some(Transition::HalfOpened)))
            }
            State::HalfOpen { probes_left: 0, .. } => Err(Duration::from_secs(1)),
            State::HalfOpen { probes_left, successes } => {
                s.state = State::HalfOpen { probes_left: probes_left - 1, successes };
                Ok((Admission::Probe, None))
            }
        }
    }

    /// Records a call's outcome; returns the transition it caused, if any.
    pub fn record(&self, cfg: &Breaker, admission: Admission, failed: bool, took: Duration, now: Instant) -> Option<Transition> {
        let mut s = self.inner.lock();
        let slow = took >= cfg.slow_call;
        let bad = failed || (cfg.slow_ratio.is_some() && slow);
        match (admission, s.state) {
            (Admission::Probe, State::HalfOpen { successes, probes_left }) => {
                if bad {
                    s.state = State::Open { until: now + cfg.open_for };
                    return Some(Transition::Opened);
                }
                if successes + 1 >= cfg.half_open_probes {
                    s.state = State::Closed;
                    s.buckets = [Bucket::default(); BUCKETS];
                    s.head_at = now;
                    return Some(Transition::Closed);
                }
                s.state = State::HalfOpen { probes_left, successes: successes + 1 };
                None
            }
            (Admission::Normal, State::Closed) => {
                s.advance(cfg.window, now);
                let head = s.head;
                if let Some(b) = s.buckets.get_mut(head) {
                    b.calls += 1;
                    b.failures += u32::from(failed);
                    b.slow += u32::from(slow);
                }
                let t = s.totals();
                let ratio = |n: u32| f64::from(n) / f64::from(t.calls);
                let trip = t.calls >= cfg.min_calls && (ratio(t.failures) >= cfg.error_ratio || cfg.slow_ratio.is_some_and(|r| ratio(t.slow) >= r));
                if trip {
                    s.state = State::Open { until: now + cfg.open_for };
                    return Some(Transition::Opened);
                }
                None
            }
            // A late answer from before the last transition changes nothing.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Breaker {
        zhili_model::route::BreakerSpec {
            min_calls: Some(10),
            open_for: Some("1s".into()),
            half_open_probes: Some(2),
            slow_ratio: Some(0.5),
            slow_call: Some("100ms".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap()
    }

    #[test]
    fn opens_on_errors_then_half_opens_and_closes() {
        let (b, c, t0) = (CircuitBreaker::default(), cfg(), Instant::now());
        let ms = Duration::from_millis;
        for i in 0..9 {
            assert_eq!(b.admit(&c, t0).unwrap().0, Admission::Normal);
            assert_eq!(b.record(&c, Admission::Normal, i % 2 == 0, ms(1), t0), None, "below min_calls");
        }
        assert_eq!(b.record(&c, Admission::Normal, true, ms(1), t0), Some(Transition::Opened), "6 of 10 failed");
        let wait = b.admit(&c, t0 + ms(100)).unwrap_err();
        assert_eq!(wait, ms(900));
        // Half-open after open_for: two probes, then nothing until they answer.
        let (a1, t) = b.admit(&c, t0 + ms(1000)).unwrap();
        assert_eq!((a1, t), (Admission::Probe, Some(Transition::HalfOpened)));
        assert_eq!(b.admit(&c, t0 + ms(1000)).unwrap().0, Admission::Probe);
        assert!(b.admit(&c, t0 + ms(1000)).is_err());
        assert_eq!(b.record(&c, Admission::Probe, false, ms(1), t0 + ms(1001)), None);
        assert_eq!(b.record(&c, Admission::Probe, false, ms(1), t0 + ms(1002)), Some(Transition::Closed));
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_and_slow_calls_count() {
        let (b, c, t0) = (CircuitBreaker::default(), cfg(), Instant::now());
        let ms = Duration::from_millis;
        let mut opened = None;
        for _ in 0..10 {
            b.admit(&c, t0).unwrap();
            opened = opened.or(b.record(&c, Admission::Normal, false, ms(150), t0));
        }
        assert_eq!(opened, Some(Transition::Opened), "all slow");
        b.admit(&c, t0 + ms(1000)).unwrap();
        assert_eq!(b.record(&c, Admission::Probe, true, ms(1), t0 + ms(1000)), Some(Transition::Opened));
        assert!(matches!(b.state(), State::Open { .. }));
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let (b, c, t0) = (CircuitBreaker::default(), cfg(), Instant::now());
        for _ in 0..9 {
            b.record(&c, Admission::Normal, true, Duration::from_millis(1), t0);
        }
        // 11 s later the window (10 s) holds none of them.
        for i in 0..10 {
            assert_eq!(b.record(&c, Admission::Normal, i == 0, Duration::from_millis(1), t0 + Duration::from_secs(11)), None);
        }
    }
}
