//! How one poll reads the actions in flight, decided without I/O: one window
//! `type eq 'Offboard' and creationDateTimeUtc ge T` (pages of 10,000, matched
//! locally) for most of them, `id in (...)` batches for the few too old to be
//! worth a window that reaches back to them, whichever costs fewer calls.

use jiff::{SignedDuration, Timestamp};
use mde_client::client::{IDS_PER_QUERY, MAX_TOP};

/// One action in flight and the earliest time MDE may have created it.
/// `None`: unknown (no `submittedAt`, never seen in an answer): only an
/// `id in (...)` batch is sure to find it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub id: String,
    pub since: Option<Timestamp>,
}

/// What one poll asks MDE.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollPlan {
    /// Read every offboard action created at or after this (one call per page).
    pub window_since: Option<Timestamp>,
    /// Read these ids with `id in (...)`, [`IDS_PER_QUERY`] a call.
    pub by_ids: Vec<String>,
}

impl PollPlan {
    /// The calls the plan is expected to cost with `density`.
    pub fn expected_calls(&self, now: Timestamp, density: Density) -> usize {
        self.by_ids.len().div_ceil(IDS_PER_QUERY)
            + self
                .window_since
                .map_or(0, |since| density.pages(now, since))
    }
}

/// How many offboard actions (anyone's) MDE lists per second of window, as
/// the last window answer showed; unknown before the first one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Density(pub Option<f64>);

impl Density {
    /// Learn from a window answer: `count` actions created since `since`.
    pub fn observed(now: Timestamp, since: Timestamp, count: usize) -> Self {
        let span = now.duration_since(since).as_secs_f64().max(1.0);
        Density(Some(count as f64 / span))
    }

    /// The pages a window from `since` to `now` is expected to take (at least one).
    pub fn pages(self, now: Timestamp, since: Timestamp) -> usize {
        let Some(per_second) = self.0 else { return 1 };
        let span = now.duration_since(since).as_secs_f64().max(0.0);
        let expected = (per_second * span).ceil();
        // A hostile or absurd figure must not overflow: cap at the pages a
        // list ever follows.
        if !expected.is_finite() || expected >= (MAX_TOP * 100) as f64 {
            return 100;
        }
        ((expected as usize) / MAX_TOP + 1).max(1)
    }
}

/// MDE's clock and ours may disagree: a window starts this much before the
/// earliest time we expect.
pub const CLOCK_SKEW: SignedDuration = SignedDuration::from_secs(300);

/// `t` moved back by `skew` (unchanged at the edge of time).
fn earlier(t: Timestamp, skew: SignedDuration) -> Timestamp {
    t.checked_sub(skew).unwrap_or(t)
}

/// The cheapest plan with the default [`CLOCK_SKEW`].
pub fn plan(in_flight: &[InFlight], now: Timestamp, density: Density) -> PollPlan {
    plan_with_skew(in_flight, now, density, CLOCK_SKEW)
}

/// The cheapest plan: the oldest `i` actions by id, the rest by one window
/// from the `i+1`-th oldest time less `skew`. Ties go to the window (fewer ids
/// to send).
pub fn plan_with_skew(
    in_flight: &[InFlight],
    now: Timestamp,
    density: Density,
    skew: SignedDuration,
) -> PollPlan {
    if in_flight.is_empty() {
        return PollPlan::default();
    }
    // Unknown times first: they can only go by id.
    let mut sorted: Vec<&InFlight> = in_flight.iter().collect();
    sorted.sort_by_key(|a| a.since);
    let unknown = sorted.iter().take_while(|a| a.since.is_none()).count();
    let cost = |i: usize| {
        let ids = i.div_ceil(IDS_PER_QUERY);
        match sorted.get(i).and_then(|a| a.since) {
            Some(since) => ids + density.pages(now, earlier(since, skew)),
            None => ids,
        }
    };
    let best = (unknown..=sorted.len())
        .min_by_key(|&i| cost(i))
        .unwrap_or(sorted.len());
    PollPlan {
        window_since: sorted
            .get(best)
            .and_then(|a| a.since)
            .map(|t| earlier(t, skew)),
        by_ids: sorted[..best].iter().map(|a| a.id.clone()).collect(),
    }
}

/// Ids a window should have held but did not, and too young for that to mean
/// anything (MDE's list lags behind its writes): they wait for the next poll
/// rather than cost a call now.
pub fn worth_reading_again(action: &InFlight, now: Timestamp, grace: SignedDuration) -> bool {
    action
        .since
        .is_none_or(|since| now.duration_since(since) >= grace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn flight(n: usize, since: Timestamp) -> Vec<InFlight> {
        (0..n)
            .map(|i| InFlight {
                id: format!("a{i}"),
                since: Some(since),
            })
            .collect()
    }

    #[test]
    fn thousands_in_flight_cost_one_window_call() {
        let now = at(600);
        for n in [51, 1_000, 10_000] {
            let p = plan(&flight(n, at(0)), now, Density::default());
            assert_eq!(p.window_since, Some(at(0) - CLOCK_SKEW), "{n}");
            assert!(p.by_ids.is_empty(), "{n}");
            assert_eq!(p.expected_calls(now, Density::default()), 1, "{n}");
        }
        // A busy tenant: 2 actions a second over the last 10 minutes is still one page.
        let busy = Density::observed(now, at(0), 1200);
        let p = plan(&flight(10_000, at(0)), now, busy);
        assert_eq!(p.expected_calls(now, busy), 1);
    }

    #[test]
    fn a_few_in_flight_cost_one_call() {
        for n in [1, 50] {
            let p = plan(&flight(n, at(0)), at(10), Density::default());
            assert_eq!(p.expected_calls(at(10), Density::default()), 1, "{n}");
        }
        // Only unknown times: one id batch, no window.
        let unknown: Vec<InFlight> = (0..3)
            .map(|i| InFlight {
                id: format!("u{i}"),
                since: None,
            })
            .collect();
        let p = plan(&unknown, at(10), Density::default());
        assert_eq!((p.window_since, p.by_ids.len()), (None, 3));
    }

    #[test]
    fn one_very_old_action_goes_by_id_and_the_window_stays_short() {
        let now = at(30 * 86_400);
        // MDE lists 1 offboard a second: a window back 30 days would take
        // hundreds of pages.
        let density = Density(Some(1.0));
        let mut actions = flight(1_000, now - SignedDuration::from_secs(60));
        actions.push(InFlight {
            id: "old".into(),
            since: Some(at(0)),
        });
        let p = plan(&actions, now, density);
        assert_eq!(p.by_ids, ["old"]);
        assert_eq!(p.expected_calls(now, density), 2);
    }

    #[test]
    fn unknown_times_go_by_id() {
        let mut actions = flight(100, at(0));
        actions.push(InFlight {
            id: "adopted".into(),
            since: None,
        });
        let p = plan(&actions, at(60), Density::default());
        assert_eq!(p.by_ids, ["adopted"]);
        assert!(p.window_since.is_some());
        assert_eq!(plan(&[], at(0), Density::default()), PollPlan::default());
    }

    #[test]
    fn absurd_densities_stay_bounded() {
        let now = at(1000);
        assert_eq!(Density(Some(f64::INFINITY)).pages(now, at(0)), 100);
        assert_eq!(Density(Some(f64::NAN)).pages(now, at(0)), 100);
        assert_eq!(Density(Some(-5.0)).pages(now, at(0)), 1);
        assert_eq!(
            Density(Some(1.0)).pages(at(0), now),
            1,
            "a window in the future"
        );
        assert_eq!(Density::observed(now, now, 5), Density(Some(5.0)));
    }

    #[test]
    fn young_absences_wait_for_the_next_poll() {
        let grace = SignedDuration::from_secs(35);
        let young = InFlight {
            id: "a".into(),
            since: Some(at(0)),
        };
        assert!(!worth_reading_again(&young, at(10), grace));
        assert!(worth_reading_again(&young, at(35), grace));
        let unknown = InFlight {
            id: "b".into(),
            since: None,
        };
        assert!(worth_reading_again(&unknown, at(0), grace));
    }
}
