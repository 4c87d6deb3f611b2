//! The machine check before a first send, served from one index instead of
//! one MDE read per machine.
//!
//! Before a resource's first offboard, the step lists the machine's
//! offboard actions to adopt one that another request of this operator
//! already made ([`super::decision::lookup::found_in`]). Only actions carrying
//! this operator's marker can be adopted, and almost always there is none: the
//! read only proves absence. Reads share MDE's 100/min and 1,500/h with the
//! offboards, so one read per send halves the throughput.
//!
//! The index answers that common case. It holds, for every machine with an
//! offboard action carrying the marker (of any key, in any status) created
//! within `--adopt-window`, only a hash of the machine id and the newest such
//! action's creation time: 16 bytes a machine. It is filled by one paged read
//! (`type eq 'Offboard' and creationDateTimeUtc ge <start of window>`, pages
//! of 10,000), kept current by incremental reads of the same filter from the
//! newest creation time it has seen (less `--lookup-delay`, the lag of MDE's
//! list), and fed by the poller's window reads.
//!
//! It is used only to prove "nothing to adopt": [`machine_check`] answers
//! [`MachineCheck::Send`] only when the index is fresh (its last complete read
//! began after this process became able to send, and at most `max_age` ago)
//! and holds nothing for the machine. A machine it holds anything for (a hash
//! collision included) gets today's exact per-machine read, and so does every
//! machine when the index cannot be refreshed. Actions this process sends
//! after the last read are in the machine claims of [`super::state`]
//! (`MachineClaims`), which the step consults first.
//!
//! What the index does not see: a marked action created before the window
//! (a first send for that machine is then made; MDE refuses it with
//! `ActiveRequestAlreadyExists` while that action is still pending, and that
//! answer is adopted), and one another process (the `offboard` command, a
//! second installation) created less than `max_age` before the check, as an
//! exact read would not see one created less than the list's lag before it.

pub(crate) use super::decision::window_start;
use jiff::{SignedDuration, Timestamp};
use mde_client::{MachineAction, marker_key};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;
use tokio::time::Instant;

/// What the machine check does for one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MachineCheck {
    /// The index proves there is nothing to adopt: send without a read.
    Send,
    /// The index holds an action of this operator for the machine (or may):
    /// read the machine's list, as without the index.
    ExactRead,
    /// The index is not fresh: refresh it (one read for every machine), then
    /// decide again; read exactly if that fails.
    Refresh,
}

/// How fresh the index must be to prove absence.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Freshness {
    /// Since when this process may send (the lease's start; `None`: it may not).
    pub sending_since: Option<Instant>,
    /// The oldest a last read may be.
    pub max_age: Duration,
    pub now: Instant,
}

/// One complete read the index was (or will be) brought up to date with.
#[derive(Debug, Clone, Copy)]
struct Read {
    /// When the read began (this process's clock).
    began: Instant,
}

/// Machines with an offboard action of this operator in the window.
#[derive(Debug, Default)]
pub(crate) struct AdoptIndex {
    /// Hash of the machine id → newest creation time (Unix seconds) of an
    /// offboard action carrying the marker.
    machines: HashMap<u64, i64>,
    /// The last complete read that the index is current with; `None` until
    /// the first fill.
    read: Option<Read>,
    /// The newest creation time (MDE's clock) among the actions read.
    newest: Option<Timestamp>,
    /// Where the first fill started (MDE's clock, the start of the window).
    filled_from: Option<Timestamp>,
    /// When the last complete read of the whole window began: after
    /// [`REFILL_EVERY`], the next read covers the whole window again.
    full_read: Option<Instant>,
    /// Pages a read of the whole window was seen to need (0: not known).
    pages_needed: usize,
    /// Reads of the whole window in a row that stopped part way, and until
    /// when no refresh is tried after the last: exact reads serve meanwhile.
    stopped_fills: u32,
    refresh_after: Option<Instant>,
}

/// The wait before a read of the whole window is tried again after one
/// stopped part way (MDE refused a page, or the read budget ran out):
/// doubling from a minute to 16. A fill retried at once would spend the
/// slot that just freed on its first page again, and meet the same refusal
/// on the next: first sends would wait on it for good.
fn refresh_backoff(stopped_fills: u32) -> Duration {
    Duration::from_secs(60).saturating_mul(1 << stopped_fills.clamp(1, 5).saturating_sub(1))
}

/// How often the whole window is read again. Incremental reads start at the
/// newest creation time seen less the list's lag; an action MDE listed later
/// than that (a spike of list lag) would be a gap for good: a full read heals
/// it within this long.
pub(crate) const REFILL_EVERY: Duration = Duration::from_secs(3600);

fn machine_hash(machine_id: &str) -> u64 {
    // Case-insensitive: MDE's machine ids are hex, and a filter matches either case.
    let mut hasher = DefaultHasher::new();
    machine_id.to_ascii_lowercase().hash(&mut hasher);
    hasher.finish()
}

/// Whether to send, read exactly or refresh first, decided without I/O.
pub(crate) fn machine_check(
    index: &AdoptIndex,
    machine_id: &str,
    fresh: Freshness,
) -> MachineCheck {
    let Some(sending_since) = fresh.sending_since else {
        // Not able to send: nothing is sent anyway; the exact read is the safe answer.
        return MachineCheck::ExactRead;
    };
    let refresh = if index.refresh_after.is_some_and(|after| fresh.now < after) {
        MachineCheck::ExactRead
    } else {
        MachineCheck::Refresh
    };
    let Some(read) = index.read else {
        return refresh;
    };
    // Read before this process could send (a previous leader may have sent
    // since), or too long ago: not a proof.
    if read.began < sending_since || fresh.now.saturating_duration_since(read.began) > fresh.max_age
    {
        return refresh;
    }
    if index.machines.contains_key(&machine_hash(machine_id)) {
        MachineCheck::ExactRead
    } else {
        MachineCheck::Send
    }
}

impl AdoptIndex {
    /// Machines the index holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.machines.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }

    /// Where the next refresh reads from: the start of the window for the
    /// first fill (or when the last read is older than the window), else the
    /// newest creation time seen less `lag` (MDE's list may show an action
    /// this long after its creation time), never before the window.
    pub(crate) fn next_since(
        &self,
        now: Timestamp,
        window: Duration,
        lag: Duration,
        at: Instant,
    ) -> Timestamp {
        let start = window_start(now, window);
        let refill_due = self
            .full_read
            .is_none_or(|full| at.saturating_duration_since(full) >= REFILL_EVERY);
        match (self.read, self.newest.or(self.filled_from)) {
            (Some(_), Some(_)) if refill_due => start,
            (Some(_), Some(from)) => {
                let lag = SignedDuration::try_from(lag).unwrap_or(SignedDuration::MAX);
                from.checked_sub(lag).unwrap_or(from).max(start)
            }
            _ => start,
        }
    }

    /// Fold in the marked actions of a read. Any answer may add entries
    /// (more entries only mean more exact reads); only a complete answer
    /// read from no later than [`Self::next_since`] makes the index current
    /// as of `began`.
    pub(crate) fn fold(
        &mut self,
        actions: &[MachineAction],
        since: Timestamp,
        began: Instant,
        complete: bool,
        next_since: Timestamp,
    ) {
        let mut newest = None;
        for action in actions {
            if action.action_type != "Offboard" {
                continue;
            }
            let created = action
                .creation_date_time_utc
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok());
            newest = newest.max(created);
            let marked = action
                .requestor_comment
                .as_deref()
                .and_then(marker_key)
                .is_some();
            if let (true, Some(machine_id)) = (marked, action.machine_id.as_deref()) {
                // An unreadable time stays until the window is filled again.
                let at = created.map_or(i64::MAX, |t| t.as_second());
                let entry = self.machines.entry(machine_hash(machine_id)).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
        // Only an accepted read moves where the next one starts: a read with a
        // gap before it must not let the next one skip that gap.
        let contiguous = since <= next_since;
        let newer = self.read.is_none_or(|r| began > r.began);
        if complete && contiguous && newer {
            if self.read.is_none() {
                self.filled_from = Some(since);
            }
            self.read = Some(Read { began });
            self.newest = self.newest.max(newest);
        }
    }

    /// A complete read of the whole window began at `began`, in `pages`.
    pub(crate) fn read_whole_window(&mut self, began: Instant, pages: usize) {
        self.full_read = self.full_read.max(Some(began));
        self.pages_needed = pages;
        self.stopped_fills = 0;
        self.refresh_after = None;
    }

    /// A read of the whole window stopped after `pages_read` pages (the read
    /// budget ran out, or a page failed) at `at`: it needs at least one more,
    /// and is not tried again before [`refresh_backoff`] has passed.
    pub(crate) fn stopped_after(&mut self, pages_read: usize, at: Instant) {
        self.pages_needed = self.pages_needed.max(pages_read + 1);
        self.stopped_fills = self.stopped_fills.saturating_add(1);
        self.refresh_after = Some(at + refresh_backoff(self.stopped_fills));
    }

    /// Read slots a read of the whole window needs, as far as is known.
    pub(crate) fn pages_needed(&self) -> usize {
        self.pages_needed.max(1)
    }

    /// Forget machines whose newest marked action left the window.
    pub(crate) fn prune(&mut self, now: Timestamp, window: Duration) {
        let start = window_start(now, window).as_second();
        self.machines.retain(|_, at| *at >= start);
        if self.machines.capacity() > 2 * self.machines.len() + 64 {
            self.machines.shrink_to_fit();
        }
    }
}

/// Whether a window read answered everything it was asked: a short last
/// page (an answer the poller stopped early, at a full page, may not be).
pub(crate) fn complete_answer(actions: &[MachineAction], top: usize) -> bool {
    top == 0 || !actions.len().is_multiple_of(top) || actions.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mde_client::{ActionStatus, comment_with_marker};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn action(machine: &str, comment: &str, created: Timestamp) -> MachineAction {
        let mut a = MachineAction::recorded_offboard("a1", machine, ActionStatus::Failed);
        a.requestor_comment = Some(comment.into());
        a.creation_date_time_utc = Some(created.to_string());
        a
    }

    fn fresh(now: Instant) -> Freshness {
        Freshness {
            sending_since: Some(now),
            max_age: Duration::from_secs(35),
            now,
        }
    }

    const WINDOW: Duration = Duration::from_secs(86_400);
    const LAG: Duration = Duration::from_secs(35);

    /// An index filled by one complete read that began at `began`.
    fn filled(actions: &[MachineAction], began: Instant) -> AdoptIndex {
        let mut index = AdoptIndex::default();
        let since = index.next_since(at(0), WINDOW, LAG, Instant::now());
        assert_eq!(since, at(-86_400), "the first fill reads the whole window");
        index.fold(actions, since, began, true, since);
        index.read_whole_window(began, 1);
        index
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_index_without_the_machine_proves_absence() {
        let began = Instant::now();
        let index = filled(
            &[action("m1", &comment_with_marker("x", "k1"), at(-10))],
            began,
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        let f = fresh(Instant::now());
        let f = Freshness {
            sending_since: Some(began - Duration::from_secs(1)),
            ..f
        };
        assert_eq!(machine_check(&index, "m2", f), MachineCheck::Send);
        // Any marked action for the machine, in any status: the exact read.
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::ExactRead);
        assert_eq!(
            machine_check(&index, "M1", f),
            MachineCheck::ExactRead,
            "ids in either case"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unmarked_actions_are_not_candidates() {
        let began = Instant::now();
        let index = filled(&[action("m1", "offboarded by hand", at(-10))], began);
        let f = Freshness {
            sending_since: Some(began),
            ..fresh(Instant::now())
        };
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::Send);
        assert!(index.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_not_fresh_is_refreshed_first() {
        // Never filled.
        let now = Instant::now();
        assert_eq!(
            machine_check(&AdoptIndex::default(), "m1", fresh(now)),
            MachineCheck::Refresh
        );
        // Filled before this process became able to send (a new leader).
        let index = filled(&[], now);
        tokio::time::advance(Duration::from_secs(1)).await;
        let later = Instant::now();
        assert_eq!(
            machine_check(&index, "m1", fresh(later)),
            MachineCheck::Refresh
        );
        // Too old.
        let f = Freshness {
            sending_since: Some(now),
            max_age: Duration::from_secs(35),
            now: later + Duration::from_secs(36),
        };
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::Refresh);
        // Not able to send: no proof.
        let f = Freshness {
            sending_since: None,
            ..fresh(later)
        };
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::ExactRead);
    }

    #[tokio::test(start_paused = true)]
    async fn only_complete_contiguous_reads_make_it_current() {
        let t0 = Instant::now();
        let mut index = AdoptIndex::default();
        let since = index.next_since(at(0), WINDOW, LAG, Instant::now());
        // An incomplete first read adds entries but proves nothing.
        index.fold(
            &[action("m1", &comment_with_marker("x", "k1"), at(-5))],
            since,
            t0,
            false,
            since,
        );
        let f = Freshness {
            sending_since: Some(t0),
            ..fresh(t0)
        };
        assert_eq!(machine_check(&index, "m2", f), MachineCheck::Refresh);
        assert_eq!(
            index.next_since(at(0), WINDOW, LAG, Instant::now()),
            since,
            "nothing accepted yet"
        );
        index.fold(
            &[action("m1", &comment_with_marker("x", "k1"), at(-5))],
            since,
            t0,
            true,
            since,
        );
        index.read_whole_window(t0, 1);
        assert_eq!(machine_check(&index, "m2", f), MachineCheck::Send);
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::ExactRead);
        // The next read starts at the newest creation less the lag.
        let next = index.next_since(at(10), WINDOW, LAG, Instant::now());
        assert_eq!(next, at(-5) - SignedDuration::from_secs(35));
        // A read from later than that (a gap) adds, but the index stays as of t0.
        tokio::time::advance(Duration::from_secs(60)).await;
        let t1 = Instant::now();
        index.fold(
            &[action("m3", &comment_with_marker("x", "k3"), at(50))],
            at(40),
            t1,
            true,
            next,
        );
        let f1 = Freshness {
            sending_since: Some(t0),
            ..fresh(t1)
        };
        assert_eq!(machine_check(&index, "m2", f1), MachineCheck::Refresh);
        assert_eq!(machine_check(&index, "m3", f1), MachineCheck::Refresh);
        assert_eq!(
            index.next_since(at(60), WINDOW, LAG, Instant::now()),
            next,
            "a read with a gap before it does not move the next start"
        );
        // A contiguous complete read: current again, and m3 is a candidate.
        index.fold(&[], next, t1, true, next);
        assert_eq!(machine_check(&index, "m2", f1), MachineCheck::Send);
        assert_eq!(machine_check(&index, "m3", f1), MachineCheck::ExactRead);
    }

    #[test]
    fn machines_leave_with_the_window_and_answers_are_complete_when_short() {
        let mut index = AdoptIndex::default();
        let t = Instant::now();
        index.fold(
            &[
                action("old", &comment_with_marker("x", "k1"), at(-90_000)),
                action("new", &comment_with_marker("x", "k2"), at(-10)),
            ],
            at(-86_400),
            t,
            true,
            at(-86_400),
        );
        assert_eq!(index.len(), 2);
        index.prune(at(0), WINDOW);
        assert_eq!(index.len(), 1);
        let one = [action("m", "c", at(0))];
        assert!(complete_answer(&[], 10_000));
        assert!(complete_answer(&one, 10_000));
        assert!(
            !complete_answer(&one, 1),
            "a full page may have more behind it"
        );
    }

    /// One spike of list lag must not leave a gap for good: incremental
    /// reads start at the newest creation seen less the lag, so an action
    /// listed later than that is missed by them; the whole window is read
    /// again every [`REFILL_EVERY`], which finds it.
    #[tokio::test(start_paused = true)]
    async fn the_whole_window_is_read_again_so_a_lag_spike_heals() {
        let t0 = Instant::now();
        let mut index = filled(&[action("m1", &comment_with_marker("x", "k1"), at(-5))], t0);
        let incremental = index.next_since(at(10), WINDOW, LAG, t0);
        assert_eq!(incremental, at(-5) - SignedDuration::from_secs(35));
        // Later reads move on past a range an action may still appear in.
        tokio::time::advance(Duration::from_secs(600)).await;
        index.fold(
            &[action("m2", &comment_with_marker("x", "k2"), at(600))],
            incremental,
            Instant::now(),
            true,
            incremental,
        );
        assert!(index.next_since(at(610), WINDOW, LAG, Instant::now()) > at(0));
        tokio::time::advance(REFILL_EVERY).await;
        assert_eq!(
            index.next_since(at(4210), WINDOW, LAG, Instant::now()),
            at(4210) - SignedDuration::try_from(WINDOW).unwrap(),
            "after an hour the whole window is read again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_fill_remembers_its_pages_and_waits_before_the_next() {
        let mut index = AdoptIndex::default();
        assert_eq!(index.pages_needed(), 1);
        let now = Instant::now();
        index.stopped_after(2, now);
        assert_eq!(index.pages_needed(), 3);
        // Meanwhile the machine is read exactly, not the window again.
        let f = fresh(now + Duration::from_secs(59));
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::ExactRead);
        let f = fresh(now + Duration::from_secs(60));
        assert_eq!(machine_check(&index, "m1", f), MachineCheck::Refresh);
        index.stopped_after(1, now);
        assert_eq!(index.pages_needed(), 3, "never less than already seen");
        let f = fresh(now + Duration::from_secs(119));
        assert_eq!(
            machine_check(&index, "m1", f),
            MachineCheck::ExactRead,
            "the wait doubles"
        );
        assert_eq!(
            refresh_backoff(9),
            Duration::from_secs(960),
            "at most 16 minutes"
        );
        index.read_whole_window(now, 4);
        assert_eq!(index.pages_needed(), 4);
        assert_eq!(
            machine_check(&index, "m1", f),
            MachineCheck::Refresh,
            "a complete read ends the wait"
        );
    }
}
