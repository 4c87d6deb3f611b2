//! MDE-style rate limiting: several limits (e.g. 100/min and 1500/h) per API family
//! and caller, counted in sliding or fixed windows. Times are offsets from simulator
//! start in wall-clock time (windows already divided by the time scale), so the
//! logic is pure and testable without sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::config::WindowMode;
use crate::config::RateLimit;

/// The answer for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Throttled; the caller may retry after this long.
    Throttled(Duration),
}

/// Counts calls of one caller against all limits.
#[derive(Debug, Default)]
pub struct Window {
    /// Sliding mode: times of counted calls, oldest first.
    calls: VecDeque<Duration>,
    /// Fixed mode: per limit, the index of the current window and its count.
    fixed: Vec<(u64, u32)>,
}

impl Window {
    /// Decides on a call at `now` and counts it when allowed (throttled calls are not counted).
    pub fn check(&mut self, limits: &[RateLimit], mode: WindowMode, now: Duration) -> Decision {
        match mode {
            WindowMode::Sliding => self.check_sliding(limits, now),
            WindowMode::Fixed => self.check_fixed(limits, now),
        }
    }

    /// Counts calls made at `times` (ascending, none after `now`) as if each
    /// had been allowed then: a predecessor's calls in the current windows.
    pub fn seed(
        &mut self,
        limits: &[RateLimit],
        mode: WindowMode,
        times: &[Duration],
        now: Duration,
    ) {
        match mode {
            WindowMode::Sliding => self
                .calls
                .extend(times.iter().copied().filter(|&t| t <= now)),
            WindowMode::Fixed => {
                self.fixed.resize(limits.len(), (0, 0));
                for (limit, (index, count)) in limits.iter().zip(self.fixed.iter_mut()) {
                    let window_nanos = limit.window.as_nanos().max(1);
                    let current = (now.as_nanos() / window_nanos) as u64;
                    let inside = times
                        .iter()
                        .filter(|t| (t.as_nanos() / window_nanos) as u64 == current && **t <= now)
                        .count();
                    *index = current;
                    *count = u32::try_from(inside).unwrap_or(u32::MAX);
                }
            }
        }
    }

    fn check_sliding(&mut self, limits: &[RateLimit], now: Duration) -> Decision {
        let longest = limits.iter().map(|l| l.window).max().unwrap_or_default();
        while self.calls.front().is_some_and(|&t| t + longest <= now) {
            self.calls.pop_front();
        }
        let mut wait = Duration::ZERO;
        for limit in limits {
            // Calls still inside this limit's window are the newest ones.
            let inside: Vec<Duration> = self
                .calls
                .iter()
                .copied()
                .filter(|&t| t + limit.window > now)
                .collect();
            let calls = limit.calls as usize;
            if inside.len() >= calls {
                // The call that must leave so one more fits.
                let leaving = inside[inside.len() - calls];
                wait = wait.max(leaving + limit.window - now);
            }
        }
        if wait.is_zero() {
            self.calls.push_back(now);
            Decision::Allowed
        } else {
            Decision::Throttled(wait)
        }
    }

    fn check_fixed(&mut self, limits: &[RateLimit], now: Duration) -> Decision {
        self.fixed.resize(limits.len(), (0, 0));
        let mut wait = Duration::ZERO;
        for (limit, (index, count)) in limits.iter().zip(self.fixed.iter_mut()) {
            let window_nanos = limit.window.as_nanos().max(1);
            let current = (now.as_nanos() / window_nanos) as u64;
            if current != *index {
                *index = current;
                *count = 0;
            }
            if *count >= limit.calls {
                let next_start = Duration::from_nanos(
                    u64::try_from((u128::from(current) + 1) * window_nanos).unwrap_or(u64::MAX),
                );
                wait = wait.max(next_start.saturating_sub(now));
            }
        }
        if wait.is_zero() {
            for (_, count) in self.fixed.iter_mut() {
                *count += 1;
            }
            Decision::Allowed
        } else {
            Decision::Throttled(wait)
        }
    }
}

/// Windows of all callers, keyed by (family, caller).
#[derive(Debug, Default)]
pub struct Limiter {
    windows: HashMap<(String, String), Window>,
}

impl Limiter {
    pub fn check(
        &mut self,
        family: &str,
        caller: &str,
        limits: &[RateLimit],
        mode: WindowMode,
        now: Duration,
    ) -> Decision {
        if limits.is_empty() {
            return Decision::Allowed;
        }
        self.windows
            .entry((family.to_owned(), caller.to_owned()))
            .or_default()
            .check(limits, mode, now)
    }
}

impl Limiter {
    /// Counts a caller's calls made before the start (see [`Window::seed`]).
    pub fn seed(
        &mut self,
        family: &str,
        caller: &str,
        limits: &[RateLimit],
        mode: WindowMode,
        times: &[Duration],
        now: Duration,
    ) {
        self.windows
            .entry((family.to_owned(), caller.to_owned()))
            .or_default()
            .seed(limits, mode, times, now);
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    const TWO_PER_10S: [RateLimit; 1] = [RateLimit {
        calls: 2,
        window: Duration::from_secs(10),
    }];

    #[test]
    fn sliding_window_waits_for_the_oldest_counted_call() {
        let mut w = Window::default();
        let m = WindowMode::Sliding;
        assert_eq!(w.check(&TWO_PER_10S, m, s(0.0)), Decision::Allowed);
        assert_eq!(w.check(&TWO_PER_10S, m, s(4.0)), Decision::Allowed);
        assert_eq!(
            w.check(&TWO_PER_10S, m, s(6.0)),
            Decision::Throttled(s(4.0))
        );
        // Throttled calls are not counted: the first call still leaves at 10.
        assert_eq!(
            w.check(&TWO_PER_10S, m, s(9.5)),
            Decision::Throttled(s(0.5))
        );
        assert_eq!(w.check(&TWO_PER_10S, m, s(10.0)), Decision::Allowed);
        // Now the calls at 4 and 10 count; the one at 4 leaves at 14.
        assert_eq!(
            w.check(&TWO_PER_10S, m, s(11.0)),
            Decision::Throttled(s(3.0))
        );
        assert_eq!(w.check(&TWO_PER_10S, m, s(14.0)), Decision::Allowed);
    }

    #[test]
    fn fixed_window_resets_at_the_boundary() {
        let mut w = Window::default();
        let m = WindowMode::Fixed;
        assert_eq!(w.check(&TWO_PER_10S, m, s(0.0)), Decision::Allowed);
        assert_eq!(w.check(&TWO_PER_10S, m, s(9.0)), Decision::Allowed);
        assert_eq!(
            w.check(&TWO_PER_10S, m, s(9.5)),
            Decision::Throttled(s(0.5))
        );
        // A sliding window would refuse these two; a fixed one starts afresh.
        assert_eq!(w.check(&TWO_PER_10S, m, s(10.0)), Decision::Allowed);
        assert_eq!(w.check(&TWO_PER_10S, m, s(10.5)), Decision::Allowed);
        assert_eq!(
            w.check(&TWO_PER_10S, m, s(11.0)),
            Decision::Throttled(s(9.0))
        );
    }

    #[test]
    fn the_longest_wait_of_several_limits_wins() {
        let limits = [
            RateLimit {
                calls: 3,
                window: Duration::from_secs(1),
            },
            RateLimit {
                calls: 4,
                window: Duration::from_secs(60),
            },
        ];
        let mut w = Window::default();
        let m = WindowMode::Sliding;
        for t in [0.0, 0.1, 0.2] {
            assert_eq!(w.check(&limits, m, s(t)), Decision::Allowed);
        }
        assert_eq!(w.check(&limits, m, s(0.5)), Decision::Throttled(s(0.5)));
        assert_eq!(w.check(&limits, m, s(1.0)), Decision::Allowed);
        // The hourly-style limit is exhausted: wait until the first call is 60 s old.
        assert_eq!(w.check(&limits, m, s(2.0)), Decision::Throttled(s(58.0)));
    }

    #[test]
    fn callers_and_families_are_counted_apart() {
        let limits = [RateLimit {
            calls: 1,
            window: Duration::from_secs(60),
        }];
        let mut l = Limiter::default();
        let m = WindowMode::Sliding;
        assert_eq!(
            l.check("offboard", "t/a", &limits, m, s(0.0)),
            Decision::Allowed
        );
        assert_eq!(
            l.check("machines", "t/a", &limits, m, s(0.0)),
            Decision::Allowed
        );
        assert_eq!(
            l.check("offboard", "t/b", &limits, m, s(0.0)),
            Decision::Allowed
        );
        assert!(matches!(
            l.check("offboard", "t/a", &limits, m, s(1.0)),
            Decision::Throttled(_)
        ));
    }

    /// A predecessor's calls fill the windows: the first call of this
    /// process waits for the oldest of them to leave, in either mode.
    #[test]
    fn seeded_calls_count_against_the_windows() {
        let times = [s(1.0), s(5.0)];
        let mut sliding = Window::default();
        sliding.seed(&TWO_PER_10S, WindowMode::Sliding, &times, s(6.0));
        assert_eq!(
            sliding.check(&TWO_PER_10S, WindowMode::Sliding, s(6.0)),
            Decision::Throttled(s(5.0))
        );
        assert_eq!(
            sliding.check(&TWO_PER_10S, WindowMode::Sliding, s(11.0)),
            Decision::Allowed
        );
        let mut fixed = Window::default();
        fixed.seed(&TWO_PER_10S, WindowMode::Fixed, &times, s(6.0));
        assert_eq!(
            fixed.check(&TWO_PER_10S, WindowMode::Fixed, s(6.0)),
            Decision::Throttled(s(4.0))
        );
        assert_eq!(
            fixed.check(&TWO_PER_10S, WindowMode::Fixed, s(10.0)),
            Decision::Allowed
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(s(0.001)), 1);
        assert_eq!(retry_after_secs(s(1.0)), 1);
        assert_eq!(retry_after_secs(s(1.2)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
