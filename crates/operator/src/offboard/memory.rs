//! What one process remembers between reconciles, on its own monotonic clock:
//! since when it has seen each resource `Submitting` (the lookup delay counts
//! from there, never from a wall-clock timestamp another process wrote), and
//! which machines it is sending for or has an action for, so two resources for
//! one machine lead to one POST even before MDE's list shows the first action.
//!
//! A new process (restart, new leader) starts empty: that is the point. Tests
//! simulate a crash by handing the next step a fresh [`ProcessMemory`].

use super::adopt_index::{self, AdoptIndex, Freshness, MachineCheck};
use super::decision::SubmittingClock;
use crate::lease_clock::LeaseClock;
use backon::BackoffBuilder;
use mde_client::{ActionStatus, MachineAction};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

struct Seen {
    since: Instant,
    looked_early: bool,
}

/// A machine's entry: a send in flight for one key, or the action one key
/// created or adopted.
#[derive(Debug, Clone)]
enum MachineEntry {
    Sending {
        key: String,
    },
    /// Only what a claim hands back: an offboard's id and last status.
    Known {
        action_id: Box<str>,
        status: ActionStatus,
        key: Box<str>,
        at: Instant,
    },
}

/// The resources waiting for the offboard budget: each gets a place, and
/// wakes when the slot of its place frees, instead of every waiter waking at
/// every freed slot. A waiter that did not come back within [`QUEUE_GRACE`]
/// of its time (late, deleted, or served elsewhere) stops counting in the
/// places behind it, but keeps its own: a waiter that is only late is not
/// sent to the back, where its slot would stay unused until the windows after
/// every other waiter's. A place unclaimed for [`QUEUE_FORGET`] is dropped.
#[derive(Default)]
struct BudgetQueue {
    next: u64,
    places: HashMap<String, (u64, Option<Instant>)>,
    order: std::collections::BTreeMap<u64, String>,
}

/// How late a waiter may come back before it stops counting in other places.
pub const QUEUE_GRACE: Duration = Duration::from_secs(5);

/// How long an unclaimed place is kept for a waiter that may still come back.
const QUEUE_FORGET: Duration = Duration::from_secs(3600);

impl BudgetQueue {
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

/// How often known actions older than [`FORGET_AFTER`] are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What [`ProcessMemory::claim_machine`] answers.
#[derive(Debug)]
pub enum MachineClaim {
    /// This key may send for the machine; the claim ends when dropped.
    Granted(ClaimGuard),
    /// Another key is sending for it right now: look again shortly.
    Busy { key: String },
    /// An action for the machine is known (sent or adopted by `key`).
    Known {
        action: Box<MachineAction>,
        key: String,
    },
}

#[derive(Default)]
struct Inner {
    submitting: HashMap<String, Seen>,
    machines: HashMap<String, MachineEntry>,
    /// When `machines` was last swept of forgotten actions.
    swept: Option<Instant>,
    /// Resources waiting for an offboard slot, in the order they first waited.
    /// Per tenant (connection): each waits for its own tenant's budget.
    budget_queues: HashMap<String, BudgetQueue>,
    /// Consecutive failed steps per resource, for exponential backoff.
    failures: HashMap<String, u32>,
    /// Consecutive reconciles per resource that ended in an error (a status
    /// write conflict, an API error), for the error policy's backoff.
    errored: HashMap<String, u32>,
}

#[derive(Clone, Default)]
pub struct ProcessMemory {
    inner: Arc<Mutex<Inner>>,
    lease: LeaseClock,
    /// Where "now" (the wall clock written into status) comes from.
    wall: WallClock,
    /// The index of this operator's recent offboards (off unless turned on).
    adopt: Arc<Adopt>,
}

/// The adopt index of each tenant (machine ids are unique only within one,
/// and an index proves absence only for the tenant whose reads filled it),
/// the window (`None`: not used), and per tenant the lock that lets one
/// worker at a time refresh it.
#[derive(Default)]
struct Adopt {
    window: Mutex<Option<Duration>>,
    tenants: Mutex<HashMap<String, Arc<TenantIndex>>>,
}

#[derive(Default)]
struct TenantIndex {
    index: Mutex<AdoptIndex>,
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl Adopt {
    fn with_window(window: Option<Duration>) -> Arc<Self> {
        Arc::new(Adopt {
            window: Mutex::new(window),
            ..Adopt::default()
        })
    }

    fn window(&self) -> Option<Duration> {
        *self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tenant(&self, tenant: &str) -> Arc<TenantIndex> {
        self.tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }
}

impl TenantIndex {
    fn index(&self) -> std::sync::MutexGuard<'_, AdoptIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The wall clock the decision reads: the system's, or (in tests with tokio's
/// paused time) one that moves with tokio's clock from a fixed start.
#[derive(Clone, Copy, Debug, Default)]
enum WallClock {
    #[default]
    System,
    Tokio {
        start: jiff::Timestamp,
        at: Instant,
    },
}

/// A request is only sent while the lease has at least this long left.
pub const LEASE_SEND_MARGIN: Duration = Duration::from_secs(1);

/// After this long, a known action is forgotten: MDE's list shows it by then,
/// and memory stays bounded by recent work rather than history.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

impl ProcessMemory {
    /// The memory of a leader-elected process: it sends only while `lease` is held.
    pub fn with_lease(lease: LeaseClock) -> Self {
        ProcessMemory {
            inner: Arc::default(),
            lease,
            wall: WallClock::System,
            adopt: Arc::default(),
        }
    }

    /// Check machines before a first send against an index of this
    /// operator's offboards created within `window` (see [`adopt_index`]); a
    /// zero window turns the index off.
    pub fn use_adopt_index(&self, window: Duration) {
        *self.adopt.window.lock().unwrap_or_else(|e| e.into_inner()) =
            (!window.is_zero()).then_some(window);
    }

    /// A memory whose wall clock moves with tokio's (paused) clock.
    pub fn on_tokio_time() -> Self {
        ProcessMemory {
            wall: WallClock::Tokio {
                start: jiff::Timestamp::now(),
                at: Instant::now(),
            },
            ..Self::default()
        }
    }

    /// A new process's memory (it remembers nothing) on the same wall clock.
    pub fn restarted(&self) -> Self {
        ProcessMemory {
            wall: self.wall,
            adopt: Adopt::with_window(self.adopt.window()),
            ..Self::default()
        }
    }

    /// The wall-clock time now.
    pub fn now(&self) -> jiff::Timestamp {
        match self.wall {
            WallClock::System => jiff::Timestamp::now(),
            WallClock::Tokio { start, at } => {
                let elapsed = jiff::SignedDuration::try_from(at.elapsed()).unwrap_or_default();
                start.checked_add(elapsed).unwrap_or(start)
            }
        }
    }

    /// Whether this process may send now (always, without leader election).
    pub fn may_send(&self) -> bool {
        self.lease.may_send(LEASE_SEND_MARGIN)
    }

    /// What `tenant`'s adopt index says for a first send to `machine_id`,
    /// when it is used; it must have been read at most `max_age` ago.
    pub fn machine_check(
        &self,
        tenant: &str,
        machine_id: &str,
        max_age: Duration,
    ) -> Option<MachineCheck> {
        self.adopt.window()?;
        let fresh = Freshness {
            sending_since: self.lease.sending_since(),
            max_age,
            now: Instant::now(),
        };
        Some(adopt_index::machine_check(
            &self.adopt.tenant(tenant).index(),
            machine_id,
            fresh,
        ))
    }

    /// Where `tenant`'s adopt index's next read starts (`None`: no index).
    pub fn adopt_next_since(&self, tenant: &str, lag: Duration) -> Option<jiff::Timestamp> {
        let window = self.adopt.window()?;
        let next = self
            .adopt
            .tenant(tenant)
            .index()
            .next_since(self.now(), window, lag);
        Some(next)
    }

    /// Fold a window read of `tenant` (from `since`, begun at `began`) into
    /// its adopt index.
    pub fn adopt_fold(
        &self,
        tenant: &str,
        actions: &[MachineAction],
        since: jiff::Timestamp,
        began: Instant,
        complete: bool,
        next_since: jiff::Timestamp,
    ) {
        let Some(window) = self.adopt.window() else {
            return;
        };
        let tenant = self.adopt.tenant(tenant);
        let mut index = tenant.index();
        index.fold(actions, since, began, complete, next_since);
        index.prune(self.now(), window);
    }

    /// Held by the one worker refreshing `tenant`'s adopt index.
    pub async fn adopt_refreshing(&self, tenant: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.adopt.tenant(tenant).refreshing.clone();
        lock.lock_owned().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resource's clock if it is `Submitting` (started now if this process
    /// has not seen it so before); forgets it otherwise.
    pub fn observe(&self, uid: &str, submitting: bool) -> Option<SubmittingClock> {
        let mut inner = self.lock();
        if !submitting {
            inner.submitting.remove(uid);
            return None;
        }
        let seen = inner.submitting.entry(uid.to_string()).or_insert(Seen {
            since: Instant::now(),
            looked_early: false,
        });
        Some(SubmittingClock {
            seen_for: seen.since.elapsed(),
            looked_early: seen.looked_early,
        })
    }

    /// The early lookup was made: the next one waits for the delay.
    pub fn looked_early(&self, uid: &str) {
        if let Some(seen) = self.lock().submitting.get_mut(uid) {
            seen.looked_early = true;
        }
    }

    /// This process is about to send: the delay counts from now, and no
    /// early lookup is needed (we know what we sent and when).
    pub fn sending(&self, uid: &str) {
        self.lock().submitting.insert(
            uid.to_string(),
            Seen {
                since: Instant::now(),
                looked_early: true,
            },
        );
    }

    /// Consecutive failures of this resource so far.
    pub fn failures(&self, uid: &str) -> u32 {
        self.lock().failures.get(uid).copied().unwrap_or(0)
    }

    /// One more failure in a row; returns how many now.
    pub fn failed(&self, uid: &str) -> u32 {
        let mut inner = self.lock();
        let count = inner.failures.entry(uid.to_string()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// A step that did not fail: the backoff starts over.
    pub fn succeeded(&self, uid: &str) {
        self.lock().failures.remove(uid);
    }

    /// One more reconcile of `uid` ended in an error; returns how many in a row.
    pub fn reconcile_errored(&self, uid: &str) -> u32 {
        let mut inner = self.lock();
        let count = inner.errored.entry(uid.to_string()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// A reconcile of `uid` ended without error: its error backoff starts over.
    pub fn reconcile_ok(&self, uid: &str) {
        let mut inner = self.lock();
        if !inner.errored.is_empty() {
            inner.errored.remove(uid);
        }
    }

    /// `key`'s place among the resources waiting for the offboard budget (0:
    /// next), taking one at the back if it has none.
    pub fn budget_place(&self, tenant: &str, key: &str) -> usize {
        let mut inner = self.lock();
        let queue = inner.budget_queues.entry(tenant.to_string()).or_default();
        let now = Instant::now();
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
    pub fn budget_due(&self, tenant: &str, key: &str, due: Instant) {
        let mut inner = self.lock();
        if let Some(place) = inner
            .budget_queues
            .get_mut(tenant)
            .and_then(|queue| queue.places.get_mut(key))
        {
            place.1 = Some(due);
        }
    }

    /// `key` has its slot: it leaves its tenant's queue. Returns the place it
    /// held, for [`ProcessMemory::budget_return`].
    pub fn budget_served(&self, tenant: &str, key: &str) -> Option<u64> {
        let mut inner = self.lock();
        let queue = inner.budget_queues.get_mut(tenant)?;
        let place = queue.places.remove(key).map(|(seq, _)| seq);
        if let Some(seq) = place {
            queue.order.remove(&seq);
        }
        if queue.places.is_empty() {
            inner.budget_queues.remove(tenant);
        }
        place
    }

    /// `key` gave its slot back unsent: it takes back the place it was served
    /// from (a waiter sent to the back would leave its slot unused).
    pub fn budget_return(&self, tenant: &str, key: &str, place: Option<u64>) {
        let Some(seq) = place else {
            return;
        };
        let mut inner = self.lock();
        let queue = inner.budget_queues.entry(tenant.to_string()).or_default();
        if queue.places.contains_key(key) || queue.order.contains_key(&seq) {
            return;
        }
        queue.next = queue.next.max(seq + 1);
        queue.places.insert(key.to_string(), (seq, None));
        queue.order.insert(seq, key.to_string());
    }

    /// Ask to send for `machine_id` under `key`.
    pub fn claim_machine(&self, machine_id: &str, key: &str) -> MachineClaim {
        let mut inner = self.lock();
        if inner.swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            inner.machines.retain(|_, entry| match entry {
                MachineEntry::Known { at, .. } => at.elapsed() < FORGET_AFTER,
                MachineEntry::Sending { .. } => true,
            });
            inner.machines.shrink_to_fit();
            inner.swept = Some(Instant::now());
        }
        match inner.machines.get(machine_id) {
            Some(MachineEntry::Sending { key: other }) if other != key => {
                MachineClaim::Busy { key: other.clone() }
            }
            // Only a live or succeeded action stands for the machine (and only
            // for FORGET_AFTER); after a failed one, a new request may send again.
            Some(MachineEntry::Known {
                action_id,
                status,
                key: by,
                at,
            }) if at.elapsed() < FORGET_AFTER
                && (!status.is_final() || *status == ActionStatus::Succeeded) =>
            {
                MachineClaim::Known {
                    action: Box::new(MachineAction::recorded_offboard(
                        action_id,
                        machine_id,
                        status.clone(),
                    )),
                    key: by.to_string(),
                }
            }
            _ => {
                inner.machines.insert(
                    machine_id.to_string(),
                    MachineEntry::Sending {
                        key: key.to_string(),
                    },
                );
                MachineClaim::Granted(ClaimGuard {
                    memory: self.clone(),
                    machine_id: machine_id.to_string(),
                    key: key.to_string(),
                })
            }
        }
    }

    /// An action exists for `machine` (sent or adopted by `key`).
    pub fn known(&self, machine: &str, action: &MachineAction, key: &str) {
        let machine_id = machine.to_string();
        let entry = MachineEntry::Known {
            action_id: action.id.as_str().into(),
            status: action.status.clone(),
            key: key.into(),
            at: Instant::now(),
        };
        self.lock().machines.insert(machine_id, entry);
    }
}

/// Holds a machine for one key while it sends; released when dropped unless
/// the machine became known meanwhile.
#[derive(Debug)]
pub struct ClaimGuard {
    memory: ProcessMemory,
    machine_id: String,
    key: String,
}

impl std::fmt::Debug for ProcessMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessMemory")
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let mut inner = self.memory.lock();
        if matches!(
            inner.machines.get(&self.machine_id),
            Some(MachineEntry::Sending { key }) if *key == self.key
        ) {
            inner.machines.remove(&self.machine_id);
        }
    }
}

/// The wait before retry number `failures + 1`: doubling from `base` up to
/// `cap`, with jitter so resources that failed together do not retry together.
/// (backon computes the series; the decision only receives the result.)
pub fn backoff(base: Duration, cap: Duration, failures: u32) -> Duration {
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

    /// A tenant's index proves absence only for that tenant: after a read of
    /// tenant A, A's machines may be sent without a read, B's still need
    /// B's own read first.
    #[tokio::test]
    async fn each_tenant_has_its_own_adopt_index() {
        let memory = ProcessMemory::default();
        memory.use_adopt_index(Duration::from_secs(7 * 24 * 3600));
        let max_age = Duration::from_secs(35);
        assert_eq!(
            memory.machine_check("default", "m1", max_age),
            Some(MachineCheck::Refresh)
        );
        let since = memory
            .adopt_next_since("default", Duration::from_secs(35))
            .unwrap();
        memory.adopt_fold("default", &[], since, Instant::now(), true, since);
        assert_eq!(
            memory.machine_check("default", "m1", max_age),
            Some(MachineCheck::Send)
        );
        assert_eq!(
            memory.machine_check("team-b/contoso", "m1", max_age),
            Some(MachineCheck::Refresh),
            "another tenant's read proves nothing here"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_waiters_keep_their_places_and_late_ones_stop_counting_until_back() {
        let memory = ProcessMemory::default();
        assert_eq!(memory.budget_place("t", "a"), 0);
        assert_eq!(memory.budget_place("t", "b"), 1);
        assert_eq!(memory.budget_place("t", "c"), 2);
        assert_eq!(memory.budget_place("t", "b"), 1, "a place is kept");
        // Another tenant's waiters queue for another budget.
        assert_eq!(memory.budget_place("other/tenant", "x"), 0);
        let served = memory.budget_served("t", "a");
        assert_eq!(memory.budget_place("t", "b"), 0);
        assert_eq!(memory.budget_place("t", "c"), 1);
        // `b` was due now and did not come back: after the grace, `c` moves up…
        memory.budget_due("t", "b", Instant::now());
        tokio::time::advance(QUEUE_GRACE + Duration::from_secs(1)).await;
        assert_eq!(memory.budget_place("t", "c"), 0);
        // …and `b`, back late, still goes before `c`, who counts it again.
        assert_eq!(
            memory.budget_place("t", "b"),
            0,
            "a late waiter keeps its place"
        );
        assert_eq!(memory.budget_place("t", "c"), 1);
        // `a` gave its slot back unsent: it is first again, not last.
        memory.budget_return("t", "a", served);
        assert_eq!(memory.budget_place("t", "a"), 0);
        assert_eq!(
            memory.budget_place("t", "d"),
            3,
            "a new waiter goes to the back"
        );
        // A place nobody claims for an hour is dropped.
        for key in ["a", "b", "c", "d"] {
            memory.budget_due("t", key, Instant::now());
        }
        tokio::time::advance(QUEUE_FORGET + Duration::from_secs(1)).await;
        assert_eq!(memory.budget_place("t", "d"), 0);
        assert_eq!(memory.budget_place("other/tenant", "x"), 0);
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
