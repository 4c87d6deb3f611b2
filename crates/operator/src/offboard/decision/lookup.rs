//! What a list of the machine's offboard actions means for a resource: its own
//! action (adopt), another request's live or succeeded one (adopt: one offboard
//! per machine), or nothing — which proves absence only when the list was
//! complete and made late enough.

use super::after::{Origin, record_action};
use super::errors::{list_failed, lookup_failed};
use super::{Settings, Transition, View};
use crate::crd::Phase;
use mde_client::{
    ActionStatus, MachineAction, MdeError, correlation_marker, has_marker, marker_key,
};
use std::time::Duration;

/// Which lookup this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookUp<'a> {
    /// The resource's uid (the CLI's key): its marker.
    pub key: &'a str,
    /// Whether an empty answer proves that this resource created nothing.
    pub proves_absence: bool,
}

/// What the list holds for this resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Ours(MachineAction),
    /// Another request's action that is live or succeeded.
    Shared {
        action: MachineAction,
        key: String,
    },
    Nothing,
}

/// Ours by marker (a whole token) first; else the newest live or succeeded
/// action another request of this operator created. `actions` is oldest first.
pub fn found_in(actions: &[MachineAction], key: &str) -> Found {
    let marker = correlation_marker(key);
    let ours = actions.iter().find(|a| {
        a.requestor_comment
            .as_deref()
            .is_some_and(|c| has_marker(c, &marker))
    });
    if let Some(action) = ours {
        return Found::Ours(action.clone());
    }
    let shared = actions.iter().rev().find_map(|a| {
        let other = marker_key(a.requestor_comment.as_deref()?)?;
        let live = !a.status.is_final() || a.status == ActionStatus::Succeeded;
        live.then_some((a, other))
    });
    match shared {
        Some((action, key)) => Found::Shared {
            action: action.clone(),
            key: key.to_string(),
        },
        None => Found::Nothing,
    }
}

/// The newest action that is not final: what "already pending" refers to.
pub fn pending_in(actions: &[MachineAction]) -> Option<&MachineAction> {
    actions.iter().rev().find(|a| !a.status.is_final())
}

/// What to do after the lookup that precedes any send or resend.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum AfterLookUp {
    /// Found: adopt it.
    Adopt(Transition),
    /// Proven absent: send (again).
    Send,
    /// Failed, or absent without proof yet: look again at `requeue`.
    Wait(Transition),
}

pub fn after_lookup(
    view: &View,
    result: Result<Vec<MachineAction>, MdeError>,
    lookup: LookUp,
    settings: &Settings,
) -> AfterLookUp {
    let actions = match result {
        Ok(actions) => actions,
        // Before a first send nothing may exist: the phase stays as it is.
        Err(error) if view.phase() != Phase::Submitting => {
            return AfterLookUp::Wait(list_failed(view, &error, view.phase(), settings));
        }
        Err(error) => return AfterLookUp::Wait(lookup_failed(view, &error, settings)),
    };
    match found_in(&actions, lookup.key) {
        Found::Ours(action) => AfterLookUp::Adopt(record_action(view, &action, Origin::Recovered)),
        Found::Shared { action, key } => {
            AfterLookUp::Adopt(record_action(view, &action, Origin::Shared { key }))
        }
        Found::Nothing if lookup.proves_absence => AfterLookUp::Send,
        Found::Nothing => AfterLookUp::Wait(not_yet(view, settings)),
    }
}

/// Absent, but too early to be sure (MDE's list may lag): nothing to write,
/// look again once the delay since this process first saw `Submitting` is over.
fn not_yet(view: &View, settings: &Settings) -> Transition {
    let seen_for = view.submitting.map_or(Duration::ZERO, |c| c.seen_for);
    Transition {
        status: view.status.clone(),
        note: None,
        requeue: Some(
            settings
                .lookup_delay
                .saturating_sub(seen_for)
                .max(Duration::from_millis(10)),
        ),
    }
}
