//! A deleted Node's offboard: it waits `--node-offboard-grace`, and ends
//! without sending when the Node is back.

use super::errors::{Failure, failed};
use super::{Conditions, Note, Settings, Submitted, Transition, View, at, to_std};
use crate::crd::Phase;
use crate::offboard::status::Reason;
use std::time::Duration;

/// Whether `view` is a Node's offboard that has not resolved its device yet
/// (only then is the grace waited and the Node looked for).
pub fn before_node_check(view: &View) -> bool {
    view.spec.node.is_some()
        && view.phase() == Phase::Pending
        && view.status.machine_id.is_none()
        && view.status.attempts.unwrap_or(0) == 0
}

/// What is left of the grace, counted from the resource's creation (the
/// Node's deletion): the same on every replica and after a restart.
pub fn grace_left(view: &View, settings: &Settings) -> Option<Duration> {
    let created = view.created?;
    let elapsed = to_std(view.now.duration_since(created));
    let left = settings.node_grace.saturating_sub(elapsed);
    (!left.is_zero()).then_some(left)
}

/// Stay `Pending` until the grace ends; an Event the first time only.
pub fn waiting_for_grace(view: &View, left: Duration) -> Transition {
    let name = view.spec.node.as_ref().map_or("", |n| n.name.as_str());
    let until = at(view.now, left);
    let message = format!(
        "Node {name:?} was deleted; waiting until {} (--node-offboard-grace) in case it comes back before offboarding its device",
        until.0
    );
    let first = view.status.next_retry_at.is_none();
    let mut status = view.with(
        Phase::Pending,
        Conditions {
            ready: (Reason::WaitingForNodeGrace, message.clone()),
            submitted: Submitted::no(Reason::NotSubmitted, "not sent yet"),
        },
    );
    // Written once: the same time on every look, so waiting writes nothing.
    status.next_retry_at = view.status.next_retry_at.clone().or(Some(until));
    Transition {
        status,
        note: first.then_some(Note {
            reason: Reason::WaitingForNodeGrace,
            message,
        }),
        requeue: Some(left),
    }
}

/// The Node (or one with its identity) exists again: nothing is sent.
pub fn node_returned(view: &View, why: &str) -> Transition {
    let name = view.spec.node.as_ref().map_or("", |n| n.name.as_str());
    failed(
        view,
        Failure::new(
            Reason::NodeReturned,
            format!(
                "{why}: the device of deleted Node {name:?} is in use again, so it was not offboarded and nothing was sent; delete the Node again to offboard it"
            ),
        ),
    )
}
