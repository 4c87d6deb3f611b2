//! Since when this process has seen each resource `Submitting` (or its
//! cancel `Requesting`), on its own monotonic clock: the lookup delay counts
//! from there, never from a wall-clock timestamp another process wrote.

use crate::offboard::decision::SubmittingClock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Whose clock: a resource's offboard, its cancel, or the 404s MDE
/// answered for it (a 404 is final only once confirmed a delay later).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LookupKey {
    Offboard { uid: String },
    Cancel { uid: String },
    NotFound { uid: String },
}

impl LookupKey {
    pub(crate) fn offboard(uid: &str) -> Self {
        LookupKey::Offboard { uid: uid.into() }
    }

    pub(crate) fn cancel(uid: &str) -> Self {
        LookupKey::Cancel { uid: uid.into() }
    }

    pub(crate) fn not_found(uid: &str) -> Self {
        LookupKey::NotFound { uid: uid.into() }
    }
}

struct Seen {
    since: Instant,
    looked_early: bool,
}

#[derive(Clone, Default)]
pub(crate) struct LookupClocks(Arc<Mutex<HashMap<LookupKey, Seen>>>);

impl LookupClocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LookupKey, Seen>> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clock of `key` if it is in the state that needs one (started at
    /// `now` if this process has not seen it so before); forgets it otherwise.
    pub(crate) fn observe(
        &self,
        key: &LookupKey,
        in_state: bool,
        now: Instant,
    ) -> Option<SubmittingClock> {
        let mut clocks = self.lock();
        if !in_state {
            clocks.remove(key);
            return None;
        }
        let seen = clocks.entry(key.clone()).or_insert(Seen {
            since: now,
            looked_early: false,
        });
        Some(SubmittingClock {
            seen_for: now.saturating_duration_since(seen.since),
            looked_early: seen.looked_early,
        })
    }

    /// How long `key`'s clock has run, without starting it.
    pub(crate) fn seen_for(&self, key: &LookupKey, now: Instant) -> Option<std::time::Duration> {
        let clocks = self.lock();
        clocks
            .get(key)
            .map(|seen| now.saturating_duration_since(seen.since))
    }

    /// The early lookup was made: the next one waits for the delay.
    pub(crate) fn looked_early(&self, key: &LookupKey) {
        if let Some(seen) = self.lock().get_mut(key) {
            seen.looked_early = true;
        }
    }

    /// This process is about to send: the delay counts from `now`, and no
    /// early lookup is needed (we know what we sent and when).
    pub(crate) fn sending(&self, key: &LookupKey, now: Instant) {
        self.lock().insert(
            key.clone(),
            Seen {
                since: now,
                looked_early: true,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A clock starts when first observed, keeps its start while the state
    /// lasts, is forgotten when it ends; an offboard's and a cancel's clocks
    /// of one resource are apart.
    #[test]
    fn a_clock_counts_from_the_first_sighting_and_ends_with_the_state() {
        let clocks = LookupClocks::default();
        let start = Instant::now();
        let later = start + Duration::from_secs(10);
        let offboard = LookupKey::offboard("u");
        let first = clocks.observe(&offboard, true, start).unwrap();
        assert_eq!(first.seen_for, Duration::ZERO);
        assert!(!first.looked_early);
        clocks.looked_early(&offboard);
        let again = clocks.observe(&offboard, true, later).unwrap();
        assert_eq!(again.seen_for, Duration::from_secs(10));
        assert!(again.looked_early);
        let cancel = clocks
            .observe(&LookupKey::cancel("u"), true, later)
            .unwrap();
        assert_eq!(
            cancel.seen_for,
            Duration::ZERO,
            "a cancel has its own clock"
        );
        assert_eq!(clocks.observe(&offboard, false, later), None);
        let anew = clocks.observe(&offboard, true, later).unwrap();
        assert_eq!(
            anew.seen_for,
            Duration::ZERO,
            "forgotten when the state ended"
        );
    }
}
