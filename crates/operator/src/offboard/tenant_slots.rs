//! Reconcile slots per connection, so that no tenant's waits hold capacity
//! another tenant needs.
//!
//! A reconcile spends most of its time waiting on its tenant: MDE's answer
//! (seconds on a slow tenant), a budget slot due within a second, a refresh of
//! the tenant's adopt index. With one pool of `--concurrency` workers for all
//! tenants, eight resources of one slow tenant held every worker and every
//! other tenant's resources queued behind them. Now each connection has its
//! own `--concurrency` slots; a reconcile that finds its connection's slots
//! taken ends at once and comes back later, holding nothing: after
//! [`BUSY_RETRY`] when few wait, later the more resources of the connection
//! wait ([`busy_retry`]), so that a backlog of thousands behind a slow
//! tenant costs a few reconciles a second, not thousands, and the CPU stays
//! with the tenants that can send.
//! The controller's own pool is [`GLOBAL_FACTOR`] times larger, as a bound on
//! the Kubernetes API calls in flight, and is never held by a waiting tenant
//! (a reconcile without a slot returns before any I/O).
//!
//! By hand: a keyed set of semaphores with try-acquire is a few lines over
//! tokio's `Semaphore`; the crates that offer keyed limiters wait for a permit
//! (which would hold the controller's worker) or rate-limit instead.

use crate::tenants::ConnectionKey;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How soon a reconcile that found its connection's slots taken comes back,
/// when no more resources wait than the connection has slots.
pub(crate) const BUSY_RETRY: Duration = Duration::from_millis(250);

/// The longest a turned-away reconcile waits before it tries again.
pub(crate) const MAX_BUSY_RETRY: Duration = Duration::from_secs(5);

/// When a reconcile turned away comes back, with `waiting` resources of its
/// connection turned away and `per_connection` slots: each waiter tries
/// about once per [`BUSY_RETRY`] × waiters/slots, so the connection sees
/// about `per_connection` tries per [`BUSY_RETRY`] however long its queue.
pub(crate) fn busy_retry(waiting: usize, per_connection: usize) -> Duration {
    let rounds = waiting.div_ceil(per_connection.max(1)).max(1);
    BUSY_RETRY
        .saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
        .min(MAX_BUSY_RETRY)
}

/// The controller's pool, as a multiple of the slots of one connection.
pub const GLOBAL_FACTOR: u16 = 16;

/// The controller's pool for `per_connection` slots a connection.
pub fn global_concurrency(per_connection: u16) -> u16 {
    per_connection.max(1).saturating_mul(GLOBAL_FACTOR)
}

pub(crate) struct TenantSlots {
    per_connection: AtomicUsize,
    slots: Mutex<HashMap<ConnectionKey, Lot>>,
}

/// One connection's slots and the resources (uids) it turned away since
/// they last had one. Forgotten with the lot when no slot is taken, so a
/// deleted waiter stays counted only while its connection is busy.
struct Lot {
    semaphore: Arc<Semaphore>,
    waiting: HashSet<String>,
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

    /// One of `key`'s slots for the resource `waiter` (its uid), or, while
    /// all are taken, how long until it should try again. The slot is freed
    /// when the permit is dropped.
    pub(crate) fn try_take(
        &self,
        key: &ConnectionKey,
        waiter: &str,
    ) -> Result<OwnedSemaphorePermit, Duration> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.contains_key(key) {
            // A connection whose slots are all free holds nothing: forget it,
            // so names a namespace makes up do not pile up here.
            slots.retain(|_, lot| Arc::strong_count(&lot.semaphore) > 1);
        }
        let per_connection = self.per_connection.load(Ordering::Relaxed);
        let lot = slots.entry(key.clone()).or_insert_with(|| Lot {
            semaphore: Arc::new(Semaphore::new(per_connection)),
            waiting: HashSet::new(),
        });
        match lot.semaphore.clone().try_acquire_owned() {
            Ok(permit) => {
                lot.waiting.remove(waiter);
                Ok(permit)
            }
            Err(_) => {
                if !lot.waiting.contains(waiter) {
                    lot.waiting.insert(waiter.to_string());
                }
                Err(busy_retry(lot.waiting.len(), per_connection))
            }
        }
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
        let a1 = slots.try_take(&ConnectionKey::Default, "a1").unwrap();
        let _a2 = slots.try_take(&ConnectionKey::Default, "a2").unwrap();
        assert!(slots.try_take(&ConnectionKey::Default, "a3").is_err());
        let b: Vec<_> = (0..2)
            .map(|i| slots.try_take(&named("b"), &format!("b{i}")))
            .collect();
        assert!(b.iter().all(Result::is_ok));
        assert!(slots.try_take(&named("b"), "b3").is_err());
        drop(a1);
        assert!(slots.try_take(&ConnectionKey::Default, "a3").is_ok());
    }

    /// Connections with no slot taken are forgotten when a new one comes.
    #[test]
    fn idle_connections_are_forgotten() {
        let slots = TenantSlots::new(1);
        let held = slots.try_take(&named("held"), "h").unwrap();
        for i in 0..1000 {
            drop(slots.try_take(&named(&format!("made-up-{i}")), "m"));
        }
        assert_eq!(slots.remembered(), 2, "the held one and the last one");
        assert!(slots.try_take(&named("held"), "w").is_err(), "still held");
        drop(held);
        assert!(slots.try_take(&named("held"), "w").is_ok());
    }

    /// The rule, as a table: waiters and slots → when a waiter comes back.
    #[test]
    fn a_longer_queue_tries_less_often_each() {
        let ms = Duration::from_millis;
        let cases = [
            (1, 8, ms(250)),
            (8, 8, ms(250)),
            (9, 8, ms(500)),
            (80, 8, ms(2500)),
            (10_000, 8, MAX_BUSY_RETRY),
            (3, 0, ms(750)),
            (usize::MAX, 1, MAX_BUSY_RETRY),
        ];
        for (waiting, per_connection, expected) in cases {
            assert_eq!(
                busy_retry(waiting, per_connection),
                expected,
                "{waiting} waiting, {per_connection} slots"
            );
        }
    }

    /// Each resource turned away counts once, and no longer once it had a
    /// slot: a backlog's retries slow down, and speed up as it drains.
    #[test]
    fn waiters_are_counted_once_until_they_get_a_slot() {
        let slots = TenantSlots::new(1);
        let held = slots.try_take(&ConnectionKey::Default, "holder").unwrap();
        let mut last = Duration::ZERO;
        for i in 0..20 {
            last = slots
                .try_take(&ConnectionKey::Default, &format!("w{i}"))
                .unwrap_err();
        }
        assert_eq!(last, MAX_BUSY_RETRY.min(BUSY_RETRY * 20));
        for _ in 0..5 {
            assert_eq!(
                slots.try_take(&ConnectionKey::Default, "w0").unwrap_err(),
                last,
                "asking again does not count twice"
            );
        }
        drop(held);
        let w0 = slots.try_take(&ConnectionKey::Default, "w0").unwrap();
        assert_eq!(
            slots.try_take(&ConnectionKey::Default, "w1").unwrap_err(),
            BUSY_RETRY * 19,
            "w0 no longer waits"
        );
        drop(w0);
    }

    #[test]
    fn the_controllers_pool_is_a_multiple_of_one_connections() {
        assert_eq!(global_concurrency(8), 128);
        assert_eq!(global_concurrency(0), GLOBAL_FACTOR);
        assert_eq!(global_concurrency(u16::MAX), u16::MAX);
    }
}
