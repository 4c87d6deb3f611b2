//! What a list of the machine's offboard actions means for a resource: its own
//! action (adopt), another request's live one, or its recent succeeded one for
//! a machine not seen since (adopt: one offboard per machine), or nothing —
//! which proves absence only when the list was complete and made late enough.

use super::after::{Origin, record_action};
use super::errors::{list_failed, lookup_failed};
use super::{Settings, Transition, View};
use crate::crd::Phase;
use jiff::{SignedDuration, Timestamp};
use mde_client::{
    ActionStatus, Machine, MachineAction, MdeError, correlation_marker, has_marker, marker_key,
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
    /// Another request's action that is live, or succeeded and still stands
    /// for the machine ([`stands_for_machine`]).
    Shared {
        action: MachineAction,
        key: String,
    },
    /// Another request's `Succeeded` offboard within the adopt window: it
    /// stands for the machine only if MDE has not seen the machine since,
    /// which only the machine's record can tell.
    NeedsMachine,
    Nothing,
}

/// Ours by marker (a whole token) first; else the newest live action
/// another request of this operator created; else its newest `Succeeded`
/// one created within `settings.adopt_window`, if MDE has not seen the
/// machine since it ended (`machine`: the machine's record, when read).
/// `actions` is oldest first.
///
/// The rule (docs/architecture.md, "Which action stands for a machine"):
/// a machine offboarded long ago and onboarded again is a new device to
/// offboard, so another request's finished offboard is adopted only when it
/// is recent and the machine was not seen after it. Its outcome is the same
/// whether or not the adopt index or the machine claims hold the action.
pub fn found_in(
    actions: &[MachineAction],
    key: &str,
    machine: Option<&Machine>,
    now: Timestamp,
    settings: &Settings,
) -> Found {
    let marker = correlation_marker(key);
    let ours = actions.iter().find(|a| {
        a.requestor_comment
            .as_deref()
            .is_some_and(|c| has_marker(c, &marker))
    });
    if let Some(action) = ours {
        return Found::Ours(action.clone());
    }
    let others = || {
        actions
            .iter()
            .rev()
            .filter_map(|a| Some((a, marker_key(a.requestor_comment.as_deref()?)?)))
    };
    let shared = |(action, key): (&MachineAction, &str)| Found::Shared {
        action: action.clone(),
        key: key.to_string(),
    };
    if let Some(live) = others().find(|(a, _)| !a.status.is_final()) {
        return shared(live);
    }
    let succeeded = others().find(|(a, _)| {
        a.status == ActionStatus::Succeeded && within_window(a, now, settings.adopt_window)
    });
    match (succeeded, machine) {
        (None, _) => Found::Nothing,
        (Some(_), None) => Found::NeedsMachine,
        (Some(found), Some(machine)) if stands_for_machine(found.0, machine) => shared(found),
        (Some(_), Some(_)) => Found::Nothing,
    }
}

/// Whether `action` was created within `window` before `now` (an unreadable
/// creation time is not: the index keeps such an action, and the exact read
/// then sends, as without the index).
fn within_window(action: &MachineAction, now: Timestamp, window: Duration) -> bool {
    if window.is_zero() {
        return false;
    }
    parse_time(action.creation_date_time_utc.as_deref())
        .is_some_and(|created| created >= window_start(now, window))
}

/// Where a window of `window` ending `now` starts (the beginning of time for
/// a window longer than time allows): one definition for the rule and for
/// the adopt index that serves it, so the two always cover the same actions.
pub fn window_start(now: Timestamp, window: Duration) -> Timestamp {
    SignedDuration::try_from(window)
        .ok()
        .and_then(|w| now.checked_sub(w).ok())
        .unwrap_or(Timestamp::MIN)
}

/// Whether a `Succeeded` offboard still stands for `machine`: MDE has not
/// seen the machine after the action last changed. A machine with no
/// `lastSeen` was not seen since; an action whose end cannot be read cannot
/// be shown to stand (send).
pub fn stands_for_machine(action: &MachineAction, machine: &Machine) -> bool {
    let ended = parse_time(action.last_update_date_time_utc.as_deref())
        .or_else(|| parse_time(action.creation_date_time_utc.as_deref()));
    match (ended, parse_time(machine.last_seen.as_deref())) {
        (Some(ended), Some(seen)) => seen <= ended,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn parse_time(text: Option<&str>) -> Option<Timestamp> {
    text?.parse::<Timestamp>().ok()
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

/// Whether the decision on `actions` needs the machine's record (its
/// `lastSeen`): another request's recent `Succeeded` offboard is its only
/// candidate. Read it, then call [`after_lookup`] with it.
pub fn needs_machine(
    actions: &[MachineAction],
    key: &str,
    now: Timestamp,
    settings: &Settings,
) -> bool {
    found_in(actions, key, None, now, settings) == Found::NeedsMachine
}

/// After the list of the machine's offboard actions (`machine`: its record,
/// read when [`needs_machine`] says so; without it such a list only waits).
pub fn after_lookup(
    view: &View,
    result: &Result<Vec<MachineAction>, MdeError>,
    machine: Option<&Machine>,
    lookup: LookUp,
    settings: &Settings,
) -> AfterLookUp {
    let actions = match result {
        Ok(actions) => actions,
        // Before a first send nothing may exist: the phase stays as it is.
        Err(error) if view.phase() != Phase::Submitting => {
            return AfterLookUp::Wait(list_failed(view, error, view.phase(), settings));
        }
        Err(error) => return AfterLookUp::Wait(lookup_failed(view, error, settings)),
    };
    match found_in(actions, lookup.key, machine, view.now, settings) {
        Found::Ours(action) => AfterLookUp::Adopt(record_action(view, &action, Origin::Recovered)),
        Found::Shared { action, key } => {
            AfterLookUp::Adopt(record_action(view, &action, Origin::Shared { key }))
        }
        // Never sent without the machine's record: wait as for a lagging list.
        Found::NeedsMachine => AfterLookUp::Wait(not_yet(view, settings)),
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
