//! The reconcile decision: state in, next step out. No I/O here, so every
//! phase × outcome is a table row in the tests.
//!
//! The exactly-once recipe (docs/architecture.md): record intent (`Submitting`) before
//! sending; after any ambiguous outcome, or when found in `Submitting`, look
//! the action up by its correlation marker and adopt it; only send again when
//! the lookup proves nothing was created; `machineActionId` is never replaced.
//!
//! - [`plan`]: what to do next, from the resource alone;
//! - [`after`]: the transition after each call (resolve, send, lookup, poll);
//! - [`errors`]: how a failed call shows in status, and when to look again.
//!
//! The controller ([`crate::offboard::reconcile`]) and the `offboard` command both drive
//! these functions through [`crate::offboard::step`].

mod after;
mod cancel;
mod connection;
mod errors;
mod lookup;
mod node;
mod plan;
pub mod protection;
pub mod resolve;
mod safety;
#[cfg(test)]
mod tests;
mod timing;

pub use crate::tenants::protection::{NamePattern, Protection, protection};
pub use after::{
    AfterSend, Origin, action_gone, after_poll, after_resolve, after_send, other_action_pending,
    pending_is_another_type, record_action, resolved, submitting, waiting_for_budget,
};
pub use cancel::{
    AfterCancelRead, after_cancel, after_cancel_read, cancel_instead_of_resend, cancel_intent,
    cancelled_before_send,
};
pub use connection::{connection_unavailable, unavailable_reason};
pub use errors::{list_failed, lookup_failed, on_error};
pub use lookup::{
    AfterLookUp, Found, LookUp, after_lookup, found_in, needs_machine, pending_in, window_start,
};
pub use node::node_returned;
pub use plan::{invalid_spec, plan};
pub use protection::{after_machine_read, checked, protected_machine};
pub use resolve::{NodeIdentityMode, Resolved};
pub use safety::{
    BREAKER_WINDOW, BreakerCheck, DEFAULT_MAX_OFFBOARDS_PER_HOUR, Held, SendKind, approval,
    awaiting_approval, breaker, breaker_open, guard,
};
pub use timing::SubmittingClock;

use crate::crd::{DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use crate::offboard::status::{
    ConditionUpdate, Observed, READY, RECONCILING, Reason, SUBMITTED, set_condition,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// Tunables of the decision (all durations; tests compress them).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Pause after an ambiguous send (or a crash in `Submitting`) before the
    /// lookup, so an action created just before is listable.
    pub lookup_delay: Duration,
    /// Retry after a transient failure.
    pub retry_backoff: Duration,
    /// Retry after a credentials or permission failure: a person must act.
    pub access_backoff: Duration,
    /// How far back another request's `Succeeded` offboard may stand for the
    /// machine (`--adopt-window`; the adopt index covers the same window).
    /// Zero: never; a finished offboard of another request is never adopted.
    pub adopt_window: Duration,
    /// How a deleted Node's device is told apart (`--node-identity`).
    pub node_identity: NodeIdentityMode,
    /// How long a deleted Node's offboard waits, so a Node that comes back
    /// (a kubelet re-registering, a re-created VM) is not offboarded
    /// (`--node-offboard-grace`).
    pub node_grace: Duration,
    /// Devices never offboarded (`--protected-tag`, `--protected-name`, and
    /// the resource's connection's own rules).
    pub protection: Protection,
    /// New sends per tenant in any hour before the breaker holds the rest
    /// (`--max-offboards-per-hour`); 0: off. Off by default here, for the
    /// `offboard` command and tests; `run` defaults to
    /// [`DEFAULT_MAX_OFFBOARDS_PER_HOUR`].
    pub max_offboards_per_hour: u32,
    /// Send nothing until someone other than the creator approves
    /// (`--require-approval`).
    pub require_approval: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lookup_delay: DEFAULT_LOOKUP_DELAY,
            retry_backoff: Duration::from_secs(10),
            access_backoff: Duration::from_secs(300),
            adopt_window: DEFAULT_ADOPT_WINDOW,
            node_identity: NodeIdentityMode::default(),
            node_grace: DEFAULT_NODE_GRACE,
            protection: Protection::default(),
            max_offboards_per_hour: 0,
            require_approval: false,
        }
    }
}

/// `--lookup-delay`'s default: the default 30 s request timeout (a request
/// that timed out may still be in MDE's hands) plus a minute for MDE to act on
/// it and list its action ([`LIST_LAG_MARGIN`]).
pub const DEFAULT_LOOKUP_DELAY: Duration = Duration::from_secs(90);

/// How much longer than the request timeout the lookup delay should be.
pub const LIST_LAG_MARGIN: Duration = Duration::from_secs(60);

/// A warning when `lookup_delay` leaves MDE less than [`LIST_LAG_MARGIN`]
/// after a request timed out to list its action: a lookup that early may
/// miss an action the timed-out request created, and send a second one.
pub fn lookup_delay_warning(lookup_delay: Duration, request_timeout: Duration) -> Option<String> {
    let floor = request_timeout.saturating_add(LIST_LAG_MARGIN);
    (lookup_delay < floor).then(|| {
        format!(
            "--lookup-delay {}s is less than --request-timeout {}s plus {}s: a lookup that early may miss an action a timed-out request created; set --lookup-delay to at least {}s",
            lookup_delay.as_secs_f64(),
            request_timeout.as_secs_f64(),
            LIST_LAG_MARGIN.as_secs(),
            floor.as_secs_f64()
        )
    })
}

/// `--node-offboard-grace`'s default: long enough for a kubelet to register
/// its Node again after a `kubectl delete node`, or a scale set to re-create
/// an instance under the same name; short enough for a decommission.
pub const DEFAULT_NODE_GRACE: Duration = Duration::from_secs(300);

/// `--adopt-window`'s default: the 180 days MDE keeps a machine's records.
pub const DEFAULT_ADOPT_WINDOW: Duration = Duration::from_secs(180 * 24 * 3600);

/// What the reconcile should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing now: final, waiting for the poller, or for `requeue`.
    Idle { requeue: Option<Duration> },
    /// Resolve `spec.deviceName` to a machine id.
    /// Resolve `spec.deviceName` to a machine id; for a deleted Node
    /// (`check_node`), first make sure no Node of its name or identity is
    /// back.
    Resolve {
        device_name: String,
        check_node: bool,
    },
    /// The offboard was answered 404: read the machine before anything
    /// else. MDE answers 404 now and then for machines that exist, so only a
    /// 404 for the machine itself `lookup_delay` after the first fails the
    /// resource; a machine that reads is sent for again (a 404 created
    /// nothing).
    ConfirmMachine { machine_id: String },
    /// Read the record `spec.machineId` names before the first send, when a
    /// protection rule applies: a protected device is never sent for.
    CheckProtection { machine_id: String },
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

/// A Kubernetes Event to publish with a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub reason: Reason,
    pub message: String,
}

/// The status to write (if it differs), an event, and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: DeviceOffboardStatus,
    pub note: Option<Note>,
    pub requeue: Option<Duration>,
}

/// Whether a transition is a failed step to retry (its requeue grows with
/// the failures in a row): it retries with an error and no action recorded.
/// Anything else (progress, an adopted or recorded action, a final status)
/// starts the backoff over.
pub fn is_failed_retry(transition: &Transition) -> bool {
    transition.requeue.is_some()
        && transition.status.last_error.is_some()
        && transition.status.machine_action_id.is_none()
}

/// The record a resource offboards, and why (for `status.resolution`):
/// chosen for `deviceName`, or named by `machineId` and checked against the
/// protection rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub machine_id: String,
    pub why: String,
}

/// The state a decision reads.
#[derive(Debug, Clone)]
pub struct View<'a> {
    pub spec: &'a DeviceOffboardSpec,
    pub status: &'a DeviceOffboardStatus,
    pub generation: Option<i64>,
    pub now: Timestamp,
    /// While `Submitting`: how long this process has seen it so, on its own
    /// monotonic clock (`None`: not seen yet, counts as just now).
    pub submitting: Option<SubmittingClock>,
    /// The wait before the next retry after a transient failure, grown by the
    /// caller with the failures in a row (`None`: `Settings::retry_backoff`).
    pub retry_wait: Option<Duration>,
    /// The `defender.offboard.dev/cancel` annotation's value, if any.
    pub cancel: Option<&'a str>,
    /// While a cancel is `Requesting`: how long this process has seen it so.
    pub cancel_clock: Option<SubmittingClock>,
    /// How long ago this process first saw MDE answer 404 for this resource
    /// (`None`: not since its last other answer). MDE answers 404 for
    /// things that exist now and then, so a 404 is final only when one
    /// comes again `lookup_delay` after the first.
    pub not_found_for: Option<Duration>,
    /// Whether this process wrote the status's `nextRetryAt`. Only such a
    /// time is waited for: one another replica wrote counts on its clock
    /// (skewed, after a failover) and its budget; this process plans the
    /// resource against its own instead.
    pub own_retry_at: bool,
    /// The resource's `creationTimestamp` (a Node's offboard waits
    /// `node_grace` from it).
    pub created: Option<Timestamp>,
    /// Whom the resource's connection reaches now (`None`: not known here).
    pub tenant: Option<crate::crd::StatusTenant>,
}

/// What the `Ready` and `Submitted` conditions say about a new phase.
#[derive(Debug, Clone)]
pub(crate) struct Conditions {
    /// The `Ready` reason and message (`Ready` holds only when `Succeeded`).
    pub ready: (Reason, String),
    pub submitted: Submitted,
}

/// The `Submitted` condition: whether MDE holds an action for this resource.
#[derive(Debug, Clone)]
pub(crate) struct Submitted {
    pub holds: bool,
    pub reason: Reason,
    pub message: String,
}

impl Submitted {
    pub fn no(reason: Reason, message: impl Into<String>) -> Self {
        Submitted {
            holds: false,
            reason,
            message: message.into(),
        }
    }
}

impl View<'_> {
    fn phase(&self) -> Phase {
        self.status.phase.unwrap_or_default()
    }

    /// The cancel annotation's reason (a blank one still asks to cancel).
    fn cancel_reason(&self) -> Option<&str> {
        self.cancel.map(|reason| match reason.trim() {
            "" => "cancel asked for with a blank defender.offboard.dev/cancel annotation",
            reason => reason,
        })
    }

    fn machine_id(&self) -> Option<String> {
        self.status
            .machine_id
            .clone()
            .or_else(|| self.spec.machine_id.clone())
    }

    fn until(&self, at: Option<&Time>) -> Option<Duration> {
        let at = at?.0;
        (at > self.now).then(|| to_std(at.duration_since(self.now)))
    }

    /// Whether a 404 now confirms one seen `lookup_delay` or more before.
    fn not_found_confirmed(&self, settings: &Settings) -> bool {
        self.not_found_for
            .is_some_and(|seen_for| seen_for >= settings.lookup_delay)
    }

    /// The wait before retrying a transient failure.
    fn retry_wait(&self, settings: &Settings) -> Duration {
        self.retry_wait.unwrap_or(settings.retry_backoff)
    }

    fn observed(&self) -> Observed {
        Observed {
            generation: self.generation,
            now: self.now,
        }
    }

    /// Set one condition on `status`, as of this view.
    fn set(&self, status: &mut DeviceOffboardStatus, update: ConditionUpdate) {
        set_condition(status, update, self.observed());
    }

    /// The current status in `phase`, with `Ready` and `Submitted` set.
    fn with(&self, phase: Phase, conditions: Conditions) -> DeviceOffboardStatus {
        let mut status = self.status.clone();
        status.phase = Some(phase);
        status.observed_generation = self.generation;
        status.tenant = self.recorded_tenant();
        self.set(
            &mut status,
            ConditionUpdate {
                type_: SUBMITTED,
                holds: conditions.submitted.holds,
                reason: conditions.submitted.reason,
                message: conditions.submitted.message,
            },
        );
        self.set_ready(&mut status, phase, conditions.ready);
        status
    }

    /// The tenant the status keeps: the one recorded first, else the one
    /// the connection reaches now.
    fn recorded_tenant(&self) -> Option<crate::crd::StatusTenant> {
        self.status.tenant.clone().or_else(|| self.tenant.clone())
    }

    /// `Ready` for `phase`: it holds only once the offboard `Succeeded`.
    fn set_ready(
        &self,
        status: &mut DeviceOffboardStatus,
        phase: Phase,
        (reason, message): (Reason, String),
    ) {
        self.set(
            status,
            ConditionUpdate {
                type_: RECONCILING,
                holds: !phase.is_terminal(),
                reason,
                message: message.clone(),
            },
        );
        self.set(
            status,
            ConditionUpdate {
                type_: READY,
                holds: phase == Phase::Succeeded,
                reason,
                message,
            },
        );
    }
}

fn to_std(d: SignedDuration) -> Duration {
    Duration::try_from(d).unwrap_or_default()
}

/// `now + after`, saturating at the end of time rather than panicking on a
/// duration that came from the network.
fn at(now: Timestamp, after: Duration) -> Time {
    let after = SignedDuration::try_from(after).unwrap_or(SignedDuration::MAX);
    Time(now.checked_add(after).unwrap_or(Timestamp::MAX))
}
