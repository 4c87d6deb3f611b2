//! The transition after each call the reconcile makes: resolve, the intent
//! record, send, lookup and poll.

use super::errors::{Failure, failed, on_error};
use super::resolve::{Resolved, resolve};
use super::{Conditions, Note, Resolution, Settings, Submitted, Transition, View};
use crate::crd::{DeviceOffboardStatus, Phase};
use crate::offboard::status::{ConditionUpdate, Reason, STALLED, SUBMITTED, condition, last_error};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mde_client::{ActionStatus, Machine, MachineAction, MdeError};
use std::time::Duration;

/// After listing the records of `deviceName`: the record to offboard (see
/// [`super::resolve`]), or a transition to write.
// The transition lives for one reconcile; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
pub fn after_resolve(
    view: &View,
    device_name: &str,
    result: Result<Vec<Machine>, MdeError>,
    settings: &Settings,
) -> Result<Resolution, Transition> {
    let machines = match result {
        Ok(machines) => machines,
        Err(error) => return Err(on_error(view, &error, Phase::Pending, settings)),
    };
    let resolved = resolve(
        device_name,
        &machines,
        view.spec.node.as_ref(),
        settings.node_identity,
        view.now,
    );
    let failure = match resolved {
        Resolved::Chosen { machine_id, why } => {
            let resolution = Resolution { machine_id, why };
            // A protected record is never sent for, however it was chosen.
            return match super::protection::protected_choice(view, &machines, &resolution, settings)
            {
                Some(stop) => Err(stop),
                None => Ok(resolution),
            };
        }
        Resolved::NotFound { message } => Failure::new(Reason::DeviceNotFound, message),
        Resolved::Ambiguous { message } => Failure::new(Reason::DeviceAmbiguous, message),
        Resolved::IdentityUnverified { message } => {
            Failure::new(Reason::NodeIdentityUnverified, message)
        }
    };
    Err(failed(view, failure))
}

/// The record chosen for `deviceName`, written before anything is sent for
/// it: `machineId` and `resolution` set, everything else as it was.
pub fn resolved(view: &View, resolution: &Resolution) -> Transition {
    let mut status = view.status.clone();
    status.machine_id = Some(resolution.machine_id.clone());
    status.resolution = Some(resolution.why.clone());
    status.observed_generation = view.generation;
    status.tenant = view.recorded_tenant();
    Transition {
        status,
        note: Some(Note {
            reason: Reason::DeviceResolved,
            message: resolution.why.clone(),
        }),
        requeue: None,
    }
}

/// Whether MDE's "an action is already pending" was about another action
/// type (isolation, live response, a scan): none of the machine's offboard
/// actions (`actions`, complete) is pending, and none finished within
/// `lookup_delay` (one that did may be the pending one, gone final between
/// the two calls: that case is confirmed by marker instead).
pub fn pending_is_another_type(
    actions: &[MachineAction],
    now: jiff::Timestamp,
    settings: &Settings,
) -> bool {
    let recent = jiff::SignedDuration::try_from(settings.lookup_delay)
        .ok()
        .and_then(|d| now.checked_sub(d).ok())
        .unwrap_or(jiff::Timestamp::MIN);
    actions.iter().all(|action| {
        let updated = action
            .last_update_date_time_utc
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        action.status.is_final() && updated.is_some_and(|at| at < recent)
    })
}

/// MDE refused the offboard because another action type is pending for
/// the machine: nothing was created, so stay `Pending` and send again after
/// a wait that grows while the refusal lasts, never sooner than
/// `access_backoff` (such actions last minutes to hours).
pub fn other_action_pending(view: &View, machine_id: &str, settings: &Settings) -> Transition {
    let wait = view.retry_wait(settings).max(settings.access_backoff);
    let message = format!(
        "MDE refused the offboard: another action (not an offboard: an isolation, a live response or a scan) is pending for machine {machine_id}; sending again in {}s — cancel that action in the Defender portal to offboard sooner",
        wait.as_secs()
    );
    super::errors::retrying(
        view,
        super::errors::Retry {
            // Still `Submitting`: the answer may have been about this
            // resource's own offboard, hidden by a lagging list, so the
            // next send waits for a lookup that proves absence.
            phase: Phase::Submitting,
            reason: Reason::OtherActionPending,
            code: Reason::OtherActionPending.as_str(),
            message,
            wait,
        },
    )
}

/// A budget wait longer than this is written as `nextRetryAt`; a shorter
/// one is not worth a status write each time it is waited again.
pub const SHOW_RETRY_AT_BEYOND: Duration = Duration::from_secs(3);

/// While the offboard budget is spent: stay `Pending`, say why, look again then.
/// `nextRetryAt` is left alone so waiting costs no status writes per retry.
pub fn waiting_for_budget(view: &View, wait: Duration, machine_id: &str) -> Transition {
    let mut status = view.with(
        Phase::Pending,
        Conditions {
            ready: (
                Reason::WaitingForBudget,
                "waiting for the operator's offboard rate budget".into(),
            ),
            submitted: Submitted::no(Reason::NotSubmitted, "not sent yet"),
        },
    );
    // Keep a resolved deviceName, so waiting does not resolve it again.
    status.machine_id = Some(machine_id.to_string());
    // A long wait says when it ends (and the cache may park the resource
    // until then); a short one writes nothing new when waited again.
    status.next_retry_at = (wait > SHOW_RETRY_AT_BEYOND).then(|| super::at(view.now, wait));
    Transition {
        status,
        note: None,
        requeue: Some(wait),
    }
}

/// The intent record, written with a resourceVersion precondition before sending.
/// It always differs from the status it replaces (`attempts` grows), so the
/// write always moves the resourceVersion and fences every other writer.
pub fn submitting(view: &View, machine_id: &str) -> DeviceOffboardStatus {
    let mut status = view.with(
        Phase::Submitting,
        Conditions {
            ready: (
                Reason::Submitting,
                format!("sending the offboard request for machine {machine_id}"),
            ),
            submitted: Submitted::no(Reason::Submitting, "offboard request being sent"),
        },
    );
    status.machine_id = Some(machine_id.to_string());
    status.attempts = Some(view.status.attempts.unwrap_or(0) + 1);
    status.submitted_at = Some(Time(view.now));
    status.answered_at = None;
    status.next_retry_at = None;
    status
}

/// What to do after the send (`view.status` is the `Submitting` status).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum AfterSend {
    Record(Transition),
    /// MDE says an offboard is already pending: find it and adopt it.
    AdoptPending,
}

pub fn after_send(
    view: &View,
    result: Result<MachineAction, MdeError>,
    settings: &Settings,
) -> AfterSend {
    let error = match result {
        Ok(action) => {
            let mut transition = record_action(view, &action, Origin::Sent);
            transition.status.answered_at = Some(Time(view.now));
            return AfterSend::Record(transition);
        }
        Err(MdeError::AlreadyPending { .. }) => return AfterSend::AdoptPending,
        Err(error) => error,
    };
    // Only an answer that may hide a created action keeps `Submitting` (and so
    // forces a lookup); a definite refusal means nothing exists at MDE.
    let phase = if error.may_have_created() {
        Phase::Submitting
    } else {
        Phase::Pending
    };
    AfterSend::Record(on_error(view, &error, phase, settings))
}

/// How the resource came to its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This resource's send created it.
    Sent,
    /// Found by this resource's marker after an ambiguous outcome or a crash.
    Recovered,
    /// Created by another request for the same machine (`key`: its uid or CLI
    /// key; empty when MDE said "already pending" for an action not ours).
    Shared { key: String },
}

/// Record a MachineAction in status. `machineActionId` is only ever set when empty.
pub fn record_action(view: &View, action: &MachineAction, origin: Origin) -> Transition {
    if let Some(existing) = &view.status.machine_action_id
        && existing != &action.id
    {
        // Never replace: keep ours, say what was seen.
        return Transition {
            status: view.status.clone(),
            note: Some(Note {
                reason: Reason::ConflictingAction,
                message: format!(
                    "MDE answered with offboard action {} ({}) but this resource records action {existing}; keeping {existing}",
                    action.id, action.status
                ),
            }),
            requeue: None,
        };
    }
    let (submitted_reason, verb) = match &origin {
        Origin::Sent => (Reason::Requested, "requested".to_string()),
        Origin::Recovered => (Reason::Adopted, "adopted existing".to_string()),
        Origin::Shared { key } if key.is_empty() => (
            Reason::Adopted,
            "adopted (already pending at MDE)".to_string(),
        ),
        Origin::Shared { key } => (
            Reason::Adopted,
            format!("adopted (created by request {key} for the same machine)"),
        ),
    };
    let machine = action
        .machine_id
        .clone()
        .or_else(|| view.machine_id())
        .unwrap_or_default();
    let mut transition = apply_action_status(view, action);
    let status = &mut transition.status;
    status.machine_action_id = Some(action.id.clone());
    status.machine_id = Some(machine.clone());
    status.adopted_from = match &origin {
        Origin::Shared { key } => Some(key.clone()),
        Origin::Sent | Origin::Recovered => None,
    };
    status.next_retry_at = None;
    if !status.phase.is_some_and(Phase::is_terminal) {
        status.last_error = None;
    }
    if status.submitted_at.is_none() {
        status.submitted_at = Some(Time(view.now));
    }
    view.set(
        status,
        ConditionUpdate {
            type_: SUBMITTED,
            holds: true,
            reason: submitted_reason,
            message: format!("offboard action {} {verb} for machine {machine}", action.id),
        },
    );
    // The submit note wins over a poll note: a person wants to see the action id first.
    transition.note = Some(Note {
        reason: submitted_reason,
        message: format!(
            "offboard action {} {verb} for machine {machine} (MDE status {})",
            action.id, action.status
        ),
    });
    transition
}

/// MDE answered 404 for the action this resource records, asked for it alone
/// (not from a list, where a missing entry proves nothing), and again
/// `lookup_delay` after the first time: final, with the action named,
/// instead of polling for it forever.
/// `None` until a 404 comes again `lookup_delay` after the first: MDE
/// answers 404 now and then for what exists, and lists lag.
pub fn action_gone(view: &View, action_id: &str, settings: &Settings) -> Option<Transition> {
    if !view.not_found_confirmed(settings) {
        return None;
    }
    let message = format!(
        "MDE has no offboard action {action_id} (GET /api/machineactions/{action_id} answered 404); check the device in the Defender portal, then create a new DeviceOffboard to offboard it again"
    );
    let mut transition = failed(view, Failure::new(Reason::ActionNotFound, message));
    // It was sent: keep Submitted as it was.
    if let Some(submitted) = condition(view.status, SUBMITTED) {
        let keep = submitted.clone();
        transition
            .status
            .conditions
            .retain(|c| c.type_ != SUBMITTED);
        transition.status.conditions.push(keep);
    }
    Some(transition)
}

/// Fold a polled action's status into the resource. `None` when nothing changed.
pub fn after_poll(view: &View, action: &MachineAction) -> Option<Transition> {
    if view.status.machine_action_id.as_deref() != Some(action.id.as_str())
        || view.phase().is_terminal()
    {
        return None;
    }
    if action.status == ActionStatus::Cancelled
        && let Some(owner) = &view.status.adopted_from
    {
        return Some(adopted_action_cancelled(view, action, owner));
    }
    let transition = apply_action_status(view, action);
    (transition.status != *view.status).then_some(transition)
}

/// The adopted action was cancelled by the request that created it: that
/// request's cancel says nothing of this one, whose device still needs its
/// offboard. The action is dropped and this resource sends its own (after
/// the check of the machine's list, as any first send).
fn adopted_action_cancelled(view: &View, action: &MachineAction, owner: &str) -> Transition {
    let owner = if owner.is_empty() {
        "another request"
    } else {
        owner
    };
    let message = format!(
        "the adopted offboard action {} was cancelled by the request that created it ({owner}); this resource sends its own offboard",
        action.id
    );
    let mut status = view.with(
        Phase::Pending,
        Conditions {
            ready: (Reason::AdoptedActionCancelled, message.clone()),
            submitted: Submitted::no(Reason::AdoptedActionCancelled, message.clone()),
        },
    );
    status.machine_action_id = None;
    status.action_status = None;
    status.adopted_from = None;
    status.submitted_at = None;
    status.answered_at = None;
    status.next_retry_at = None;
    Transition {
        status,
        note: Some(Note {
            reason: Reason::AdoptedActionCancelled,
            message,
        }),
        requeue: Some(Duration::ZERO),
    }
}

/// The phase, `Ready` reason, message and Event that MDE's status word means.
fn phase_of(action: &MachineAction) -> (Phase, Reason, String, Option<Reason>) {
    let word = action.status.as_str();
    match &action.status {
        ActionStatus::Succeeded => (
            Phase::Succeeded,
            Reason::Succeeded,
            format!("MDE offboard action {} succeeded", action.id),
            Some(Reason::Succeeded),
        ),
        ActionStatus::Cancelled => (
            Phase::Failed,
            Reason::Cancelled,
            format!(
                "MDE offboard action {} was cancelled{}; create a new DeviceOffboard to offboard the device after all",
                action.id,
                action
                    .cancellation_comment
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            ),
            Some(Reason::Cancelled),
        ),
        ActionStatus::Failed | ActionStatus::TimeOut => (
            Phase::Failed,
            Reason::Failed,
            format!(
                "MDE offboard action {} ended {word}; see the action in the Defender portal, then create a new DeviceOffboard to retry",
                action.id
            ),
            Some(Reason::Failed),
        ),
        _ => (
            Phase::InProgress,
            Reason::InProgress,
            format!("MDE offboard action {} is {word}", action.id),
            None,
        ),
    }
}

pub(super) fn apply_action_status(view: &View, action: &MachineAction) -> Transition {
    let word = action.status.as_str().to_string();
    let (phase, reason, message, note) = phase_of(action);
    let already_submitted = condition(view.status, SUBMITTED).is_some_and(|c| c.status == "True");
    let mut status = if already_submitted {
        // Keep the Submitted condition as it is (Requested or Adopted).
        let mut status = view.status.clone();
        status.phase = Some(phase);
        status.observed_generation = view.generation;
        view.set_ready(&mut status, phase, (reason, message.clone()));
        status
    } else {
        view.with(
            phase,
            Conditions {
                ready: (reason, message.clone()),
                submitted: Submitted {
                    holds: true,
                    reason: Reason::Requested,
                    message: format!("offboard action {}", action.id),
                },
            },
        )
    };
    status.action_status = Some(word.clone());
    if phase.is_terminal() {
        status.completed_at = Some(Time(view.now));
        if phase == Phase::Failed {
            status.last_error = last_error(&word, message.clone());
            view.set(
                &mut status,
                ConditionUpdate {
                    type_: STALLED,
                    holds: true,
                    reason,
                    message: message.clone(),
                },
            );
        }
    }
    Transition {
        status,
        note: note.map(|reason| Note { reason, message }),
        requeue: None,
    }
}
