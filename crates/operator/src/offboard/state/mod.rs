//! What this process keeps between reconciles, as named state: each part has
//! its own small API and lock. A new process (restart, new leader) starts
//! empty: that is the point. Tests simulate a crash with a fresh
//! [`OffboardState`]. See docs/architecture.md.

mod adopt_indexes;
mod budget_queue;
mod lookup_clocks;
mod machine_claims;
mod retries;
mod wall_clock;

pub(crate) use adopt_indexes::AdoptIndexes;
pub(crate) use budget_queue::BudgetQueues;
pub(crate) use lookup_clocks::{LookupClocks, LookupKey};
pub(crate) use machine_claims::{MachineClaim, MachineClaims, TenantMachine};
pub(crate) use retries::{RetryCounter, backoff};
pub use wall_clock::WallClock;

use crate::lease_clock::LeaseClock;
use std::time::Duration;

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
    /// Steps in a row that failed transiently, per resource.
    pub(crate) step_failures: RetryCounter,
    /// Reconciles in a row that ended in an error, per resource.
    pub(crate) reconcile_errors: RetryCounter,
    /// Each tenant's index of this operator's recent offboards.
    pub(crate) adopt: AdoptIndexes,
    /// Until when this process may send (leader election).
    pub lease: LeaseClock,
    /// Where "now" written into status comes from.
    pub wall: WallClock,
}

impl OffboardState {
    /// The state of a leader-elected process: it sends only while `lease` is held.
    pub fn with_lease(lease: LeaseClock) -> Self {
        OffboardState {
            lease,
            ..OffboardState::default()
        }
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
