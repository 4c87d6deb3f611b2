//! How a failed MDE call shows in status: final (a person must change the
//! resource), or a retry with a reason, advice and a time to look again.

use super::{Conditions, Note, Settings, Submitted, Transition, View, at, to_std};
use crate::crd::Phase;
use crate::offboard::status::{ConditionUpdate, Reason, STALLED, last_error};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mde_client::{ErrorClass, MdeError};
use std::time::Duration;

/// A final failure: the `Ready` reason, the Event's reason, the code for
/// `lastError` and the message that names the fix.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub ready: Reason,
    pub event: Reason,
    pub code: String,
    pub message: String,
}

impl Failure {
    /// A failure whose reason, Event reason and code are all `reason`.
    pub fn new(reason: Reason, message: String) -> Self {
        Failure {
            ready: reason,
            event: reason,
            code: reason.as_str().to_string(),
            message,
        }
    }

    fn from_error(reason: Reason, error: &MdeError, message: String) -> Self {
        Failure {
            code: error.code().to_string(),
            ..Failure::new(reason, message)
        }
    }
}

/// A retry: stay in `phase`, say why, and look again after `wait`.
pub(crate) struct Retry<'a> {
    pub phase: Phase,
    pub reason: Reason,
    pub code: &'a str,
    pub message: String,
    pub wait: Duration,
}

/// Map a failed call to a transition, keeping `phase` unless the error is final.
pub fn on_error(view: &View, error: &MdeError, phase: Phase, settings: &Settings) -> Transition {
    // MDE's messages often end in a period; the advice follows after a "; ".
    let message = error
        .to_string()
        .trim_end()
        .trim_end_matches('.')
        .to_string();
    if matches!(error, MdeError::NotFound { .. }) && !view.not_found_confirmed(settings) {
        return unconfirmed_not_found(view, error, phase, &message, settings);
    }
    if let Some(failure) = final_failure(view, error, &message) {
        return failed(view, failure);
    }
    if let MdeError::Throttled { retry_at, family } = error {
        // A floor, so a Retry-After of 0 or in the past cannot spin.
        let wait = to_std(retry_at.duration_since(view.now)).max(Duration::from_secs(1));
        let message =
            format!("MDE is throttling {family} calls for this tenant; retrying at {retry_at}");
        let mut transition = retrying(
            view,
            Retry {
                phase,
                reason: Reason::Throttled,
                code: error.code(),
                message,
                wait,
            },
        );
        transition.status.next_retry_at = Some(Time(*retry_at));
        return transition;
    }
    let (reason, wait) = match error.class() {
        ErrorClass::Access if matches!(error, MdeError::Forbidden { .. }) => {
            (Reason::PermissionDenied, settings.access_backoff)
        }
        ErrorClass::Access => (Reason::AuthenticationFailed, settings.access_backoff),
        _ if matches!(error, MdeError::OutcomeUnknown { .. }) => {
            (Reason::OutcomeUnknown, settings.lookup_delay)
        }
        ErrorClass::Throttled => (Reason::WaitingForBudget, view.retry_wait(settings)),
        _ => (Reason::MdeError, view.retry_wait(settings)),
    };
    let message = with_advice(reason, error, message);
    retrying(
        view,
        Retry {
            phase,
            reason,
            code: error.code(),
            message,
            wait,
        },
    )
}

/// A first 404: MDE answers one now and then for a machine that exists
/// (and a gateway or a wrong path answers 404 too), so it is confirmed by a
/// second one `lookup_delay` later before the resource fails.
fn unconfirmed_not_found(
    view: &View,
    error: &MdeError,
    phase: Phase,
    message: &str,
    settings: &Settings,
) -> Transition {
    let wait = settings.lookup_delay.max(settings.retry_backoff);
    let machine = view.machine_id().unwrap_or_default();
    retrying(
        view,
        Retry {
            phase,
            reason: Reason::DeviceNotFound,
            code: error.code(),
            message: format!(
                "MDE has no machine {machine} ({message}); MDE answers 404 now and then for machines that exist, so the machine is read again in {}s before the resource fails",
                wait.as_secs()
            ),
            wait,
        },
    )
}

/// The errors after which retrying cannot help: the device or request is wrong.
fn final_failure(view: &View, error: &MdeError, message: &str) -> Option<Failure> {
    let failure = match error {
        MdeError::NotFound { .. } => {
            let machine = view.machine_id().unwrap_or_default();
            Failure::from_error(
                Reason::DeviceNotFound,
                error,
                format!(
                    "MDE has no machine {machine} ({message}); check spec.machineId or spec.deviceName"
                ),
            )
        }
        MdeError::PlatformNotSupported { .. } => Failure::from_error(
            Reason::PlatformNotSupported,
            error,
            format!(
                "{message}; MDE's offboard API lists Windows 11, Windows 10 1703+, Windows Server 2019+ (2012 R2 and 2016 with the unified agent), macOS 14+ and the Linux distributions Defender supports — this tenant refused this device: offboard it with its local offboarding script"
            ),
        ),
        MdeError::BadRequest { .. } => Failure {
            event: Reason::Failed,
            ..Failure::from_error(Reason::MdeError, error, message.to_string())
        },
        _ => return None,
    };
    Some(failure)
}

/// The message with what a person can do about it.
fn with_advice(reason: Reason, error: &MdeError, message: String) -> String {
    match reason {
        Reason::PermissionDenied => format!(
            "{message}; grant the MDE app the Machine.Offboard and Machine.Read.All application permissions with admin consent"
        ),
        // Sign-in errors carry their own advice; a 401 on a fresh token usually
        // means the token is for another cloud than the API host.
        Reason::AuthenticationFailed if matches!(error, MdeError::Unauthorized { .. }) => format!(
            "{message}; check that --cloud (or --api-url) matches the tenant's cloud and that the app registration has admin consent"
        ),
        Reason::OutcomeUnknown => format!("{message}; looking the action up before any resend"),
        _ => message,
    }
}

/// A lookup that precedes any resend failed: stay `Submitting` whatever the
/// error — the action may exist, so neither a resend nor `Failed` is allowed.
pub fn lookup_failed(view: &View, error: &MdeError, settings: &Settings) -> Transition {
    list_failed(view, error, Phase::Submitting, settings)
}

/// A list of the machine's actions failed: keep `phase` whatever the error. A
/// 404 or a 400 from a list proves nothing about the device (a wrong host or
/// path answers so too), so it is retried, never final.
pub fn list_failed(view: &View, error: &MdeError, phase: Phase, settings: &Settings) -> Transition {
    match error.class() {
        ErrorClass::Permanent | ErrorClass::AlreadyPending => retrying(
            view,
            Retry {
                phase,
                reason: Reason::MdeError,
                code: error.code(),
                message: format!(
                    "looking the offboard action up failed ({error}); retrying the lookup before any resend"
                ),
                wait: view.retry_wait(settings),
            },
        ),
        _ => on_error(view, error, phase, settings),
    }
}

/// A final failure: nothing was sent, and nothing will be.
pub(crate) fn failed(view: &View, failure: Failure) -> Transition {
    let Failure {
        ready,
        event,
        code,
        message,
    } = failure;
    let mut status = view.with(
        Phase::Failed,
        Conditions {
            ready: (ready, message.clone()),
            submitted: Submitted::no(Reason::NotSubmitted, "no offboard request was sent"),
        },
    );
    status.last_error = last_error(&code, message.clone());
    status.completed_at = Some(Time(view.now));
    status.next_retry_at = None;
    view.set(
        &mut status,
        ConditionUpdate {
            type_: STALLED,
            holds: true,
            reason: ready,
            message: message.clone(),
        },
    );
    Transition {
        status,
        note: Some(Note {
            reason: event,
            message,
        }),
        requeue: None,
    }
}

pub(crate) fn retrying(view: &View, retry: Retry) -> Transition {
    let submitted = match retry.phase {
        Phase::Submitting => Submitted::no(
            Reason::Submitting,
            "offboard request sent; outcome being confirmed",
        ),
        _ => Submitted::no(Reason::NotSubmitted, "not sent yet"),
    };
    let mut status = view.with(
        retry.phase,
        Conditions {
            ready: (retry.reason, retry.message.clone()),
            submitted,
        },
    );
    status.last_error = last_error(retry.code, retry.message.clone());
    status.next_retry_at = Some(at(view.now, retry.wait));
    Transition {
        status,
        note: Some(Note {
            reason: retry.reason,
            message: retry.message,
        }),
        requeue: Some(retry.wait),
    }
}
