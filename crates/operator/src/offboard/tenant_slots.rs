//! Reconcile slots per connection, so that no tenant's waits hold capacity
//! another tenant needs.
//!
//! A reconcile spends most of its time waiting on its tenant: MDE's answer
//! (seconds on a slow tenant), a budget slot due within a second, a refresh of
//! the tenant's adopt index. With one pool of `--concurrency` workers for all
//! tenants, eight resources of one slow tenant held every worker and every
//! other tenant's resources queued behind them. Now each connection has its
//! own `--concurrency` slots; a reconcile that finds its connection's slots
//! taken ends at once and comes back after [`BUSY_RETRY`], holding nothing.
//! The controller's own pool is [`GLOBAL_FACTOR`] times larger, as a bound on
//! the Kubernetes API calls in flight, and is never held by a waiting tenant
//! (a reconcile without a slot returns before any I/O).
//!
//! By hand: a keyed set of semaphores with try-acquire is a few lines over
//! tokio's `Semaphore`; the crates that offer keyed limiters wait for a permit
//! (which would hold the controller's worker) or rate-limit instead.

use crate::tenants::ConnectionKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How soon a reconcile that found its connection's slots taken comes back.
pub(crate) const BUSY_RETRY: Duration = Duration::from_millis(250);

/// The controller's pool, as a multiple of the slots of one connection.
pub const GLOBAL_FACTOR: u16 = 16;

/// The controller's pool for `per_connection` slots a connection.
pub fn global_concurrency(per_connection: u16) -> u16 {
    per_connection.max(1).saturating_mul(GLOBAL_FACTOR)
}

pub(crate) struct TenantSlots {
    per_connection: AtomicUsize,
    slots: Mutex<HashMap<ConnectionKey, Arc<Semaphore>>>,
}

impl Default for TenantSlots {
    fn default() -> Self {
        Self::new(8)
    }
}

impl TenantSlots {
    pub(crate) fn new(per_connection: usize) -> Self {
        TenantSlots {
            per_connection: AtomicUsize::new(per_connection.max(1)),
            slots: Mutex::default(),
        }
    }

    /// Slots of connections seen from now on (before the controller starts).
    pub(crate) fn set_per_connection(&self, n: usize) {
        self.per_connection.store(n.max(1), Ordering::Relaxed);
    }

    /// One of `key`'s slots, or `None` while all are taken. The slot is
    /// freed when the permit is dropped.
    pub(crate) fn try_take(&self, key: &ConnectionKey) -> Option<OwnedSemaphorePermit> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.contains_key(key) {
            // A connection whose slots are all free holds nothing: forget it,
            // so names a namespace makes up do not pile up here.
            slots.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
        }
        let per_connection = self.per_connection.load(Ordering::Relaxed);
        let semaphore = slots
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(per_connection)))
            .clone();
        drop(slots);
        semaphore.try_acquire_owned().ok()
    }

    /// Connections remembered (those with a slot taken, and the last one
    /// seen).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.slots.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> ConnectionKey {
        ConnectionKey::Named {
            namespace: "team".into(),
            name: name.into(),
        }
    }

    /// A connection whose slots are all taken leaves every other
    /// connection's slots free.
    #[test]
    fn a_busy_connection_takes_no_other_connections_slot() {
        let slots = TenantSlots::new(2);
        let a1 = slots.try_take(&ConnectionKey::Default).unwrap();
        let _a2 = slots.try_take(&ConnectionKey::Default).unwrap();
        assert!(slots.try_take(&ConnectionKey::Default).is_none());
        let b: Vec<_> = (0..2).map(|_| slots.try_take(&named("b"))).collect();
        assert!(b.iter().all(Option::is_some));
        assert!(slots.try_take(&named("b")).is_none());
        drop(a1);
        assert!(slots.try_take(&ConnectionKey::Default).is_some());
    }

    /// Connections with no slot taken are forgotten when a new one comes.
    #[test]
    fn idle_connections_are_forgotten() {
        let slots = TenantSlots::new(1);
        let held = slots.try_take(&named("held")).unwrap();
        for i in 0..1000 {
            drop(slots.try_take(&named(&format!("made-up-{i}"))));
        }
        assert_eq!(slots.remembered(), 2, "the held one and the last one");
        assert!(slots.try_take(&named("held")).is_none(), "still held");
        drop(held);
        assert!(slots.try_take(&named("held")).is_some());
    }

    #[test]
    fn the_controllers_pool_is_a_multiple_of_one_connections() {
        assert_eq!(global_concurrency(8), 128);
        assert_eq!(global_concurrency(0), GLOBAL_FACTOR);
        assert_eq!(global_concurrency(u16::MAX), u16::MAX);
    }
}
