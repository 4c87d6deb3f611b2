//! What this process keeps between reconciles, as named state: each part has
//! its own small API and lock. A new process (restart, new leader) starts
//! empty: that is the point. Tests simulate a crash with a fresh
//! [`OffboardState`]. See docs/architecture.md.

mod adopt_indexes;
mod breaker;
mod budget_queue;
mod lookup_clocks;
mod machine_claims;
mod retries;
mod retry_times;
mod wall_clock;

pub(crate) use adopt_indexes::AdoptIndexes;
pub(crate) use breaker::{Ask, BreakerWindows};
pub(crate) use budget_queue::BudgetQueues;
pub(crate) use lookup_clocks::{LookupClocks, LookupKey};
pub(crate) use machine_claims::{ClaimGuard, MachineClaim, MachineClaims, TenantMachine};
pub(crate) use retries::{RetryCounter, backoff};
pub(crate) use retry_times::RetryTimes;
pub use wall_clock::WallClock;

use crate::lease_clock::LeaseClock;
use std::time::Duration;
use tokio::time::Instant;

/// A request is only sent while the lease has at least this long left.
pub const LEASE_SEND_MARGIN: Duration = Duration::from_secs(1);

/// The offboard controller's state in one process.
#[derive(Clone, Default)]
pub struct OffboardState {
    /// Since when each resource was seen `Submitting` (or its cancel
    /// `Requesting`): the lookup delay counts from there.
    pub(crate) lookups: LookupClocks,
    /// One send per tenant's machine at a time; the actions known for them.
    pub(crate) machines: MachineClaims,
    /// The waiters for each tenant's offboard budget, in order.
    pub(crate) budget_queues: BudgetQueues,
    /// Each tenant's new sends in the last hour (the blast-radius breaker).
    pub(crate) breaker: BreakerWindows,
    /// Steps in a row that failed transiently, per resource.
    pub(crate) step_failures: RetryCounter,
    /// Reconciles in a row that ended in an error, per resource.
    pub(crate) reconcile_errors: RetryCounter,
    /// Each tenant's index of this operator's recent offboards.
    pub(crate) adopt: AdoptIndexes,
    /// The `nextRetryAt` times this process wrote (only those are waited for).
    pub(crate) retry_times: RetryTimes,
    /// Until when this process may send (leader election).
    pub lease: LeaseClock,
    /// Where "now" written into status comes from.
    pub wall: WallClock,
    /// Whether another process may have sent just before this one could (a
    /// controller after a restart or a failover): first sends then wait out
    /// the lookup delay from when this process became able to send, since
    /// no list shows a predecessor's last action before that. The `offboard`
    /// command, alone with its key, does not.
    pub(crate) after_predecessor: bool,
}

impl OffboardState {
    /// The state of a leader-elected process: it sends only while `lease` is held.
    pub fn with_lease(lease: LeaseClock) -> Self {
        OffboardState {
            lease,
            after_predecessor: true,
            ..OffboardState::default()
        }
    }

    /// How long a first send still waits for a predecessor's last action to
    /// be listable (`None`: no wait; see `after_predecessor`).
    pub(crate) fn predecessor_wait(
        &self,
        lookup_delay: Duration,
        now: Instant,
    ) -> Option<Duration> {
        if !self.after_predecessor {
            return None;
        }
        let since = self.lease.sending_since()?;
        let ready = since.checked_add(lookup_delay)?;
        (now < ready).then(|| ready - now)
    }

    /// Whether this process may send now (always, without leader election).
    pub fn may_send(&self) -> bool {
        self.lease.may_send(LEASE_SEND_MARGIN)
    }

    /// The wall-clock time now.
    pub fn now(&self) -> jiff::Timestamp {
        self.wall.now()
    }
}

impl std::fmt::Debug for OffboardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OffboardState")
    }
}
