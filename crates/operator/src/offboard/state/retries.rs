//! Failures in a row per resource, and the backoff they grow.

use backon::BackoffBuilder;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many times in a row something failed for each resource (by uid).
#[derive(Clone, Default)]
pub(crate) struct RetryCounter(Arc<Mutex<HashMap<String, u32>>>);

impl RetryCounter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Failures of `uid` in a row so far.
    pub(crate) fn in_a_row(&self, uid: &str) -> u32 {
        self.lock().get(uid).copied().unwrap_or(0)
    }

    /// One more failure in a row; returns how many now.
    pub(crate) fn failed(&self, uid: &str) -> u32 {
        let mut counts = self.lock();
        let count = counts.entry(uid.to_string()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// Something that did not fail: the count (and backoff) starts over.
    pub(crate) fn reset(&self, uid: &str) {
        let mut counts = self.lock();
        if !counts.is_empty() {
            counts.remove(uid);
        }
    }
}

/// The wait before retry number `failures + 1`: doubling from `base` up to
/// `cap`, with jitter so resources that failed together do not retry together.
/// (backon computes the series; the decision only receives the result.)
pub(crate) fn backoff(base: Duration, cap: Duration, failures: u32) -> Duration {
    let mut series = backon::ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(cap.max(base))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    // Doubling reaches any cap within 64 steps; bounding the index keeps a
    // long run of failures from walking the series billions of times.
    series
        .nth(failures.min(64) as usize)
        .unwrap_or(cap)
        .min(cap.max(base) * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count is per resource and starts over after a success.
    #[test]
    fn the_count_is_per_resource_and_resets() {
        let counter = RetryCounter::default();
        assert_eq!(counter.failed("a"), 1);
        assert_eq!(counter.failed("a"), 2);
        assert_eq!(counter.failed("b"), 1);
        counter.reset("a");
        assert_eq!(counter.in_a_row("a"), 0);
        assert_eq!(counter.failed("a"), 1);
        assert_eq!(counter.failed("b"), 2);
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        let (base, cap) = (Duration::from_secs(10), Duration::from_secs(300));
        for failures in 0..40 {
            let wait = backoff(base, cap, failures);
            let floor = (base * 2u32.saturating_pow(failures.min(5))).min(cap);
            assert!(wait >= floor, "{failures}: {wait:?} < {floor:?}");
            // backon's jitter adds up to one more delay, never unbounded.
            assert!(wait <= cap * 2, "{failures}: {wait:?}");
        }
        let spread: std::collections::BTreeSet<_> =
            (0..20).map(|_| backoff(base, cap, 3)).collect();
        assert!(spread.len() > 1, "jittered: {spread:?}");
    }
}
