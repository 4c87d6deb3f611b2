//! The reconcile decision: state in, next step out. No I/O here, so every
//! phase × outcome is a table row in the tests below.
//!
//! The exactly-once recipe (DESIGN.md): record intent (`Submitting`) before
//! sending; after any ambiguous outcome, or when found in `Submitting`, look
//! the action up by its correlation marker and adopt it; only send again when
//! the lookup proves nothing was created; `machineActionId` is never replaced.

use super::status::{EventReason, READY, Reason, SUBMITTED, last_error, set_condition};
use crate::crd::{DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use crate::defender::{ActionStatus, Machine, MachineAction, MdeError};
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lookup_delay: Duration::from_secs(5),
            retry_backoff: Duration::from_secs(10),
            access_backoff: Duration::from_secs(300),
        }
    }
}

/// What the reconcile should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing now: final, waiting for the poller, or for `requeue`.
    Idle { requeue: Option<Duration> },
    /// Resolve `spec.deviceName` to a machine id.
    Resolve { device_name: String },
    /// Take budget, write `Submitting` (with a precondition), then send.
    Submit { machine_id: String },
    /// Look the action up by marker before any resend.
    LookUp { machine_id: String },
}

/// A Kubernetes Event to publish with a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub reason: EventReason,
    pub message: String,
}

/// The status to write (if it differs), an event, and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: DeviceOffboardStatus,
    pub note: Option<Note>,
    pub requeue: Option<Duration>,
}

/// The state a decision reads.
#[derive(Debug, Clone)]
pub struct View<'a> {
    pub spec: &'a DeviceOffboardSpec,
    pub status: &'a DeviceOffboardStatus,
    pub generation: Option<i64>,
    pub now: Timestamp,
}

impl View<'_> {
    fn phase(&self) -> Phase {
        self.status.phase.unwrap_or_default()
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

    /// The current status with phase and both conditions set.
    fn with(
        &self,
        phase: Phase,
        ready: (Reason, String),
        submitted: (bool, Reason, String),
    ) -> DeviceOffboardStatus {
        let mut status = self.status.clone();
        status.phase = Some(phase);
        status.observed_generation = self.generation;
        set_condition(
            &mut status,
            SUBMITTED,
            submitted.0,
            submitted.1,
            submitted.2,
            self.generation,
            self.now,
        );
        set_condition(
            &mut status,
            READY,
            phase == Phase::Succeeded,
            ready.0,
            ready.1,
            self.generation,
            self.now,
        );
        status
    }
}

fn to_std(d: SignedDuration) -> Duration {
    Duration::try_from(d).unwrap_or_default()
}

fn at(now: Timestamp, after: Duration) -> Time {
    Time(now + SignedDuration::try_from(after).unwrap_or(SignedDuration::ZERO))
}

/// The next step for a resource, from its spec and status alone.
pub fn plan(view: &View, settings: &Settings) -> Plan {
    let phase = view.phase();
    if phase.is_terminal() || view.status.machine_action_id.is_some() {
        // Final, or an action exists: the batch poller takes it from here.
        return Plan::Idle { requeue: None };
    }
    if let Some(wait) = view.until(view.status.next_retry_at.as_ref()) {
        return Plan::Idle {
            requeue: Some(wait),
        };
    }
    match (phase, view.machine_id()) {
        (Phase::Submitting, Some(machine_id)) => {
            let due = view
                .status
                .submitted_at
                .as_ref()
                .map(|t| at(t.0, settings.lookup_delay));
            match view.until(due.as_ref()) {
                Some(wait) => Plan::Idle {
                    requeue: Some(wait),
                },
                None => Plan::LookUp { machine_id },
            }
        }
        (_, Some(machine_id)) => Plan::Submit { machine_id },
        (_, None) => match &view.spec.device_name {
            Some(device_name) => Plan::Resolve {
                device_name: device_name.clone(),
            },
            // The schema forbids this; say so rather than loop.
            None => Plan::Idle { requeue: None },
        },
    }
}

/// After resolving `deviceName`: the machine id, or a transition to write.
pub fn after_resolve(
    view: &View,
    device_name: &str,
    result: Result<Vec<Machine>, MdeError>,
    settings: &Settings,
) -> Result<String, Transition> {
    match result {
        Ok(machines) if machines.len() == 1 => Ok(machines[0].id.clone()),
        Ok(machines) if machines.is_empty() => {
            let message = format!(
                "no MDE machine has computerDnsName {device_name:?}; check the name (as shown in the Defender portal) or use spec.machineId"
            );
            Err(failed(
                view,
                Reason::DeviceNotFound,
                EventReason::DeviceNotFound,
                "DeviceNotFound",
                message,
            ))
        }
        Ok(machines) => {
            let found: Vec<String> = machines
                .iter()
                .map(|m| {
                    format!(
                        "{} (lastSeen {}, {})",
                        m.id,
                        m.last_seen.as_deref().unwrap_or("unknown"),
                        m.os_platform.as_deref().unwrap_or("unknown platform")
                    )
                })
                .collect();
            let message = format!(
                "{} MDE machines share computerDnsName {device_name:?} (a re-imaged device?): {}; create the DeviceOffboard with spec.machineId set to the one to offboard",
                machines.len(),
                found.join(", ")
            );
            Err(failed(
                view,
                Reason::DeviceAmbiguous,
                EventReason::DeviceAmbiguous,
                "DeviceAmbiguous",
                message,
            ))
        }
        Err(error) => Err(on_error(view, &error, Phase::Pending, settings)),
    }
}

/// While the offboard budget is spent: stay `Pending`, say why, look again then.
/// `nextRetryAt` is left alone so waiting costs no status writes per retry.
pub fn waiting_for_budget(view: &View, wait: Duration) -> Transition {
    let status = view.with(
        Phase::Pending,
        (
            Reason::WaitingForBudget,
            "waiting for the operator's offboard rate budget".into(),
        ),
        (false, Reason::NotSubmitted, "not sent yet".into()),
    );
    Transition {
        status,
        note: None,
        requeue: Some(wait),
    }
}

/// The intent record, written with a resourceVersion precondition before sending.
pub fn submitting(view: &View, machine_id: &str) -> DeviceOffboardStatus {
    let mut status = view.with(
        Phase::Submitting,
        (
            Reason::Submitting,
            format!("sending the offboard request for machine {machine_id}"),
        ),
        (
            false,
            Reason::Submitting,
            "offboard request being sent".into(),
        ),
    );
    status.machine_id = Some(machine_id.to_string());
    status.attempts = Some(view.status.attempts.unwrap_or(0) + 1);
    status.submitted_at = Some(Time(view.now));
    status.next_retry_at = None;
    status
}

/// What to do after the send (`view.status` is the `Submitting` status).
#[derive(Debug, Clone, PartialEq)]
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
    match result {
        Ok(action) => AfterSend::Record(record_action(view, &action, false)),
        Err(MdeError::AlreadyPending { .. }) => AfterSend::AdoptPending,
        // Nothing left the machine: back to Pending, no lookup needed.
        Err(error @ MdeError::NotSent { .. }) => {
            AfterSend::Record(on_error(view, &error, Phase::Pending, settings))
        }
        // A 429 is an answer: MDE did not act.
        Err(error @ MdeError::Throttled { .. }) => {
            AfterSend::Record(on_error(view, &error, Phase::Pending, settings))
        }
        Err(error) => AfterSend::Record(on_error(view, &error, Phase::Submitting, settings)),
    }
}

/// What to do after the lookup that precedes any resend.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterLookUp {
    /// Found: adopt it.
    Adopt(Transition),
    /// Proven absent: send (again).
    Send,
    /// The lookup failed: stay `Submitting` and try the lookup again later.
    Wait(Transition),
}

pub fn after_lookup(
    view: &View,
    result: Result<Option<MachineAction>, MdeError>,
    settings: &Settings,
) -> AfterLookUp {
    match result {
        Ok(Some(action)) => AfterLookUp::Adopt(record_action(view, &action, true)),
        Ok(None) => AfterLookUp::Send,
        Err(error) => AfterLookUp::Wait(on_error(view, &error, Phase::Submitting, settings)),
    }
}

/// Record a MachineAction in status. `machineActionId` is only ever set when empty.
pub fn record_action(view: &View, action: &MachineAction, adopted: bool) -> Transition {
    if let Some(existing) = &view.status.machine_action_id
        && existing != &action.id
    {
        // Never replace: keep ours, say what was seen.
        return Transition {
            status: view.status.clone(),
            note: None,
            requeue: None,
        };
    }
    let (submitted_reason, event, verb) = if adopted {
        (
            Reason::Adopted,
            EventReason::OffboardAdopted,
            "adopted existing",
        )
    } else {
        (
            Reason::Requested,
            EventReason::OffboardRequested,
            "requested",
        )
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
    status.next_retry_at = None;
    if !status.phase.is_some_and(Phase::is_terminal) {
        status.last_error = None;
    }
    if status.submitted_at.is_none() {
        status.submitted_at = Some(Time(view.now));
    }
    set_condition(
        status,
        SUBMITTED,
        true,
        submitted_reason,
        format!("offboard action {} {verb} for machine {machine}", action.id),
        view.generation,
        view.now,
    );
    // The submit note wins over a poll note: a person wants to see the action id first.
    transition.note = Some(Note {
        reason: event,
        message: format!(
            "offboard action {} {verb} for machine {machine} (MDE status {})",
            action.id, action.status
        ),
    });
    transition
}

/// Fold a polled action's status into the resource. `None` when nothing changed.
pub fn after_poll(view: &View, action: &MachineAction) -> Option<Transition> {
    if view.status.machine_action_id.as_deref() != Some(action.id.as_str())
        || view.phase().is_terminal()
    {
        return None;
    }
    let transition = apply_action_status(view, action);
    (transition.status != *view.status).then_some(transition)
}

fn apply_action_status(view: &View, action: &MachineAction) -> Transition {
    let word = action.status.as_str().to_string();
    let (phase, reason, message, note) = match &action.status {
        ActionStatus::Succeeded => (
            Phase::Succeeded,
            Reason::Succeeded,
            format!("MDE offboard action {} succeeded", action.id),
            Some(EventReason::OffboardSucceeded),
        ),
        ActionStatus::Failed | ActionStatus::TimeOut | ActionStatus::Cancelled => (
            Phase::Failed,
            Reason::Failed,
            format!(
                "MDE offboard action {} ended {word}; see the action in the Defender portal, then create a new DeviceOffboard to retry",
                action.id
            ),
            Some(EventReason::OffboardFailed),
        ),
        _ => (
            Phase::InProgress,
            Reason::InProgress,
            format!("MDE offboard action {} is {word}", action.id),
            None,
        ),
    };
    let submitted = (
        true,
        Reason::Requested,
        format!("offboard action {}", action.id),
    );
    let previous_submitted =
        super::status::condition(view.status, SUBMITTED).filter(|c| c.status == "True");
    let mut status = match previous_submitted {
        // Keep the Submitted condition as it is (Requested or Adopted).
        Some(_) => {
            let mut status = view.status.clone();
            status.phase = Some(phase);
            status.observed_generation = view.generation;
            set_condition(
                &mut status,
                READY,
                phase == Phase::Succeeded,
                reason,
                message.clone(),
                view.generation,
                view.now,
            );
            status
        }
        None => view.with(phase, (reason, message.clone()), submitted),
    };
    status.action_status = Some(word.clone());
    if phase.is_terminal() {
        status.completed_at = Some(Time(view.now));
        if phase == Phase::Failed {
            status.last_error = last_error(&word, message.clone());
        }
    }
    Transition {
        status,
        note: note.map(|reason| Note { reason, message }),
        requeue: None,
    }
}

fn failed(
    view: &View,
    reason: Reason,
    event: EventReason,
    code: &str,
    message: String,
) -> Transition {
    let mut status = view.with(
        Phase::Failed,
        (reason, message.clone()),
        (
            false,
            Reason::NotSubmitted,
            "no offboard request was sent".into(),
        ),
    );
    status.last_error = last_error(code, message.clone());
    status.completed_at = Some(Time(view.now));
    status.next_retry_at = None;
    Transition {
        status,
        note: Some(Note {
            reason: event,
            message,
        }),
        requeue: None,
    }
}

/// Map a failed call to a transition, keeping `phase` unless the error is final.
pub fn on_error(view: &View, error: &MdeError, phase: Phase, settings: &Settings) -> Transition {
    let message = error.to_string();
    let (reason, event, wait) = match error {
        MdeError::Throttled { retry_at, .. } => {
            let wait = to_std(retry_at.duration_since(view.now));
            let message =
                format!("MDE is throttling offboard calls for this tenant; retrying at {retry_at}");
            let mut transition = retrying(
                view,
                phase,
                Reason::Throttled,
                EventReason::Throttled,
                error.code(),
                message,
                wait,
            );
            transition.status.next_retry_at = Some(Time(*retry_at));
            return transition;
        }
        MdeError::NotFound { .. } => {
            let machine = view.machine_id().unwrap_or_default();
            let message = format!("MDE has no machine {machine} ({message}); check spec.machineId");
            return failed(
                view,
                Reason::DeviceNotFound,
                EventReason::DeviceNotFound,
                error.code(),
                message,
            );
        }
        MdeError::PlatformNotSupported { .. } => {
            let message = format!(
                "{message}; the offboard API supports Windows 10 1703+ and Windows Server 2019+ — offboard this device with its local offboarding script"
            );
            return failed(
                view,
                Reason::PlatformNotSupported,
                EventReason::PlatformNotSupported,
                error.code(),
                message,
            );
        }
        MdeError::BadRequest { .. } => {
            return failed(
                view,
                Reason::MdeError,
                EventReason::OffboardFailed,
                error.code(),
                message,
            );
        }
        MdeError::Forbidden { .. } => (
            Reason::PermissionDenied,
            EventReason::PermissionDenied,
            settings.access_backoff,
        ),
        MdeError::Unauthorized { .. } | MdeError::SignIn { .. } | MdeError::Credentials { .. } => (
            Reason::AuthenticationFailed,
            EventReason::AuthenticationFailed,
            settings.access_backoff,
        ),
        MdeError::OutcomeUnknown { .. } => (
            Reason::OutcomeUnknown,
            EventReason::OutcomeUnknown,
            settings.lookup_delay,
        ),
        MdeError::AlreadyPending { .. }
        | MdeError::NotSent { .. }
        | MdeError::Unavailable { .. }
        | MdeError::InvalidResponse { .. } => (
            Reason::MdeError,
            EventReason::MdeError,
            settings.retry_backoff,
        ),
    };
    let message = match reason {
        Reason::PermissionDenied => format!(
            "{message}; grant the MDE app the Machine.Offboard application permission (and Machine.Read.All for spec.deviceName) with admin consent"
        ),
        Reason::AuthenticationFailed => {
            format!(
                "{message}; check the operator's AZURE_TENANT_ID, AZURE_CLIENT_ID and client secret or federated token"
            )
        }
        Reason::OutcomeUnknown => format!("{message}; looking the action up before any resend"),
        _ => message,
    };
    retrying(view, phase, reason, event, error.code(), message, wait)
}

fn retrying(
    view: &View,
    phase: Phase,
    reason: Reason,
    event: EventReason,
    code: &str,
    message: String,
    wait: Duration,
) -> Transition {
    let submitted = match phase {
        Phase::Submitting => (
            false,
            Reason::Submitting,
            "offboard request sent; outcome being confirmed".to_string(),
        ),
        _ => (false, Reason::NotSubmitted, "not sent yet".to_string()),
    };
    let mut status = view.with(phase, (reason, message.clone()), submitted);
    status.last_error = last_error(code, message.clone());
    status.next_retry_at = Some(at(view.now, wait));
    Transition {
        status,
        note: Some(Note {
            reason: event,
            message,
        }),
        requeue: Some(wait),
    }
}
