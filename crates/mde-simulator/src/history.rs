//! A tenant's past, in place when the simulator starts: offboard actions MDE
//! already holds, when it last saw each machine, and calls the application
//! already made in the current rate-limit windows (a predecessor process).
//!
//! The past is in real time (UTC timestamps before the start), not scaled:
//! an offboard "60 days ago" carries a `creationDateTimeUtc` 60 days before
//! now, as MDE would show it. Calls made before the start are in simulated
//! time, like the windows that count them.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::actions::Status;
use super::stats::CORRELATION_MARKER;

/// How long MDE keeps machine actions: older ones are not seeded.
pub const ACTION_RETENTION: Duration = Duration::from_secs(180 * 24 * 3600);

/// One machine's past: when MDE last saw it and the offboards it holds for it.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineHistory {
    /// The machine's id (40 hex digits). A machine not in the inventory is
    /// added to it (a Windows 10 workstation).
    pub machine_id: String,
    /// How long before the start MDE last saw the machine. Later than an
    /// offboard's end means the device was onboarded again after it.
    pub last_seen_ago: Duration,
    pub offboards: Vec<PastOffboard>,
}

/// An offboard action that ended before the simulator started.
#[derive(Clone, Debug, PartialEq)]
pub struct PastOffboard {
    /// Its `requestorComment`, verbatim (a marker of another request, a
    /// person's note from the portal).
    pub comment: String,
    /// How long before the start it was created.
    pub created_ago: Duration,
    /// How long after its creation it ended (its `lastUpdateDateTimeUtc`).
    pub took: Duration,
    /// How it ended: `Succeeded`, `Failed`, `TimeOut` or `Cancelled`.
    pub status: Status,
}

impl PastOffboard {
    /// A `Succeeded` offboard created `created_ago` before the start that took ten minutes.
    pub fn succeeded(comment: impl Into<String>, created_ago: Duration) -> Self {
        PastOffboard {
            comment: comment.into(),
            created_ago,
            took: Duration::from_secs(600),
            status: Status::Succeeded,
        }
    }

    /// When it ended, relative to the start (`None`: it ended after the start,
    /// which a past action cannot).
    pub fn ended_ago(&self) -> Option<Duration> {
        self.created_ago.checked_sub(self.took)
    }
}

/// Many offboards of machines no longer in the inventory, spread evenly over
/// `span` before the start: a tenant where reading a window of offboards
/// takes several pages. Each ended `Succeeded` ten minutes after creation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BulkHistory {
    pub offboards: usize,
    /// The oldest was created this long before the start, the newest
    /// `span / offboards` before it.
    pub span: Duration,
    /// Whether each comment carries a correlation marker of its own
    /// (`[defender-offboard:history-N] decommissioned`): offboards this
    /// operator made for other requests. Without, people made them in the portal.
    pub marked: bool,
}

/// Calls this tenant's application made before the start, still counted by
/// the rate-limit windows of one API family.
#[derive(Clone, Debug, PartialEq)]
pub struct PriorCalls {
    /// `machines`, `machineactions`, `offboard` or `cancel`.
    pub family: String,
    pub calls: u32,
    /// Spread evenly over this long before the start (simulated time), the
    /// last one at the start.
    pub over: Duration,
}

impl PriorCalls {
    /// When each call was made, as an offset from `epoch` back in wall-clock
    /// time (`over` already scaled), oldest first, the last at `epoch`.
    pub(crate) fn times(&self, over: Duration, epoch: Duration) -> Vec<Duration> {
        let calls = self.calls.max(1);
        let step = over / calls;
        (1..=self.calls)
            .map(|i| epoch.saturating_sub(over) + step * i)
            .collect()
    }
}

/// Why a history cannot be seeded.
pub(crate) fn check(
    machines: &[MachineHistory],
    prior: &[PriorCalls],
    known_family: impl Fn(&str) -> bool,
) -> Result<(), String> {
    for machine in machines {
        if machine.machine_id.trim().is_empty() {
            return Err("a machine history needs a machine id".into());
        }
        for offboard in &machine.offboards {
            if !offboard.status.is_final() {
                return Err(format!(
                    "a past offboard of {} must have ended, not be {:?}",
                    machine.machine_id, offboard.status
                ));
            }
            if offboard.ended_ago().is_none() {
                return Err(format!(
                    "a past offboard of {} took {:?}, longer than the {:?} since it was created",
                    machine.machine_id, offboard.took, offboard.created_ago
                ));
            }
        }
    }
    if let Some(unknown) = prior.iter().find(|p| !known_family(&p.family)) {
        return Err(format!(
            "prior calls of unknown API family '{}'; use machines, machineactions, offboard or cancel",
            unknown.family
        ));
    }
    Ok(())
}

/// One bulk offboard: its machine id, comment and age at the start.
pub(crate) struct BulkOffboard {
    pub machine_id: String,
    pub comment: String,
    pub created_ago: Duration,
}

/// The bulk offboards, oldest first, with machine ids drawn from `seed`
/// (apart from the inventory's).
pub(crate) fn bulk(history: &BulkHistory, seed: u64) -> Vec<BulkOffboard> {
    if history.offboards == 0 {
        return Vec::new();
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0b5e_55ed);
    let step = history.span / u32::try_from(history.offboards).unwrap_or(u32::MAX);
    (0..history.offboards)
        .map(|i| {
            let bytes: [u8; 20] = rng.random();
            let machine_id = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let comment = if history.marked {
                format!("{CORRELATION_MARKER}history-{i}] decommissioned")
            } else {
                "decommissioned".to_owned()
            };
            let left = u32::try_from(history.offboards - i).unwrap_or(u32::MAX);
            BulkOffboard {
                machine_id,
                comment,
                created_ago: step * left,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prior_calls_are_spread_up_to_the_start() {
        let prior = PriorCalls {
            family: "machineactions".into(),
            calls: 4,
            over: Duration::from_secs(40),
        };
        let epoch = Duration::from_secs(100);
        let times = prior.times(prior.over, epoch);
        assert_eq!(
            times,
            [70, 80, 90, 100].map(Duration::from_secs).to_vec(),
            "evenly, the last at the start"
        );
    }

    #[test]
    fn bulk_history_is_oldest_first_and_marked_when_asked() {
        let history = BulkHistory {
            offboards: 3,
            span: Duration::from_secs(30),
            marked: true,
        };
        let offboards = bulk(&history, 1);
        let ages: Vec<_> = offboards.iter().map(|o| o.created_ago.as_secs()).collect();
        assert_eq!(ages, [30, 20, 10]);
        assert_eq!(
            offboards[2].comment,
            "[defender-offboard:history-2] decommissioned"
        );
        assert_ne!(offboards[0].machine_id, offboards[1].machine_id);
        let unmarked = bulk(
            &BulkHistory {
                marked: false,
                ..history
            },
            1,
        );
        assert!(!unmarked[0].comment.contains(CORRELATION_MARKER));
    }

    #[test]
    fn histories_that_cannot_have_happened_are_refused() {
        let family = |f: &str| f == "machineactions";
        let ended = PastOffboard::succeeded("x", Duration::from_secs(3600));
        let machine = |offboard: PastOffboard| MachineHistory {
            machine_id: "ab".into(),
            last_seen_ago: Duration::ZERO,
            offboards: vec![offboard],
        };
        assert!(check(&[machine(ended.clone())], &[], family).is_ok());
        let pending = PastOffboard {
            status: Status::Pending,
            ..ended.clone()
        };
        assert!(
            check(&[machine(pending)], &[], family)
                .unwrap_err()
                .contains("ended")
        );
        let future = PastOffboard {
            took: Duration::from_secs(7200),
            ..ended
        };
        assert!(
            check(&[machine(future)], &[], family)
                .unwrap_err()
                .contains("took")
        );
        let prior = PriorCalls {
            family: "reads".into(),
            calls: 1,
            over: Duration::from_secs(1),
        };
        assert!(check(&[], &[prior], family).unwrap_err().contains("reads"));
    }
}
