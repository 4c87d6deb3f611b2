//! Status vocabulary (contract names) and the condition merge.

use crate::crd::{DeviceOffboardStatus, LastError};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const SUBMITTED: &str = "Submitted";
pub const READY: &str = "Ready";
/// Set `True` on terminal failure so kstatus (Flux) reports Failed at once
/// instead of waiting for its timeout.
pub const STALLED: &str = "Stalled";
/// `True` while the resource is not final: kstatus (Flux, `kpt`, `kubectl
/// wait` users of cli-utils) takes a custom resource without it as Current.
pub const RECONCILING: &str = "Reconciling";

/// The one vocabulary of outcomes: a condition's reason is the variant's name,
/// and [`Reason::event_reason`] and [`Reason::metric_label`] derive the Event
/// reason and the metric label from it, so the three never drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
pub enum Reason {
    Pending,
    WaitingForBudget,
    Throttled,
    Submitting,
    InProgress,
    Succeeded,
    Failed,
    DeviceNotFound,
    DeviceAmbiguous,
    /// A record was chosen for `deviceName` among several (the Event says why).
    DeviceResolved,
    /// The device carries a protected machine tag or matches a protected
    /// name pattern (`--protected-tag`, `--protected-name`, or the
    /// connection's own rules): nothing was sent.
    DeviceProtected,
    /// A deleted Node's device cannot be told by its cloud identity, and
    /// `--node-identity required` allows no other way: nothing was sent.
    NodeIdentityUnverified,
    /// A deleted Node's offboard waits `--node-offboard-grace`.
    WaitingForNodeGrace,
    /// The deleted Node (or one with its identity) is back: nothing was sent.
    NodeReturned,
    /// The blast-radius breaker holds this new send: its tenant had
    /// `--max-offboards-per-hour` new sends in the last hour.
    BreakerOpen,
    /// `--require-approval`: nothing is sent until someone other than the
    /// creator approves (`defender.offboard.dev/approved-by`).
    AwaitingApproval,
    /// The resource's connection now reaches another tenant, app or API host
    /// than the one it was begun with: it stopped there.
    ConnectionChanged,
    /// MDE holds another pending action (not an offboard) for the machine.
    OtherActionPending,
    PlatformNotSupported,
    AuthenticationFailed,
    PermissionDenied,
    OutcomeUnknown,
    MdeError,
    NotSubmitted,
    Requested,
    Adopted,
    /// The spec is not one the schema allows (both or neither target set).
    InvalidSpec,
    /// MDE answered with another action than the one this resource records.
    ConflictingAction,
    /// MDE says the action this resource records does not exist.
    ActionNotFound,
    /// The offboard was cancelled (annotation, or in the Defender portal).
    Cancelled,
    /// A cancel was asked for after the action left `Pending`: nothing sent.
    CancelTooLate,
    /// A cancel was asked for an action another request created: nothing sent.
    CancelNotOwner,
    /// The adopted action was cancelled by the request that created it: this
    /// resource sends its own offboard.
    AdoptedActionCancelled,
    /// `spec.ttlSecondsAfterFinished` passed: the finished resource is deleted.
    Expired,
    /// `spec.connectionRef` names no `DefenderConnection` of the resource's namespace.
    ConnectionNotFound,
    /// The referenced `DefenderConnection` cannot sign in (yet).
    ConnectionNotReady,
    /// `spec.connectionRef` is set but the operator runs without `--connections`.
    ConnectionsDisabled,
    /// No `spec.connectionRef`, and the operator has no credentials of its own.
    NoDefaultConnection,
    /// No `spec.connectionRef`, and the operator's own credentials do not
    /// serve the resource's namespace (`--default-connection-namespaces`).
    DefaultConnectionNotAllowed,
}

impl Reason {
    /// The condition reason (the variant's name).
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The Kubernetes Event reason: stable, searchable, documented in
    /// docs/operations.md. Outcomes of the action itself read `Offboard…`.
    pub fn event_reason(self) -> &'static str {
        match self {
            Reason::Requested => "OffboardRequested",
            Reason::Adopted => "OffboardAdopted",
            Reason::Succeeded => "OffboardSucceeded",
            Reason::Failed => "OffboardFailed",
            Reason::Cancelled => "OffboardCancelled",
            other => other.as_str(),
        }
    }

    /// The `outcome` label of `defender_offboard_offboards_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Reason::Requested => "submitted",
            Reason::Adopted => "adopted",
            other => other.as_str(),
        }
    }

    /// Whether its Event is a Warning (a person may have to act).
    pub fn is_warning(self) -> bool {
        !matches!(
            self,
            Reason::Requested
                | Reason::Adopted
                | Reason::Succeeded
                | Reason::InProgress
                | Reason::Expired
        )
    }
}

/// One condition to set: its type, whether it holds, why, and what to tell a person.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionUpdate<'a> {
    pub type_: &'a str,
    pub holds: bool,
    pub reason: Reason,
    pub message: String,
}

/// When a status is written: the generation it reflects and the time now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    pub now: Timestamp,
}

/// Set a condition; `lastTransitionTime` moves only when its status flips, so
/// an unchanged condition never causes a write.
pub fn set_condition(status: &mut DeviceOffboardStatus, update: ConditionUpdate, at: Observed) {
    let value = if update.holds { "True" } else { "False" };
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == update.type_)
    {
        Some(existing) => {
            if existing.status != value {
                existing.last_transition_time = Time(at.now);
                existing.status = value.to_string();
            }
            existing.reason = update.reason.as_str().to_string();
            existing.message = update.message;
            existing.observed_generation = at.generation;
        }
        None => status.conditions.push(Condition {
            type_: update.type_.to_string(),
            status: value.to_string(),
            reason: update.reason.as_str().to_string(),
            message: update.message,
            observed_generation: at.generation,
            last_transition_time: Time(at.now),
        }),
    }
}

pub fn condition<'a>(status: &'a DeviceOffboardStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

pub fn last_error(code: &str, message: impl Into<String>) -> Option<LastError> {
    Some(LastError {
        code: code.to_string(),
        message: message.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    fn ready(holds: bool, reason: Reason, message: &str) -> ConditionUpdate<'static> {
        ConditionUpdate {
            type_: READY,
            holds,
            reason,
            message: message.into(),
        }
    }

    #[test]
    fn transition_time_moves_only_on_flip() {
        let at = |now: &str| Observed {
            generation: Some(1),
            now: now.parse().unwrap(),
        };
        let t0 = at("2026-01-01T00:00:00Z");
        let t1 = at("2026-01-01T00:05:00Z");
        let mut status = DeviceOffboardStatus::default();
        set_condition(&mut status, ready(false, Reason::Pending, "waiting"), t0);
        let before = status.clone();
        set_condition(&mut status, ready(false, Reason::Pending, "waiting"), t1);
        assert_eq!(
            status, before,
            "re-setting an unchanged condition changes nothing"
        );
        set_condition(&mut status, ready(false, Reason::InProgress, "running"), t1);
        assert_eq!(
            condition(&status, READY).unwrap().last_transition_time,
            Time(t0.now)
        );
        set_condition(&mut status, ready(true, Reason::Succeeded, "done"), t1);
        assert_eq!(
            condition(&status, READY).unwrap().last_transition_time,
            Time(t1.now)
        );
    }

    /// Condition and Event reasons are documented names that alerts and
    /// runbooks search for.
    #[test]
    fn every_reason_is_documented() {
        let docs = include_str!("../../../../docs/operations.md");
        for reason in Reason::iter() {
            for name in [reason.as_str(), reason.event_reason()] {
                assert!(
                    docs.contains(&format!("`{name}`")),
                    "docs/operations.md does not document the reason {name}"
                );
            }
        }
    }
}
