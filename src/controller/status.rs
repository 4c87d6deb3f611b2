//! Status vocabulary (contract names) and the condition merge.

use crate::crd::{DeviceOffboardStatus, LastError};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const SUBMITTED: &str = "Submitted";
pub const READY: &str = "Ready";
/// Set `True` on terminal failure so kstatus (Flux) reports Failed at once
/// instead of waiting for its timeout.
pub const STALLED: &str = "Stalled";

/// Reasons on the `Ready` and `Submitted` conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    PlatformNotSupported,
    AuthenticationFailed,
    PermissionDenied,
    OutcomeUnknown,
    MdeError,
    NotSubmitted,
    Requested,
    Adopted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pending => "Pending",
            Reason::WaitingForBudget => "WaitingForBudget",
            Reason::Throttled => "Throttled",
            Reason::Submitting => "Submitting",
            Reason::InProgress => "InProgress",
            Reason::Succeeded => "Succeeded",
            Reason::Failed => "Failed",
            Reason::DeviceNotFound => "DeviceNotFound",
            Reason::DeviceAmbiguous => "DeviceAmbiguous",
            Reason::PlatformNotSupported => "PlatformNotSupported",
            Reason::AuthenticationFailed => "AuthenticationFailed",
            Reason::PermissionDenied => "PermissionDenied",
            Reason::OutcomeUnknown => "OutcomeUnknown",
            Reason::MdeError => "MdeError",
            Reason::NotSubmitted => "NotSubmitted",
            Reason::Requested => "Requested",
            Reason::Adopted => "Adopted",
        }
    }
}

/// Kubernetes Event reasons: stable, searchable, documented in docs/operations.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    OffboardRequested,
    OffboardAdopted,
    Throttled,
    OffboardSucceeded,
    OffboardFailed,
    DeviceNotFound,
    DeviceAmbiguous,
    PlatformNotSupported,
    AuthenticationFailed,
    PermissionDenied,
    OutcomeUnknown,
    MdeError,
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::OffboardRequested => "OffboardRequested",
            EventReason::OffboardAdopted => "OffboardAdopted",
            EventReason::Throttled => "Throttled",
            EventReason::OffboardSucceeded => "OffboardSucceeded",
            EventReason::OffboardFailed => "OffboardFailed",
            EventReason::DeviceNotFound => "DeviceNotFound",
            EventReason::DeviceAmbiguous => "DeviceAmbiguous",
            EventReason::PlatformNotSupported => "PlatformNotSupported",
            EventReason::AuthenticationFailed => "AuthenticationFailed",
            EventReason::PermissionDenied => "PermissionDenied",
            EventReason::OutcomeUnknown => "OutcomeUnknown",
            EventReason::MdeError => "MdeError",
        }
    }

    pub fn is_warning(self) -> bool {
        !matches!(
            self,
            EventReason::OffboardRequested
                | EventReason::OffboardAdopted
                | EventReason::OffboardSucceeded
        )
    }
}

/// Set a condition; `lastTransitionTime` moves only when its status flips, so
/// an unchanged condition never causes a write.
pub fn set_condition(
    status: &mut DeviceOffboardStatus,
    type_: &str,
    value: bool,
    reason: Reason,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let value = if value { "True" } else { "False" };
    let message = message.into();
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != value {
                existing.last_transition_time = Time(now);
                existing.status = value.to_string();
            }
            existing.reason = reason.as_str().to_string();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.to_string(),
            status: value.to_string(),
            reason: reason.as_str().to_string(),
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
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

    #[test]
    fn transition_time_moves_only_on_flip() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let mut status = DeviceOffboardStatus::default();
        set_condition(
            &mut status,
            READY,
            false,
            Reason::Pending,
            "waiting",
            Some(1),
            t0,
        );
        let before = status.clone();
        set_condition(
            &mut status,
            READY,
            false,
            Reason::Pending,
            "waiting",
            Some(1),
            t1,
        );
        assert_eq!(
            status, before,
            "re-setting an unchanged condition changes nothing"
        );
        set_condition(
            &mut status,
            READY,
            false,
            Reason::InProgress,
            "running",
            Some(1),
            t1,
        );
        assert_eq!(
            condition(&status, READY).unwrap().last_transition_time,
            Time(t0)
        );
        set_condition(
            &mut status,
            READY,
            true,
            Reason::Succeeded,
            "done",
            Some(1),
            t1,
        );
        assert_eq!(
            condition(&status, READY).unwrap().last_transition_time,
            Time(t1)
        );
    }
}
