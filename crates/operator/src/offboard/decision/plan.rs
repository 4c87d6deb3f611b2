//! What to do next for a resource, from its spec and status alone.

use super::timing::{LookupTiming, lookup_timing};
use super::{Conditions, Note, Plan, Settings, Submitted, Transition, View};
use crate::crd::Phase;
use crate::offboard::status::{ConditionUpdate, Reason, STALLED, last_error};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The next step for a resource, from its spec and status alone.
pub fn plan(view: &View, settings: &Settings) -> Plan {
    let phase = view.phase();
    if phase.is_terminal() {
        return Plan::Idle { requeue: None };
    }
    if let Some(stop) = super::connection::tenant_changed(view) {
        return Plan::Write(Box::new(stop));
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
    if view.own_retry_at
        && let Some(wait) = view.until(view.status.next_retry_at.as_ref())
    {
        return Plan::Idle {
            requeue: Some(wait),
        };
    }
    if super::node::before_node_check(view)
        && let Some(left) = super::node::grace_left(view, settings)
    {
        return Plan::Write(Box::new(super::node::waiting_for_grace(view, left)));
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
        (Phase::Pending, Some(machine_id)) if answered_not_found(view) => {
            Plan::ConfirmMachine { machine_id }
        }
        (Phase::Pending, Some(machine_id)) if super::protection::needs_check(view, settings) => {
            Plan::CheckProtection { machine_id }
        }
        (_, Some(machine_id)) => Plan::Submit {
            machine_id,
            check_machine: view.status.attempts.unwrap_or(0) == 0,
        },
        (_, None) => match &view.spec.device_name {
            Some(device_name) => Plan::Resolve {
                device_name: device_name.clone(),
                check_node: super::node::before_node_check(view),
            },
            // The schema forbids this; say so rather than loop.
            None => Plan::Write(Box::new(invalid_spec(view))),
        },
    }
}

/// Whether the last answer for this resource was MDE's 404.
fn answered_not_found(view: &View) -> bool {
    view.status
        .last_error
        .as_ref()
        .is_some_and(|e| e.code == mde_client::error::NOT_FOUND_CODE)
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
