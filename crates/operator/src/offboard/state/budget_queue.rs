//! The resources waiting for each tenant's offboard budget: each gets a
//! place, and wakes when the slot of its place frees, instead of every
//! waiter waking at every freed slot. A waiter that did not come back within
//! [`QUEUE_GRACE`] of its time (late, deleted, or served elsewhere) stops
//! counting in the places behind it, but keeps its own: a waiter that is only
//! late is not sent to the back, where its slot would stay unused until the
//! windows after every other waiter's. A place unclaimed for
//! [`QUEUE_FORGET`] is dropped. A place given back unsent returns with the
//! time its waiter was due, so it expires by the same rule and at the same
//! age as if it had never been served: a waiter that gives its slot back and
//! never waits again (adopted, final, deleted) holds no slot for good.

use mde_client::Account;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How late a waiter may come back before it stops counting in other places.
pub(crate) const QUEUE_GRACE: Duration = Duration::from_secs(5);

/// How long an unclaimed place is kept for a waiter that may still come back.
const QUEUE_FORGET: Duration = Duration::from_secs(3600);

/// One tenant's waiters: a place number each, and when each was told to
/// come back (`None` while it waits now).
#[derive(Default)]
struct Queue {
    next: u64,
    places: HashMap<String, (u64, Option<Instant>)>,
    order: BTreeMap<u64, String>,
}

impl Queue {
    /// The places before `seq` whose waiter missed its time by more than `by`.
    fn missed_before(&self, seq: u64, now: Instant, by: Duration) -> impl Iterator<Item = u64> {
        self.order
            .range(..seq)
            .filter(move |(_, key)| {
                self.places.get(*key).is_some_and(|(_, due)| {
                    due.is_some_and(|due| now.saturating_duration_since(due) > by)
                })
            })
            .map(|(seq, _)| *seq)
    }
}

/// A place served to a waiter (its number and when it was due), to take back
/// if its slot is given back unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Served(Option<(u64, Instant)>);

#[derive(Clone, Default)]
pub(crate) struct BudgetQueues(Arc<Mutex<HashMap<Account, Queue>>>);

impl BudgetQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Account, Queue>> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key`'s place among `tenant`'s waiters (0: next), taking one at the
    /// back if it has none.
    pub(crate) fn place(&self, tenant: &Account, key: &str, now: Instant) -> usize {
        let mut queues = self.lock();
        let queue = queues.entry(tenant.clone()).or_default();
        let seq = match queue.places.get_mut(key) {
            Some((seq, due)) => {
                // Back in time or not, it is waiting again and counts again.
                *due = None;
                *seq
            }
            None => {
                let seq = queue.next;
                queue.next += 1;
                queue.places.insert(key.to_string(), (seq, None));
                queue.order.insert(seq, key.to_string());
                seq
            }
        };
        let forgotten: Vec<u64> = queue.missed_before(seq, now, QUEUE_FORGET).collect();
        for seq in forgotten {
            if let Some(other) = queue.order.remove(&seq) {
                queue.places.remove(&other);
            }
        }
        let ahead = queue.order.range(..seq).count();
        ahead - queue.missed_before(seq, now, QUEUE_GRACE).count()
    }

    /// When `key` was told to come back for its slot.
    pub(crate) fn due(&self, tenant: &Account, key: &str, due: Instant) {
        if let Some(place) = self
            .lock()
            .get_mut(tenant)
            .and_then(|queue| queue.places.get_mut(key))
        {
            place.1 = Some(due);
        }
    }

    /// `key` has its slot: it leaves its tenant's queue, and gets back the
    /// place it held for [`BudgetQueues::give_back`].
    pub(crate) fn served(&self, tenant: &Account, key: &str) -> Served {
        let mut queues = self.lock();
        let Some(queue) = queues.get_mut(tenant) else {
            return Served(None);
        };
        // A place served while it waits now (no time given yet) is due now.
        let place = queue
            .places
            .remove(key)
            .map(|(seq, due)| (seq, due.unwrap_or_else(Instant::now)));
        if let Some((seq, _)) = place {
            queue.order.remove(&seq);
        }
        if queue.places.is_empty() {
            queues.remove(tenant);
        }
        Served(place)
    }

    /// `key` gave its slot back unsent: it takes back the place it was served
    /// from (a waiter sent to the back would leave its slot unused), due when
    /// it was due, so the place expires like any other if `key` never waits
    /// again.
    pub(crate) fn give_back(&self, tenant: &Account, key: &str, served: Served) {
        let Served(Some((seq, due))) = served else {
            return;
        };
        let mut queues = self.lock();
        let queue = queues.entry(tenant.clone()).or_default();
        if queue.places.contains_key(key) || queue.order.contains_key(&seq) {
            return;
        }
        queue.next = queue.next.max(seq + 1);
        queue.places.insert(key.to_string(), (seq, Some(due)));
        queue.order.insert(seq, key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(tenant: &str) -> Account {
        Account {
            tenant: tenant.into(),
            app: "app".into(),
            api: "https://api.security.microsoft.com/".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_waiters_keep_their_places_and_late_ones_stop_counting_until_back() {
        let queues = BudgetQueues::default();
        let t = account("contoso");
        let other = account("fabrikam");
        let now = Instant::now;
        assert_eq!(queues.place(&t, "a", now()), 0);
        assert_eq!(queues.place(&t, "b", now()), 1);
        assert_eq!(queues.place(&t, "c", now()), 2);
        assert_eq!(queues.place(&t, "b", now()), 1, "a place is kept");
        // Another tenant's waiters queue for another budget.
        assert_eq!(queues.place(&other, "x", now()), 0);
        let served = queues.served(&t, "a");
        assert_eq!(queues.place(&t, "b", now()), 0);
        assert_eq!(queues.place(&t, "c", now()), 1);
        // `b` was due now and did not come back: after the grace, `c` moves up…
        queues.due(&t, "b", now());
        tokio::time::advance(QUEUE_GRACE + Duration::from_secs(1)).await;
        assert_eq!(queues.place(&t, "c", now()), 0);
        // …and `b`, back late, still goes before `c`, who counts it again.
        assert_eq!(
            queues.place(&t, "b", now()),
            0,
            "a late waiter keeps its place"
        );
        assert_eq!(queues.place(&t, "c", now()), 1);
        // `a` gave its slot back unsent: it is first again, not last.
        queues.give_back(&t, "a", served);
        assert_eq!(queues.place(&t, "a", now()), 0);
        assert_eq!(
            queues.place(&t, "d", now()),
            3,
            "a new waiter goes to the back"
        );
        // A place nobody claims for an hour is dropped.
        for key in ["a", "b", "c", "d"] {
            queues.due(&t, key, now());
        }
        tokio::time::advance(QUEUE_FORGET + Duration::from_secs(1)).await;
        assert_eq!(queues.place(&t, "d", now()), 0);
        assert_eq!(queues.place(&other, "x", now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_given_back_expires_like_any_other_when_its_waiter_never_returns() {
        let queues = BudgetQueues::default();
        let t = account("contoso");
        let now = Instant::now;
        assert_eq!(queues.place(&t, "gone", now()), 0);
        queues.due(&t, "gone", now());
        assert_eq!(queues.place(&t, "next", now()), 1);
        queues.due(&t, "next", now() + Duration::from_secs(60));
        // `gone` has its slot, gives it back unsent (its machine check adopted
        // another's action), and never waits again.
        let served = queues.served(&t, "gone");
        queues.give_back(&t, "gone", served);
        assert_eq!(queues.place(&t, "next", now()), 1, "`gone` is ahead again");
        // Like a waiter that missed its time: after the grace it stops
        // counting in the places behind it…
        tokio::time::advance(QUEUE_GRACE + Duration::from_secs(1)).await;
        assert_eq!(queues.place(&t, "next", now()), 0, "no slot held for it");
        // …and after an hour unclaimed it is dropped.
        tokio::time::advance(QUEUE_FORGET).await;
        queues.place(&t, "next", now());
        let served = queues.served(&t, "next");
        assert!(matches!(served, Served(Some((1, _)))));
        assert!(queues.lock().is_empty(), "nothing kept for `gone`");
    }
}
