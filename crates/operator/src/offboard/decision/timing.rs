//! When a lookup that must precede a resend may run, from how long this
//! process has seen the intent on its own monotonic clock. Shared by the
//! offboard's and the cancel's plans.

use super::Settings;
use std::time::Duration;

/// How long this process saw a resource `Submitting` (or its cancel
/// `Requesting`), and whether it has already made the early lookup (the one
/// that may adopt but proves nothing). Measured by the caller's lookup clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmittingClock {
    pub seen_for: Duration,
    pub looked_early: bool,
}

/// When a lookup that must precede a resend may run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum LookupTiming {
    /// Now; `proves_absence` once this process has seen the intent for
    /// `lookup_delay` on its own monotonic clock (earlier, it may only adopt).
    Now { proves_absence: bool },
    /// The early lookup was made: wait this long for the one that may prove.
    Later(Duration),
}

pub(super) fn lookup_timing(clock: Option<SubmittingClock>, settings: &Settings) -> LookupTiming {
    let clock = clock.unwrap_or(SubmittingClock {
        seen_for: Duration::ZERO,
        looked_early: false,
    });
    if clock.seen_for >= settings.lookup_delay {
        LookupTiming::Now {
            proves_absence: true,
        }
    } else if !clock.looked_early {
        LookupTiming::Now {
            proves_absence: false,
        }
    } else {
        LookupTiming::Later(settings.lookup_delay - clock.seen_for)
    }
}
