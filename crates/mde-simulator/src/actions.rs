//! Machine actions and their progression. Status is computed from the action's age
//! whenever it is read (Pending → InProgress → final), so no timers run per action.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

/// Properties `GET /api/machineactions` accepts in `$filter`.
pub const FILTERABLE: &[&str] = &[
    "id",
    "status",
    "machineId",
    "type",
    "requestor",
    "creationDateTimeUtc",
];

/// Properties `--fault-nulls` leaves alone: identity, state and what the requestor
/// wrote.
const KEPT_UNDER_NULLS: &[&str] = &[
    "id",
    "type",
    "status",
    "machineId",
    "computerDnsName",
    "requestorComment",
    "creationDateTimeUtc",
];

/// `--fault-nulls`: every optional property of a machine action's JSON becomes
/// `null` (`lastUpdateDateTimeUtc`, `requestor`, `cancellationComment`, `commands`,
/// `relatedFileInfo`, ...).
pub fn null_optional_fields(action: &mut Value) {
    null_all_but(action, KEPT_UNDER_NULLS);
}

/// Sets every property but `kept` (and OData annotations) to `null`.
pub(crate) fn null_all_but(entity: &mut Value, kept: &[&str]) {
    if let Value::Object(map) = entity {
        for (name, value) in map.iter_mut() {
            if !kept.contains(&name.as_str()) && !name.starts_with('@') {
                *value = Value::Null;
            }
        }
    }
}

/// Status of a machine action as MDE names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    TimeOut,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Pending | Status::InProgress)
    }
}

/// How an action ends when nobody cancels it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    #[default]
    Succeeded,
    Failed,
    TimeOut,
}

impl From<Outcome> for Status {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Succeeded => Status::Succeeded,
            Outcome::Failed => Status::Failed,
            Outcome::TimeOut => Status::TimeOut,
        }
    }
}

/// How long an action stays in each non-final status (wall-clock time).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub pending_for: Duration,
    pub in_progress_for: Duration,
}

/// Status after `age`, and the age at which it last changed.
pub fn progress(
    age: Duration,
    schedule: Schedule,
    outcome: Outcome,
    cancelled_at: Option<Duration>,
) -> (Status, Duration) {
    if let Some(at) = cancelled_at
        && age >= at
    {
        return (Status::Cancelled, at);
    }
    let in_progress_at = schedule.pending_for;
    let final_at = schedule.pending_for + schedule.in_progress_for;
    if age < in_progress_at {
        (Status::Pending, Duration::ZERO)
    } else if age < final_at {
        (Status::InProgress, in_progress_at)
    } else {
        (outcome.into(), final_at)
    }
}

#[derive(Clone, Debug)]
pub struct Cancellation {
    pub requestor: String,
    pub comment: String,
    /// Age of the action when it was cancelled.
    pub at: Duration,
}

/// A stored machine action.
#[derive(Clone, Debug)]
pub struct Action {
    pub id: uuid::Uuid,
    pub kind: &'static str,
    pub machine_id: String,
    pub computer_dns_name: String,
    pub requestor: String,
    pub comment: String,
    /// Wall-clock offset from simulator start.
    pub created: Duration,
    pub created_utc: jiff::Timestamp,
    pub outcome: Outcome,
    pub cancellation: Option<Cancellation>,
    /// An action from before the simulator started: final from the start.
    pub ended: Option<Ended>,
}

/// How and when an action of the past ended.
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    pub status: Status,
    /// From its creation to its last update.
    pub took: Duration,
}

impl Action {
    pub fn age(&self, now: Duration) -> Duration {
        now.saturating_sub(self.created)
    }

    /// Whether list answers show it yet: an action stays out of them for
    /// `lag` after its creation; one of the past has long been listed.
    pub fn listed(&self, now: Duration, lag: Duration) -> bool {
        self.ended.is_some() || self.age(now) >= lag
    }

    pub fn status(&self, now: Duration, schedule: Schedule) -> Status {
        self.progress(now, schedule).0
    }

    /// Its status at `now` and the age at which it last changed.
    fn progress(&self, now: Duration, schedule: Schedule) -> (Status, Duration) {
        match self.ended {
            Some(ended) => (ended.status, ended.took),
            None => progress(
                self.age(now),
                schedule,
                self.outcome,
                self.cancellation.as_ref().map(|c| c.at),
            ),
        }
    }

    /// When it last changed (`lastUpdateDateTimeUtc`).
    pub fn last_update(&self, now: Duration, schedule: Schedule) -> jiff::Timestamp {
        let changed = self.progress(now, schedule).1;
        self.created_utc + jiff::SignedDuration::try_from(changed).unwrap_or_default()
    }

    /// The MachineAction JSON MDE returns.
    pub fn to_json(&self, now: Duration, schedule: Schedule) -> Value {
        let (status, changed) = self.progress(now, schedule);
        let utc_at = |age: Duration| {
            let at = self.created_utc
                + jiff::SignedDuration::try_from(age).unwrap_or(jiff::SignedDuration::ZERO);
            format!("{at:.7}")
        };
        let cancellation = self.cancellation.as_ref();
        json!({
            "id": self.id.to_string(),
            "type": self.kind,
            "title": format!("{} {}", self.kind, self.computer_dns_name),
            "requestor": self.requestor,
            "requestorComment": self.comment,
            "status": status,
            "machineId": self.machine_id,
            "computerDnsName": self.computer_dns_name,
            "creationDateTimeUtc": utc_at(Duration::ZERO),
            "lastUpdateDateTimeUtc": utc_at(changed),
            "cancellationRequestor": cancellation.map(|c| c.requestor.clone()),
            "cancellationComment": cancellation.map(|c| c.comment.clone()),
            "cancellationDateTimeUtc": cancellation.map(|c| utc_at(c.at)),
            "scope": null,
            "externalID": null,
            "requestSource": "PublicApi",
            "commands": [],
            "relatedFileInfo": null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: Schedule = Schedule {
        pending_for: Duration::from_secs(2),
        in_progress_for: Duration::from_secs(3),
    };

    #[test]
    fn progresses_through_the_schedule() {
        let s = |secs| progress(Duration::from_secs(secs), SCHEDULE, Outcome::TimeOut, None).0;
        assert_eq!(s(0), Status::Pending);
        assert_eq!(s(2), Status::InProgress);
        assert_eq!(s(4), Status::InProgress);
        assert_eq!(s(5), Status::TimeOut);
        assert!(s(5).is_final() && !s(4).is_final());
    }

    #[test]
    fn cancellation_is_final_from_its_moment() {
        let at = Some(Duration::from_secs(1));
        let p = |secs| progress(Duration::from_secs(secs), SCHEDULE, Outcome::Succeeded, at);
        assert_eq!(p(0).0, Status::Pending);
        assert_eq!(p(1), (Status::Cancelled, Duration::from_secs(1)));
        assert_eq!(p(9).0, Status::Cancelled);
    }
}
