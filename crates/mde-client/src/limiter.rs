//! The operator's own rate budget for MDE, per API family.
//!
//! Written by hand because the guarantee we need is "never more than N calls in
//! ANY window of length W": GCRA/token-bucket crates (e.g. `governor`) with a
//! burst of N let up to 2N-1 calls through in the first window, which a server
//! counting in sliding windows answers with 429s. A sliding log of the last N
//! send times per window gives the guarantee exactly and is a few lines.
//!
//! A slot's time is the moment its response arrived (while in flight it counts
//! as "now"), so the server's arrival times, which lie between send and
//! response, are always at least W apart for calls N apart.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The API families MDE budgets separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiFamily {
    Offboard,
    MachineActions,
    Machines,
    /// `POST /api/machineactions/{id}/cancel`: a write with its own limits.
    Cancel,
}

impl ApiFamily {
    pub const ALL: [ApiFamily; 4] = [
        ApiFamily::Offboard,
        ApiFamily::MachineActions,
        ApiFamily::Machines,
        ApiFamily::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiFamily::Offboard => "offboard",
            ApiFamily::MachineActions => "machine_actions",
            ApiFamily::Machines => "machines",
            ApiFamily::Cancel => "cancel",
        }
    }
}

impl fmt::Display for ApiFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// At most `calls` in any window of `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u32,
    pub window: Duration,
}

/// A list like `100/60s,1500/3600s` (durations as humantime: `600ms`, `1m`, `1h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits(pub Vec<RateLimit>);

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits(vec![
            RateLimit {
                calls: 100,
                window: Duration::from_secs(60),
            },
            RateLimit {
                calls: 1500,
                window: Duration::from_secs(3600),
            },
        ])
    }
}

impl FromStr for RateLimits {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut limits = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (calls, window) = part.split_once('/').ok_or_else(|| {
                format!("rate limit {part:?} must look like CALLS/WINDOW, e.g. 100/60s")
            })?;
            let calls: u32 = calls
                .trim()
                .parse()
                .ok()
                .filter(|c| *c > 0)
                .ok_or_else(|| {
                    format!("rate limit {part:?}: {calls:?} is not a positive number of calls")
                })?;
            let window = humantime::parse_duration(window.trim())
                .ok()
                .filter(|w| !w.is_zero())
                .ok_or_else(|| {
                    format!(
                        "rate limit {part:?}: {window:?} is not a duration such as 60s, 600ms or 1h"
                    )
                })?;
            limits.push(RateLimit { calls, window });
        }
        if limits.is_empty() {
            return Err("rate limit list is empty; give e.g. 100/60s,1500/3600s".into());
        }
        Ok(RateLimits(limits))
    }
}

impl fmt::Display for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|l| format!("{}/{}", l.calls, humantime::format_duration(l.window)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// One slot in a sliding log: in flight (`done == None`) or answered at `done`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    done: Option<Instant>,
}

#[derive(Debug)]
struct Window {
    limit: RateLimit,
    slots: VecDeque<Slot>,
}

impl Window {
    /// When this window admits one more call: now if fewer than N are logged,
    /// else when the oldest of the last N leaves the window.
    fn ready_at(&self, now: Instant) -> Option<Instant> {
        if self.slots.len() < self.limit.calls as usize {
            return Some(now);
        }
        // Still in flight: it cannot leave the window before it is answered.
        let oldest = self.slots.front()?.done?;
        Some((oldest + self.limit.window).max(now))
    }

    /// Slots that still count at `now`: in flight, or answered less than W ago.
    fn used(&self, now: Instant) -> u32 {
        let counted = self
            .slots
            .iter()
            .filter(|s| s.done.is_none_or(|done| done + self.limit.window > now))
            .count();
        u32::try_from(counted).unwrap_or(u32::MAX)
    }
}

#[derive(Debug)]
struct FamilyBudget {
    windows: Vec<Window>,
    parked_until: Option<Instant>,
}

/// Why a call cannot go now, and when to ask again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotYet {
    /// `None` when every slot is held by a call still in flight.
    pub retry_at: Option<Instant>,
}

/// The budget of one tenant: a sliding log per family per window.
#[derive(Clone)]
pub struct RateBudget {
    inner: Arc<Mutex<BudgetState>>,
}

struct BudgetState {
    next_id: u64,
    families: Vec<(ApiFamily, FamilyBudget)>,
}

/// A reserved slot. Call [`Permit::complete`] when the response arrives; a
/// dropped permit completes at drop time.
pub struct Permit {
    budget: RateBudget,
    family: ApiFamily,
    id: u64,
    completed: bool,
}

impl Permit {
    pub fn complete(mut self) {
        self.finish();
    }

    /// Give the slot back unused: the call was never sent.
    pub fn cancel(mut self) {
        self.completed = true;
        self.budget.remove(self.family, self.id);
    }

    fn finish(&mut self) {
        if !self.completed {
            self.completed = true;
            self.budget.mark_done(self.family, self.id, Instant::now());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.finish();
    }
}

impl RateBudget {
    pub fn new(limits: &RateLimits) -> Self {
        let families = ApiFamily::ALL
            .iter()
            .map(|family| {
                let windows = limits
                    .0
                    .iter()
                    .map(|limit| Window {
                        limit: *limit,
                        // Grown as calls are made: a budget that is
                        // hardly used (one of hundreds of tenants) stays small.
                        slots: VecDeque::new(),
                    })
                    .collect();
                (
                    *family,
                    FamilyBudget {
                        windows,
                        parked_until: None,
                    },
                )
            })
            .collect();
        RateBudget {
            inner: Arc::new(Mutex::new(BudgetState {
                next_id: 0,
                families,
            })),
        }
    }

    /// Take a slot now, or say when to ask again. Never waits.
    pub fn try_reserve(&self, family: ApiFamily) -> Result<Permit, NotYet> {
        let now = Instant::now();
        let mut state = self.inner.lock().expect("budget lock poisoned");
        let id = state.next_id;
        let budget = state.family_mut(family);
        let ready = budget.ready_at(now);
        match ready {
            Some(at) if at <= now => {
                for window in &mut budget.windows {
                    if window.slots.len() == window.limit.calls as usize {
                        window.slots.pop_front();
                    }
                    window.slots.push_back(Slot { id, done: None });
                }
                state.next_id += 1;
                Ok(Permit {
                    budget: self.clone(),
                    family,
                    id,
                    completed: false,
                })
            }
            other => Err(NotYet { retry_at: other }),
        }
    }

    /// When a call of this family could go, without taking a slot.
    pub fn ready_at(&self, family: ApiFamily) -> Option<Instant> {
        let now = Instant::now();
        let mut state = self.inner.lock().expect("budget lock poisoned");
        state.family_mut(family).ready_at(now)
    }

    /// When the `n`-th call from now (0: the next) could go if every call
    /// before it went as early as the windows allow (a call still in flight
    /// counts as answered now). Waiters that each take a place in a queue can
    /// wake at their own slot, so a freed slot wakes the one waiter it serves
    /// rather than all of them.
    pub fn nth_ready_at(&self, family: ApiFamily, n: usize) -> Instant {
        let n = n.min(100_000);
        let now = Instant::now();
        let mut state = self.inner.lock().expect("budget lock poisoned");
        let budget = state.family_mut(family);
        let start = budget.parked_until.filter(|p| *p > now).unwrap_or(now);
        let windows: Vec<(usize, Duration, Vec<Instant>)> = budget
            .windows
            .iter()
            .map(|w| {
                let past = w.slots.iter().map(|s| s.done.unwrap_or(now)).collect();
                (w.limit.calls as usize, w.limit.window, past)
            })
            .collect();
        drop(state);
        let mut future: Vec<Instant> = Vec::with_capacity(n + 1);
        for j in 0..=n {
            let mut at = future.last().copied().unwrap_or(start);
            for (calls, window, past) in &windows {
                // The call `calls` places earlier must have left the window.
                let Some(i) = (past.len() + j).checked_sub(*calls) else {
                    continue;
                };
                let before = past
                    .get(i)
                    .copied()
                    .or_else(|| future.get(i - past.len()).copied());
                if let Some(before) = before {
                    at = at.max(before + *window);
                }
            }
            future.push(at);
        }
        future[n]
    }

    /// Wait for a slot. The lock is never held across the sleep; while every
    /// slot is in flight we re-check after a short pause instead of spinning.
    pub async fn acquire(&self, family: ApiFamily) -> Permit {
        loop {
            match self.try_reserve(family) {
                Ok(permit) => return permit,
                Err(NotYet { retry_at: Some(at) }) => tokio::time::sleep_until(at).await,
                Err(NotYet { retry_at: None }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        }
    }

    /// Count calls made before this process started (e.g. by a previous
    /// leader, known from the resources' `submittedAt`), so a restart does not
    /// spend the same window twice. `answered` are the instants of those calls.
    ///
    /// May be called more than once for one budget (two connections to one
    /// tenant each seed it), and after calls of this process: the seeded
    /// calls are merged into the log by time, calls in flight last, and only
    /// the latest N kept. A window judges by its oldest logged call, so a log
    /// out of time order would let more than N through.
    pub fn record_past(&self, family: ApiFamily, answered: &[Instant]) {
        let mut state = self.inner.lock().expect("budget lock poisoned");
        let first_id = state.next_id;
        state.next_id += answered.len() as u64;
        for window in &mut state.family_mut(family).windows {
            let mut log: Vec<Slot> = window.slots.drain(..).collect();
            log.extend(answered.iter().enumerate().map(|(i, at)| Slot {
                id: first_id + i as u64,
                done: Some(*at),
            }));
            // Stable: calls in flight keep their order, after every answered one.
            log.sort_by_key(|slot| (slot.done.is_none(), slot.done));
            let excess = log.len().saturating_sub(window.limit.calls as usize);
            window.slots = log.into_iter().skip(excess).collect();
        }
    }

    /// Calls this family could send now without waiting, in its tightest window
    /// (0 while parked by a 429). For the `budget_remaining` gauge.
    pub fn remaining(&self, family: ApiFamily) -> u32 {
        let now = Instant::now();
        let mut state = self.inner.lock().expect("budget lock poisoned");
        let budget = state.family_mut(family);
        if budget.parked_until.is_some_and(|p| p > now) {
            return 0;
        }
        budget
            .windows
            .iter()
            .map(|w| w.limit.calls.saturating_sub(w.used(now)))
            .min()
            .unwrap_or(u32::MAX)
    }

    /// Whether forgetting this budget loses nothing: no call in flight or
    /// still counted in any window, and no 429 pause running. A registry of
    /// budgets may then drop it (a new one would decide the same).
    pub fn is_idle(&self) -> bool {
        let now = Instant::now();
        let state = self.inner.lock().expect("budget lock poisoned");
        state.families.iter().all(|(_, budget)| {
            budget.parked_until.is_none_or(|p| p <= now)
                && budget.windows.iter().all(|w| w.used(now) == 0)
        })
    }

    /// Whether another handle (a client) still uses this budget.
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.inner) > 1
    }

    /// A 429 told us the server's budget is spent: stop this family until `until`.
    pub fn park(&self, family: ApiFamily, until: Instant) {
        let mut state = self.inner.lock().expect("budget lock poisoned");
        let budget = state.family_mut(family);
        budget.parked_until = Some(budget.parked_until.map_or(until, |p| p.max(until)));
    }

    fn remove(&self, family: ApiFamily, id: u64) {
        let mut state = self.inner.lock().expect("budget lock poisoned");
        for window in &mut state.family_mut(family).windows {
            window.slots.retain(|s| s.id != id);
        }
    }

    fn mark_done(&self, family: ApiFamily, id: u64, at: Instant) {
        let mut state = self.inner.lock().expect("budget lock poisoned");
        for window in &mut state.family_mut(family).windows {
            if let Some(slot) = window.slots.iter_mut().find(|s| s.id == id) {
                slot.done = Some(at);
            }
        }
    }
}

impl BudgetState {
    fn family_mut(&mut self, family: ApiFamily) -> &mut FamilyBudget {
        &mut self
            .families
            .iter_mut()
            .find(|(f, _)| *f == family)
            .expect("every family has a budget")
            .1
    }
}

impl FamilyBudget {
    fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        if self.parked_until.is_some_and(|p| p <= now) {
            self.parked_until = None;
        }
        let mut ready = self.parked_until.unwrap_or(now);
        for window in &self.windows {
            ready = ready.max(window.ready_at(now)?);
        }
        Some(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_nth_slot_follows_both_windows() {
        let limits: RateLimits = "2/10s,3/100s".parse().unwrap();
        let budget = RateBudget::new(&limits);
        let t0 = Instant::now();
        assert_eq!(budget.nth_ready_at(ApiFamily::Offboard, 0), t0);
        assert_eq!(budget.nth_ready_at(ApiFamily::Offboard, 1), t0);
        // The third waits for the first to leave the 10 s window; the fourth
        // for the first to leave the 100 s window.
        assert_eq!(
            budget.nth_ready_at(ApiFamily::Offboard, 2),
            t0 + Duration::from_secs(10)
        );
        assert_eq!(
            budget.nth_ready_at(ApiFamily::Offboard, 3),
            t0 + Duration::from_secs(100)
        );
        budget.try_reserve(ApiFamily::Offboard).unwrap().complete();
        budget.try_reserve(ApiFamily::Offboard).unwrap().complete();
        assert!(budget.try_reserve(ApiFamily::Offboard).is_err());
        assert_eq!(
            budget.nth_ready_at(ApiFamily::Offboard, 0),
            t0 + Duration::from_secs(10)
        );
        assert_eq!(
            budget.nth_ready_at(ApiFamily::Offboard, 1),
            t0 + Duration::from_secs(100)
        );
    }

    fn limits(text: &str) -> RateLimits {
        text.parse().unwrap()
    }

    #[test]
    fn parses_rate_limit_lists() {
        assert_eq!(limits("100/60s,1500/3600s"), RateLimits::default());
        assert_eq!(limits("5/600ms").0[0].window, Duration::from_millis(600));
        for bad in ["", "100", "0/60s", "x/60s", "100/soon", "100/0s"] {
            let err = bad.parse::<RateLimits>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert_eq!(limits("100/1m,1500/1h").to_string(), "100/1m,1500/1h");
    }

    /// The property that keeps us clear of 429s: never more than N answered or
    /// in-flight calls in any window W, even in the very first window.
    #[tokio::test(start_paused = true)]
    async fn never_more_than_n_in_any_window() {
        let budget = RateBudget::new(&limits("10/1s,25/5s"));
        let start = Instant::now();
        let mut sent = Vec::new();
        while sent.len() < 60 {
            let permit = budget.acquire(ApiFamily::Offboard).await;
            sent.push(Instant::now());
            permit.complete();
        }
        for (calls, window) in [
            (10usize, Duration::from_secs(1)),
            (25, Duration::from_secs(5)),
        ] {
            for (i, t) in sent.iter().enumerate() {
                let in_window = sent[i..].iter().take_while(|u| **u < *t + window).count();
                assert!(
                    in_window <= calls,
                    "{in_window} calls within {window:?} starting at {:?}",
                    *t - start
                );
            }
        }
        // And it is not needlessly slow: 60 calls at 25/5s take 10 s, not more.
        assert!(sent.last().unwrap().duration_since(start) <= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn families_are_independent_and_try_reserve_does_not_wait() {
        let budget = RateBudget::new(&limits("2/1s"));
        let _a = budget.try_reserve(ApiFamily::Offboard).unwrap();
        let _b = budget.try_reserve(ApiFamily::Offboard).unwrap();
        // Both in flight: no instant is known yet.
        assert_eq!(
            budget.try_reserve(ApiFamily::Offboard).err(),
            Some(NotYet { retry_at: None })
        );
        assert!(budget.try_reserve(ApiFamily::Machines).is_ok());
        drop(_a);
        let not_yet = budget.try_reserve(ApiFamily::Offboard).err().unwrap();
        assert_eq!(
            not_yet.retry_at,
            Some(Instant::now() + Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_permit_frees_its_slot() {
        let budget = RateBudget::new(&limits("1/10s"));
        budget.try_reserve(ApiFamily::Offboard).unwrap().cancel();
        assert!(
            budget.try_reserve(ApiFamily::Offboard).is_ok(),
            "the unused slot is back"
        );
        assert!(budget.try_reserve(ApiFamily::Offboard).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn calls_from_before_a_restart_count() {
        let budget = RateBudget::new(&limits("3/10s"));
        let now = Instant::now();
        let past = [
            now - Duration::from_secs(9),
            now - Duration::from_secs(2),
            now - Duration::from_secs(1),
        ];
        budget.record_past(ApiFamily::Offboard, &past);
        // The oldest of the last three leaves the window in 1 s.
        assert_eq!(
            budget.ready_at(ApiFamily::Offboard),
            Some(now + Duration::from_secs(1))
        );
        assert!(
            budget.try_reserve(ApiFamily::Machines).is_ok(),
            "other families are untouched"
        );
    }

    /// Two connections sharing one tenant's budget each seed it with their
    /// own past sends: the log must hold them in time order, or the window
    /// judges by the wrong "oldest" send and lets more than N through.
    #[tokio::test(start_paused = true)]
    async fn seeds_from_two_connections_keep_the_log_in_time_order() {
        let budget = RateBudget::new(&limits("2/10s"));
        let start = Instant::now();
        let ago = |s: u64| start - Duration::from_secs(s);
        budget.record_past(ApiFamily::Offboard, &[ago(12), ago(1)]);
        budget.record_past(ApiFamily::Offboard, &[ago(6)]);
        // The last two sends were 6 s and 1 s ago: the next may go when the
        // one 6 s ago leaves the window, not at once.
        assert_eq!(
            budget.ready_at(ApiFamily::Offboard),
            Some(start + Duration::from_secs(4))
        );
        let mut sent = vec![ago(12), ago(6), ago(1)];
        while sent.len() < 7 {
            let permit = budget.acquire(ApiFamily::Offboard).await;
            sent.push(Instant::now());
            permit.complete();
        }
        for (i, t) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(10))
                .count();
            assert!(in_window <= 2, "{in_window} sends within 10 s of {t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_counts_the_tightest_window_and_a_park() {
        let budget = RateBudget::new(&limits("3/1s,5/10s"));
        assert_eq!(budget.remaining(ApiFamily::Offboard), 3);
        budget.try_reserve(ApiFamily::Offboard).unwrap().complete();
        let _in_flight = budget.try_reserve(ApiFamily::Offboard).unwrap();
        assert_eq!(budget.remaining(ApiFamily::Offboard), 1);
        assert_eq!(budget.remaining(ApiFamily::Machines), 3, "per family");
        tokio::time::advance(Duration::from_millis(1500)).await;
        // The answered call left the 1 s window but not the 10 s one; the
        // call in flight counts in both.
        assert_eq!(budget.remaining(ApiFamily::Offboard), 2);
        budget.park(ApiFamily::Offboard, Instant::now() + Duration::from_secs(5));
        assert_eq!(budget.remaining(ApiFamily::Offboard), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn parked_family_waits_for_retry_after() {
        let budget = RateBudget::new(&RateLimits::default());
        let until = Instant::now() + Duration::from_secs(7);
        budget.park(ApiFamily::Offboard, until);
        assert_eq!(budget.ready_at(ApiFamily::Offboard), Some(until));
        let permit = budget.acquire(ApiFamily::Offboard).await;
        assert!(Instant::now() >= until);
        drop(permit);
        assert!(budget.try_reserve(ApiFamily::MachineActions).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_is_idle_once_its_calls_leave_every_window_and_no_park_runs() {
        let budget = RateBudget::new(&limits("3/1s,5/10s"));
        assert!(budget.is_idle() && !budget.is_shared());
        let client = budget.clone();
        assert!(budget.is_shared(), "a client holds it");
        drop(client);
        let permit = budget.try_reserve(ApiFamily::Offboard).unwrap();
        assert!(!budget.is_idle(), "a call in flight");
        permit.complete();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!budget.is_idle(), "still counted in the 10 s window");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(budget.is_idle());
        budget.park(ApiFamily::Cancel, Instant::now() + Duration::from_secs(3));
        assert!(!budget.is_idle(), "a 429's pause must outlive the client");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(budget.is_idle());
    }
}
