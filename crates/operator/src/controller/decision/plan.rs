//! What to do next for a resource, from its spec and status alone.

use super::{Conditions, Note, Settings, Submitted, Transition, View};
use crate::controller::memory::SubmittingClock;
use crate::controller::status::{ConditionUpdate, Reason, STALLED, last_error};
use crate::crd::Phase;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// What the reconcile should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing now: final, waiting for the poller, or for `requeue`.
    Idle { requeue: Option<Duration> },
    /// Resolve `spec.deviceName` to a machine id.
    Resolve { device_name: String },
    /// Take budget, write `Submitting` (with a precondition), then send.
    /// Before a resource's first send (`check_machine`), list the machine's
    /// offboard actions: one another resource created is adopted instead.
    Submit {
        machine_id: String,
        check_machine: bool,
    },
    /// Look the action up by marker before any resend. Only a lookup made
    /// `lookup_delay` after this process first saw `Submitting` proves absence;
    /// an earlier one may only adopt.
    LookUp {
        machine_id: String,
        proves_absence: bool,
    },
    /// Write this transition, nothing else: a spec with no device (the schema
    /// forbids it), a cancel before sending or one that comes too late.
    Write(Box<Transition>),
    /// Record the cancel's intent, then `POST .../cancel` for the action.
    Cancel { action_id: String, reason: String },
    /// A cancel was recorded but not confirmed: read the action before any
    /// second request. Only a read `lookup_delay` after the send may resend.
    ReadCancelled {
        action_id: String,
        proves_absence: bool,
    },
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

/// The next step for a resource, from its spec and status alone.
pub fn plan(view: &View, settings: &Settings) -> Plan {
    let phase = view.phase();
    if phase.is_terminal() {
        return Plan::Idle { requeue: None };
    }
    if let Some(reason) = view.cancel_reason()
        && let Some(plan) = super::cancel::plan_cancel(view, reason, settings)
    {
        return plan;
    }
    if view.status.machine_action_id.is_some() {
        // An action exists: the batch poller takes it from here.
        return Plan::Idle { requeue: None };
    }
    if let Some(wait) = view.until(view.status.next_retry_at.as_ref()) {
        return Plan::Idle {
            requeue: Some(wait),
        };
    }
    match (phase, view.machine_id()) {
        (Phase::Submitting, Some(machine_id)) => match lookup_timing(view.submitting, settings) {
            LookupTiming::Now { proves_absence } => Plan::LookUp {
                machine_id,
                proves_absence,
            },
            LookupTiming::Later(wait) => Plan::Idle {
                requeue: Some(wait),
            },
        },
        (_, Some(machine_id)) => Plan::Submit {
            machine_id,
            check_machine: view.status.attempts.unwrap_or(0) == 0,
        },
        (_, None) => match &view.spec.device_name {
            Some(device_name) => Plan::Resolve {
                device_name: device_name.clone(),
            },
            // The schema forbids this; say so rather than loop.
            None => Plan::Write(Box::new(invalid_spec(view))),
        },
    }
}

/// A spec with neither `machineId` nor `deviceName` (an older CRD without the
/// rule, or a hand-edited one): final, with the fix named.
pub fn invalid_spec(view: &View) -> Transition {
    let message = "spec names no device: set exactly one of spec.machineId (40 lowercase hex characters) or spec.deviceName, and install the CRD of this release, which refuses such a spec".to_string();
    let mut status = view.with(
        Phase::Failed,
        Conditions {
            ready: (Reason::InvalidSpec, message.clone()),
            submitted: Submitted::no(Reason::NotSubmitted, "no offboard request was sent"),
        },
    );
    status.last_error = last_error(Reason::InvalidSpec.as_str(), message.clone());
    status.completed_at = Some(Time(view.now));
    view.set(
        &mut status,
        ConditionUpdate {
            type_: STALLED,
            holds: true,
            reason: Reason::InvalidSpec,
            message: message.clone(),
        },
    );
    Transition {
        status,
        note: Some(Note {
            reason: Reason::InvalidSpec,
            message,
        }),
        requeue: None,
    }
}
