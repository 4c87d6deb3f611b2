//! Until when this process may send: the leader's lease as seen on its own
//! monotonic clock. A leaf: the offboard room reads it before every POST, the
//! runtime's leader election moves it.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Until when this process may act as leader, on its own monotonic clock: the
/// point where it would give the lease up if no renewal succeeds. Checked just
/// before each POST, so a paused or partitioned leader never sends on a lease
/// a standby may already have taken.
#[derive(Clone, Debug)]
pub struct LeaseClock(Arc<std::sync::Mutex<LeaseState>>);

#[derive(Debug)]
enum LeaseState {
    /// No leader election: always free to send (since `since`).
    NotElected { since: Instant },
    Held {
        until: Option<Instant>,
        /// When the current unbroken run of renewals began.
        since: Option<Instant>,
    },
}

impl LeaseClock {
    /// For a process that runs without leader election.
    pub fn not_elected() -> Self {
        LeaseClock(Arc::new(std::sync::Mutex::new(LeaseState::NotElected {
            since: Instant::now(),
        })))
    }

    /// For a candidate: nothing may be sent until the lease is held.
    pub fn candidate() -> Self {
        LeaseClock(Arc::new(std::sync::Mutex::new(LeaseState::Held {
            until: None,
            since: None,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn renewed(&self, until: Instant) {
        let mut state = self.lock();
        let now = Instant::now();
        // A renewal after the lease ran out starts a new run: another replica
        // may have held it in between.
        let since = match &*state {
            LeaseState::Held {
                until: Some(previous),
                since: Some(since),
            } if *previous > now => *since,
            _ => now,
        };
        *state = LeaseState::Held {
            until: Some(until),
            since: Some(since),
        };
    }

    pub(crate) fn lost(&self) {
        *self.lock() = LeaseState::Held {
            until: None,
            since: None,
        };
    }

    /// Since when this process has been free to send without a break (the
    /// start of the lease it holds now); `None` while it may not send.
    pub fn sending_since(&self) -> Option<Instant> {
        match &*self.lock() {
            LeaseState::NotElected { since } => Some(*since),
            LeaseState::Held { until, since } => {
                until.filter(|until| Instant::now() < *until).and(*since)
            }
        }
    }

    /// Whether a request sent now, taking up to `margin`, still falls within the lease.
    pub fn may_send(&self, margin: Duration) -> bool {
        match &*self.lock() {
            LeaseState::NotElected { .. } => true,
            LeaseState::Held { until, .. } => {
                until.is_some_and(|until| Instant::now() + margin < until)
            }
        }
    }
}

impl Default for LeaseClock {
    fn default() -> Self {
        Self::not_elected()
    }
}
