//! A resource whose tenant cannot be reached through its connection: it
//! waits with the reason and the fix named, and nothing is sent.

use super::errors::{Retry, retrying};
use super::{Settings, Transition, View};
use crate::crd::Phase;
use crate::offboard::status::Reason;
use crate::tenants::Unavailable;
use std::time::Duration;

/// The status reason of an unavailable connection.
pub fn unavailable_reason(unavailable: &Unavailable) -> Reason {
    match unavailable {
        Unavailable::Disabled { .. } => Reason::ConnectionsDisabled,
        Unavailable::NotFound { .. } => Reason::ConnectionNotFound,
        Unavailable::NotReady { .. } | Unavailable::Checking { .. } => Reason::ConnectionNotReady,
        Unavailable::NoDefault => Reason::NoDefaultConnection,
        Unavailable::DefaultNotAllowed { .. } => Reason::DefaultConnectionNotAllowed,
    }
}

/// Wait in the current phase (`Pending`, or `Submitting` whose lookup needs
/// the tenant) with the reason in status and an Event; the Event only when
/// the reason is new, so a long wait does not repeat it every retry. A
/// `Pending` resource asked to cancel ends cancelled: nothing was sent.
pub fn connection_unavailable(
    view: &View,
    unavailable: &Unavailable,
    settings: &Settings,
) -> Transition {
    // A cancel before anything was sent needs no tenant: nothing will be.
    if let Some(reason) = view.cancel_reason()
        && view.phase() == Phase::Pending
        && view.status.machine_action_id.is_none()
    {
        return super::cancelled_before_send(view, reason);
    }
    let reason = unavailable_reason(unavailable);
    let mut transition = retrying(
        view,
        Retry {
            phase: view.phase(),
            reason,
            code: reason.as_str(),
            message: unavailable.message(),
            wait: unavailable_wait(unavailable, settings),
        },
    );
    let repeated = view
        .status
        .last_error
        .as_ref()
        .is_some_and(|e| e.code == reason.as_str());
    if repeated {
        transition.note = None;
    }
    transition
}

/// How soon to look again: a missing or not-ready connection may appear
/// any moment (GitOps applies in any order); the operator's own
/// configuration changes only with a restart.
fn unavailable_wait(unavailable: &Unavailable, settings: &Settings) -> Duration {
    match unavailable {
        Unavailable::NotFound { .. }
        | Unavailable::NotReady { .. }
        | Unavailable::Checking { .. } => settings.retry_backoff,
        Unavailable::Disabled { .. }
        | Unavailable::NoDefault
        | Unavailable::DefaultNotAllowed { .. } => settings.access_backoff,
    }
}

/// A resource begun in one tenant whose connection now reaches another (the
/// connection was deleted and made again under its name with another tenant,
/// app or API host): it stops, since a lookup there would "prove" that
/// nothing was sent and a second offboard would go out in the wrong tenant.
pub fn tenant_changed(view: &View) -> Option<Transition> {
    let (Some(began), Some(now)) = (view.status.tenant.as_ref(), view.tenant.as_ref()) else {
        return None;
    };
    if began == now {
        return None;
    }
    let sent = if view.status.machine_action_id.is_some() {
        "its action stays where it was sent (look it up there)"
    } else {
        "nothing is sent to the new one"
    };
    Some(super::errors::failed(
        view,
        super::errors::Failure::new(
            Reason::ConnectionChanged,
            format!(
                "begun in tenant {} with app {} ({}); its connection now reaches tenant {} with app {} ({}): {sent}. Create a new DeviceOffboard to offboard the device through this connection",
                began.tenant_id, began.client_id, began.api, now.tenant_id, now.client_id, now.api
            ),
        ),
    ))
}
