//! A cancel asked for with the `defender.offboard.dev/cancel` annotation.
//!
//! The same recipe as the offboard: record the intent (`status.cancel.state:
//! Requesting`, with a resourceVersion precondition) before sending; after an
//! ambiguous answer, read the action before any second request, and send again
//! only when a read made `lookup_delay` after the send shows it still
//! `Pending` and not cancelled. MDE cancels only actions that are not final;
//! the operator cancels only `Pending` ones: once MDE has handed the offboard
//! to the device (`InProgress`), a cancel may not stop it, so it is reported
//! as too late instead of sent.

use super::errors::{Failure, failed};
use super::timing::{LookupTiming, lookup_timing};
use super::{Note, Plan, Settings, Transition, View};
use crate::crd::{CancelState, CancelStatus, Phase};
use crate::offboard::status::{Reason, last_error};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mde_client::{ActionStatus, MachineAction, MdeError};

/// What the annotation asks for now, or `None` to carry on as without it.
pub(super) fn plan_cancel(view: &View, reason: &str, settings: &Settings) -> Option<Plan> {
    let cancel = view.status.cancel.as_ref();
    match (&view.status.machine_action_id, cancel.map(|c| c.state)) {
        // Accepted, too late, or not ours: the poller carries the action to its end.
        (Some(_), Some(CancelState::Sent | CancelState::TooLate | CancelState::NotOwner)) => None,
        // Another request created the action: only it may cancel it (one
        // cancel per action, and never one for a request that did not ask).
        (Some(_), None) if view.status.adopted_from.is_some() => {
            Some(Plan::Write(Box::new(not_owner(view, reason))))
        }
        (Some(action_id), Some(CancelState::Requesting)) => {
            Some(match lookup_timing(view.cancel_clock, settings) {
                LookupTiming::Now { proves_absence } => Plan::ReadCancelled {
                    action_id: action_id.clone(),
                    proves_absence,
                },
                LookupTiming::Later(wait) => Plan::Idle {
                    requeue: Some(wait),
                },
            })
        }
        (Some(action_id), None) => match view.status.action_status.as_deref() {
            Some(word) if ActionStatus::from_word(word) == ActionStatus::Pending => {
                Some(Plan::Cancel {
                    action_id: action_id.clone(),
                    reason: reason.to_string(),
                })
            }
            Some(word) => Some(Plan::Write(Box::new(too_late(
                view,
                reason,
                format!("MDE reports it {word}"),
            )))),
            // Not read yet: the poller's first answer decides.
            None => None,
        },
        // Maybe sent: the lookup comes first (and nothing is sent after it).
        (None, _) if view.phase() == Phase::Submitting => None,
        (None, _) => Some(Plan::Write(Box::new(cancelled_before_send(view, reason)))),
    }
}

/// Asked to cancel before anything was sent: nothing will be.
pub fn cancelled_before_send(view: &View, reason: &str) -> Transition {
    failed(
        view,
        Failure::new(
            Reason::Cancelled,
            format!("cancelled before any offboard request was sent: {reason}"),
        ),
    )
}

/// The intent record before a cancel is sent; `attempts` grows, so the write
/// always moves the resourceVersion and fences every other writer.
pub fn cancel_intent(view: &View, reason: &str) -> crate::crd::DeviceOffboardStatus {
    let mut status = view.status.clone();
    let attempts = status.cancel.as_ref().map_or(0, |c| c.attempts);
    status.cancel = Some(CancelStatus {
        reason: reason.to_string(),
        state: CancelState::Requesting,
        requested_at: Some(Time(view.now)),
        attempts: attempts.saturating_add(1),
    });
    status
}

/// After the cancel request (`view.status` holds the intent).
pub fn after_cancel(
    view: &View,
    result: Result<MachineAction, MdeError>,
    settings: &Settings,
) -> Transition {
    match result {
        Ok(action) => cancelled(view, &action),
        // MDE refused: the action is final (or gone) already.
        Err(error @ (MdeError::BadRequest { .. } | MdeError::NotFound { .. })) => {
            too_late(view, &reason_of(view), format!("MDE refused: {error}"))
        }
        Err(error) => {
            let wait = if error.may_have_created() {
                settings.lookup_delay
            } else {
                view.retry_wait(settings)
            };
            still_requesting(view, &error, wait)
        }
    }
}

/// What the read of the action after an unconfirmed cancel means.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum AfterCancelRead {
    /// Write this (cancelled, too late, or still waiting).
    Write(Transition),
    /// The action is still `Pending` and not cancelled, read late enough to
    /// prove the first request did nothing: send the cancel again.
    Resend,
}

pub fn after_cancel_read(
    view: &View,
    result: Result<MachineAction, MdeError>,
    proves_absence: bool,
    settings: &Settings,
) -> AfterCancelRead {
    let action = match result {
        Ok(action) => action,
        Err(error) => {
            return AfterCancelRead::Write(still_requesting(
                view,
                &error,
                view.retry_wait(settings),
            ));
        }
    };
    match &action.status {
        ActionStatus::Cancelled => AfterCancelRead::Write(cancelled(view, &action)),
        ActionStatus::Pending if proves_absence => AfterCancelRead::Resend,
        ActionStatus::Pending => AfterCancelRead::Write(Transition {
            status: view.status.clone(),
            note: None,
            requeue: Some(settings.lookup_delay),
        }),
        // A word MDE may add later (or a null): not a proof that the
        // action can no longer be cancelled, nor that the cancel did
        // nothing. Read again later.
        ActionStatus::Other(_) => AfterCancelRead::Write(Transition {
            status: view.status.clone(),
            note: None,
            requeue: Some(settings.lookup_delay),
        }),
        other => AfterCancelRead::Write(too_late(
            view,
            &reason_of(view),
            format!("MDE reports it {other}"),
        )),
    }
}

fn reason_of(view: &View) -> String {
    view.status
        .cancel
        .as_ref()
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// MDE holds the action cancelled: the resource ends `Failed`/`Cancelled`.
fn cancelled(view: &View, action: &MachineAction) -> Transition {
    let mut transition = super::after::apply_action_status(view, action);
    let status = &mut transition.status;
    let reason = reason_of(view);
    if let Some(cancel) = status.cancel.as_mut() {
        cancel.state = CancelState::Sent;
    }
    status.next_retry_at = None;
    if action.status == ActionStatus::Cancelled {
        transition.note = Some(Note {
            reason: Reason::Cancelled,
            message: format!("cancelled offboard action {} at MDE: {reason}", action.id),
        });
    }
    transition.requeue = None;
    transition
}

/// The action belongs to another request: nothing is sent; say whose it is
/// and what to do, once; the resource goes on following the action.
fn not_owner(view: &View, reason: &str) -> Transition {
    let mut status = view.status.clone();
    status.cancel = Some(CancelStatus {
        reason: reason.to_string(),
        state: CancelState::NotOwner,
        requested_at: None,
        attempts: 0,
    });
    let action = view.status.machine_action_id.as_deref().unwrap_or("?");
    let owner = match view.status.adopted_from.as_deref() {
        Some("") | None => {
            "a request outside this operator (cancel it in the Defender portal)".to_string()
        }
        Some(key) => format!(
            "request {key} (annotate that DeviceOffboard, or cancel it in the Defender portal)"
        ),
    };
    Transition {
        status,
        note: Some(Note {
            reason: Reason::CancelNotOwner,
            message: format!(
                "not cancelling offboard action {action}: it was created by {owner}, and only the request that created an action cancels it; this resource follows the action to its end"
            ),
        }),
        requeue: None,
    }
}

/// Too late to cancel: say so once, leave the annotation, carry on.
fn too_late(view: &View, reason: &str, why: String) -> Transition {
    let mut status = view.status.clone();
    let attempts = status.cancel.as_ref().map_or(0, |c| c.attempts);
    let requested_at = status.cancel.as_ref().and_then(|c| c.requested_at.clone());
    status.cancel = Some(CancelStatus {
        reason: reason.to_string(),
        state: CancelState::TooLate,
        requested_at,
        attempts,
    });
    let action = view.status.machine_action_id.as_deref().unwrap_or("?");
    Transition {
        status,
        note: Some(Note {
            reason: Reason::CancelTooLate,
            message: format!(
                "cannot cancel offboard action {action}: {why}; the operator cancels only Pending actions, so the offboard goes on (the annotation is left as it is)"
            ),
        }),
        requeue: None,
    }
}

/// The cancel's outcome is not known yet: keep the intent, look again later.
fn still_requesting(view: &View, error: &MdeError, wait: std::time::Duration) -> Transition {
    let mut status = view.status.clone();
    status.last_error = last_error(
        error.code(),
        format!(
            "cancelling the offboard action failed ({error}); reading the action before any second request"
        ),
    );
    Transition {
        status,
        note: None,
        requeue: Some(wait),
    }
}

/// After a lookup that proved the first send created nothing: a cancel asked
/// for meanwhile ends the resource cancelled, with nothing sent (`None`:
/// send again).
pub fn cancel_instead_of_resend(view: &View) -> Option<Transition> {
    view.cancel
        .map(|reason| cancelled_before_send(view, reason))
}
