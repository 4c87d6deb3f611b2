//! The reconcile decision: state in, next step out. No I/O here, so every
//! phase × outcome is a table row in the tests below.
//!
//! The exactly-once recipe (DESIGN.md): record intent (`Submitting`) before
//! sending; after any ambiguous outcome, or when found in `Submitting`, look
//! the action up by its correlation marker and adopt it; only send again when
//! the lookup proves nothing was created; `machineActionId` is never replaced.

use super::status::{EventReason, READY, Reason, STALLED, SUBMITTED, last_error, set_condition};
use crate::crd::{DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use crate::defender::{ActionStatus, ErrorClass, Machine, MachineAction, MdeError};
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
            // Above the default 30 s request timeout: a request that timed out
            // may still be in MDE's hands, and must be listable before we look.
            lookup_delay: Duration::from_secs(35),
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
// The transition lives for one reconcile; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
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
pub fn waiting_for_budget(view: &View, wait: Duration, machine_id: &str) -> Transition {
    let mut status = view.with(
        Phase::Pending,
        (
            Reason::WaitingForBudget,
            "waiting for the operator's offboard rate budget".into(),
        ),
        (false, Reason::NotSubmitted, "not sent yet".into()),
    );
    // Keep a resolved deviceName, so waiting does not resolve it again.
    status.machine_id = Some(machine_id.to_string());
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
        Ok(action) => return AfterSend::Record(record_action(view, &action, false)),
        Err(MdeError::AlreadyPending { .. }) => return AfterSend::AdoptPending,
        Err(error) => error,
    };
    // Only an answer that may hide a created action keeps `Submitting` (and so
    // forces a lookup); a definite refusal means nothing exists at MDE.
    let phase = match &error {
        MdeError::OutcomeUnknown { .. }
        | MdeError::Unavailable { .. }
        | MdeError::InvalidResponse { .. } => Phase::Submitting,
        _ => Phase::Pending,
    };
    AfterSend::Record(on_error(view, &error, phase, settings))
}

/// What to do after the lookup that precedes any resend.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
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
        Err(error) => AfterLookUp::Wait(lookup_failed(view, &error, settings)),
    }
}

/// A lookup that precedes any resend failed: stay `Submitting` whatever the
/// error — the action may exist, so neither a resend nor `Failed` is allowed.
pub fn lookup_failed(view: &View, error: &MdeError, settings: &Settings) -> Transition {
    match error.class() {
        ErrorClass::Permanent | ErrorClass::AlreadyPending => {
            let message = format!(
                "looking the offboard action up failed ({error}); retrying the lookup before any resend"
            );
            retrying(
                view,
                Phase::Submitting,
                Reason::MdeError,
                EventReason::MdeError,
                error.code(),
                message,
                settings.retry_backoff,
            )
        }
        _ => on_error(view, error, Phase::Submitting, settings),
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
            set_condition(
                &mut status,
                STALLED,
                true,
                Reason::Failed,
                message.clone(),
                view.generation,
                view.now,
            );
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
    set_condition(
        &mut status,
        STALLED,
        true,
        reason,
        message.clone(),
        view.generation,
        view.now,
    );
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
    // MDE's messages often end in a period; the advice follows after a "; ".
    let message = error
        .to_string()
        .trim_end()
        .trim_end_matches('.')
        .to_string();
    let (reason, event, wait) = match error {
        MdeError::Throttled { retry_at, family } => {
            // A floor, so a Retry-After of 0 or in the past cannot spin.
            let wait = to_std(retry_at.duration_since(view.now)).max(Duration::from_secs(1));
            let message =
                format!("MDE is throttling {family} calls for this tenant; retrying at {retry_at}");
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
            let message = format!(
                "MDE has no machine {machine} ({message}); check spec.machineId or spec.deviceName"
            );
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
            "{message}; grant the MDE app the Machine.Offboard and Machine.Read.All application permissions with admin consent"
        ),
        // Sign-in errors carry their own advice; a 401 on a fresh token usually
        // means the token is for another cloud than the API host.
        Reason::AuthenticationFailed if matches!(error, MdeError::Unauthorized { .. }) => format!(
            "{message}; check that --cloud (or --api-url) matches the tenant's cloud and that the app registration has admin consent"
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::status::condition;
    use crate::defender::ApiFamily;

    const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
    const ACTION: &str = "5382f7ea-7557-4ab7-9782-d50480024a4e";

    fn now() -> Timestamp {
        "2026-06-01T12:00:00Z".parse().unwrap()
    }

    fn by_id() -> DeviceOffboardSpec {
        DeviceOffboardSpec {
            machine_id: Some(MACHINE.into()),
            device_name: None,
            comment: "retired".into(),
        }
    }

    fn by_name() -> DeviceOffboardSpec {
        DeviceOffboardSpec {
            machine_id: None,
            device_name: Some("pc-1.contoso.com".into()),
            comment: "retired".into(),
        }
    }

    fn status(phase: Phase) -> DeviceOffboardStatus {
        DeviceOffboardStatus {
            phase: Some(phase),
            machine_id: Some(MACHINE.into()),
            ..Default::default()
        }
    }

    fn submitting_since(seconds_ago: i64) -> DeviceOffboardStatus {
        DeviceOffboardStatus {
            submitted_at: Some(Time(now() - SignedDuration::from_secs(seconds_ago))),
            attempts: Some(1),
            ..status(Phase::Submitting)
        }
    }

    /// A realistic status after the send was recorded and polled to `action_status`.
    fn with_action(phase: Phase, action_status: &str) -> DeviceOffboardStatus {
        let spec = by_id();
        let sent = submitting_since(0);
        let word: ActionStatus = serde_json::from_value(serde_json::json!(action_status)).unwrap();
        let recorded = record_action(&view(&spec, &sent), &action(word), false).status;
        assert_eq!(recorded.phase, Some(phase), "fixture");
        recorded
    }

    fn action(status: ActionStatus) -> MachineAction {
        serde_json::from_value(serde_json::json!({
            "id": ACTION, "type": "Offboard", "status": status.as_str(), "machineId": MACHINE,
            "requestorComment": "retired [defender-offboard:uid]"
        }))
        .unwrap()
    }

    fn view<'a>(spec: &'a DeviceOffboardSpec, status: &'a DeviceOffboardStatus) -> View<'a> {
        View {
            spec,
            status,
            generation: Some(1),
            now: now(),
        }
    }

    fn settings() -> Settings {
        Settings {
            lookup_delay: Duration::from_secs(5),
            retry_backoff: Duration::from_secs(10),
            access_backoff: Duration::from_secs(300),
        }
    }

    fn throttled() -> MdeError {
        MdeError::Throttled {
            family: ApiFamily::Offboard,
            retry_at: now() + SignedDuration::from_secs(30),
        }
    }

    fn ready(status: &DeviceOffboardStatus) -> (String, String) {
        let c = condition(status, READY).expect("Ready condition");
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn plan_for_every_phase() {
        let s = settings();
        let none = DeviceOffboardStatus::default();
        let later = DeviceOffboardStatus {
            next_retry_at: Some(Time(now() + SignedDuration::from_secs(30))),
            ..status(Phase::Pending)
        };
        let crashed_after_send = DeviceOffboardStatus {
            machine_action_id: Some(ACTION.into()),
            ..submitting_since(60)
        };
        let rows: Vec<(&str, DeviceOffboardSpec, DeviceOffboardStatus, Plan)> = vec![
            (
                "new, by id",
                by_id(),
                none.clone(),
                Plan::Submit {
                    machine_id: MACHINE.into(),
                },
            ),
            (
                "new, by name",
                by_name(),
                none.clone(),
                Plan::Resolve {
                    device_name: "pc-1.contoso.com".into(),
                },
            ),
            (
                "pending, resolved earlier",
                by_name(),
                status(Phase::Pending),
                Plan::Submit {
                    machine_id: MACHINE.into(),
                },
            ),
            (
                "pending, throttled",
                by_id(),
                later,
                Plan::Idle {
                    requeue: Some(Duration::from_secs(30)),
                },
            ),
            (
                "crash while submitting",
                by_id(),
                submitting_since(60),
                Plan::LookUp {
                    machine_id: MACHINE.into(),
                },
            ),
            (
                "just sent, ambiguous",
                by_id(),
                submitting_since(2),
                Plan::Idle {
                    requeue: Some(Duration::from_secs(3)),
                },
            ),
            (
                "crash after the action was recorded",
                by_id(),
                crashed_after_send,
                Plan::Idle { requeue: None },
            ),
            (
                "in progress",
                by_id(),
                with_action(Phase::InProgress, "Pending"),
                Plan::Idle { requeue: None },
            ),
            (
                "succeeded",
                by_id(),
                with_action(Phase::Succeeded, "Succeeded"),
                Plan::Idle { requeue: None },
            ),
            (
                "failed",
                by_id(),
                status(Phase::Failed),
                Plan::Idle { requeue: None },
            ),
        ];
        for (name, spec, status, expected) in rows {
            assert_eq!(plan(&view(&spec, &status), &s), expected, "{name}");
        }
    }

    #[test]
    fn intent_record_counts_attempts() {
        let spec = by_id();
        let first = submitting(&view(&spec, &DeviceOffboardStatus::default()), MACHINE);
        assert_eq!(first.phase, Some(Phase::Submitting));
        assert_eq!(first.attempts, Some(1));
        assert_eq!(first.submitted_at, Some(Time(now())));
        assert_eq!(first.machine_id.as_deref(), Some(MACHINE));
        assert_eq!(condition(&first, SUBMITTED).unwrap().reason, "Submitting");
        let second = submitting(&view(&spec, &first), MACHINE);
        assert_eq!(second.attempts, Some(2));
    }

    /// Phase after each client outcome of the send, the event, and whether a lookup must follow.
    /// Outcome of the send, expected phase, Ready reason, event.
    type SendRow = (
        &'static str,
        Result<MachineAction, MdeError>,
        Phase,
        &'static str,
        Option<EventReason>,
    );

    #[test]
    fn after_send_for_every_outcome() {
        let s = settings();
        let spec = by_id();
        let current = submitting_since(0);
        let v = view(&spec, &current);
        let msg = || "m".to_string();
        let rows: Vec<SendRow> = vec![
            (
                "created",
                Ok(action(ActionStatus::Pending)),
                Phase::InProgress,
                "InProgress",
                Some(EventReason::OffboardRequested),
            ),
            (
                "created, already done",
                Ok(action(ActionStatus::Succeeded)),
                Phase::Succeeded,
                "Succeeded",
                Some(EventReason::OffboardRequested),
            ),
            (
                "not sent",
                Err(MdeError::NotSent { reason: msg() }),
                Phase::Pending,
                "MdeError",
                Some(EventReason::MdeError),
            ),
            (
                "throttled",
                Err(throttled()),
                Phase::Pending,
                "Throttled",
                Some(EventReason::Throttled),
            ),
            (
                "bad credentials",
                Err(MdeError::Unauthorized { message: msg() }),
                Phase::Pending,
                "AuthenticationFailed",
                Some(EventReason::AuthenticationFailed),
            ),
            (
                "sign-in",
                Err(MdeError::SignIn { message: msg() }),
                Phase::Pending,
                "AuthenticationFailed",
                Some(EventReason::AuthenticationFailed),
            ),
            (
                "no permission",
                Err(MdeError::Forbidden {
                    code: "Forbidden".into(),
                    message: msg(),
                }),
                Phase::Pending,
                "PermissionDenied",
                Some(EventReason::PermissionDenied),
            ),
            (
                "unknown machine",
                Err(MdeError::NotFound { message: msg() }),
                Phase::Failed,
                "DeviceNotFound",
                Some(EventReason::DeviceNotFound),
            ),
            (
                "linux",
                Err(MdeError::PlatformNotSupported { message: msg() }),
                Phase::Failed,
                "PlatformNotSupported",
                Some(EventReason::PlatformNotSupported),
            ),
            (
                "bad request",
                Err(MdeError::BadRequest {
                    status: 400,
                    code: "InvalidRequestBody".into(),
                    message: msg(),
                }),
                Phase::Failed,
                "MdeError",
                Some(EventReason::OffboardFailed),
            ),
            (
                "lost response",
                Err(MdeError::OutcomeUnknown { reason: msg() }),
                Phase::Submitting,
                "OutcomeUnknown",
                Some(EventReason::OutcomeUnknown),
            ),
            (
                "5xx",
                Err(MdeError::Unavailable {
                    status: 503,
                    message: msg(),
                }),
                Phase::Submitting,
                "MdeError",
                Some(EventReason::MdeError),
            ),
            (
                "garbled 2xx",
                Err(MdeError::InvalidResponse { message: msg() }),
                Phase::Submitting,
                "MdeError",
                Some(EventReason::MdeError),
            ),
        ];
        for (name, result, phase, reason, event) in rows {
            let AfterSend::Record(t) = after_send(&v, result, &s) else {
                panic!("{name}: expected a record")
            };
            assert_eq!(t.status.phase, Some(phase), "{name}");
            assert_eq!(ready(&t.status).1, reason, "{name}");
            assert_eq!(t.note.as_ref().map(|n| n.reason), event, "{name}");
            match phase {
                Phase::InProgress | Phase::Succeeded => {
                    assert_eq!(
                        t.status.machine_action_id.as_deref(),
                        Some(ACTION),
                        "{name}"
                    );
                    assert_eq!(
                        condition(&t.status, SUBMITTED).unwrap().status,
                        "True",
                        "{name}"
                    );
                    assert!(t.status.last_error.is_none(), "{name}");
                }
                Phase::Failed => {
                    assert!(t.status.completed_at.is_some(), "{name}");
                    assert!(t.status.last_error.is_some(), "{name}");
                    assert_eq!(
                        condition(&t.status, STALLED).unwrap().status,
                        "True",
                        "{name}"
                    );
                    assert_eq!(t.requeue, None, "{name}: terminal, no retry");
                }
                _ => {
                    assert!(t.status.machine_action_id.is_none(), "{name}");
                    assert!(
                        t.status.next_retry_at.is_some(),
                        "{name}: a retry time is shown"
                    );
                    assert!(
                        t.requeue.is_some(),
                        "{name}: the worker is freed and comes back"
                    );
                    assert_eq!(ready(&t.status).0, "False", "{name}");
                }
            }
        }
        assert_eq!(
            after_send(&v, Err(MdeError::AlreadyPending { message: msg() }), &s),
            AfterSend::AdoptPending
        );
    }

    #[test]
    fn throttle_waits_for_retry_after_and_access_errors_back_off_long() {
        let s = settings();
        let spec = by_id();
        let current = submitting_since(0);
        let AfterSend::Record(t) = after_send(&view(&spec, &current), Err(throttled()), &s) else {
            panic!()
        };
        assert_eq!(t.requeue, Some(Duration::from_secs(30)));
        assert_eq!(
            t.status.next_retry_at,
            Some(Time(now() + SignedDuration::from_secs(30)))
        );
        let forbidden = MdeError::Forbidden {
            code: "Forbidden".into(),
            message: "no Machine.Offboard".into(),
        };
        let AfterSend::Record(t) = after_send(&view(&spec, &current), Err(forbidden), &s) else {
            panic!()
        };
        assert_eq!(t.requeue, Some(s.access_backoff));
        assert!(
            ready(&t.status).0 == "False" && t.status.phase == Some(Phase::Pending),
            "not terminal"
        );
        assert!(
            t.note.unwrap().message.contains("Machine.Offboard"),
            "the fix is named"
        );
    }

    #[test]
    fn lookup_adopts_sends_or_waits() {
        let s = settings();
        let spec = by_id();
        let current = submitting_since(60);
        let v = view(&spec, &current);
        let AfterLookUp::Adopt(t) =
            after_lookup(&v, Ok(Some(action(ActionStatus::InProgress))), &s)
        else {
            panic!("found action must be adopted")
        };
        assert_eq!(t.status.machine_action_id.as_deref(), Some(ACTION));
        assert_eq!(t.status.phase, Some(Phase::InProgress));
        assert_eq!(condition(&t.status, SUBMITTED).unwrap().reason, "Adopted");
        assert_eq!(t.note.unwrap().reason, EventReason::OffboardAdopted);
        assert_eq!(t.status.attempts, Some(1), "adoption sends nothing");

        assert_eq!(after_lookup(&v, Ok(None), &s), AfterLookUp::Send);

        for error in [
            throttled(),
            MdeError::Unavailable {
                status: 503,
                message: "m".into(),
            },
        ] {
            let AfterLookUp::Wait(t) = after_lookup(&v, Err(error), &s) else {
                panic!("a failed lookup never sends")
            };
            assert_eq!(
                t.status.phase,
                Some(Phase::Submitting),
                "the lookup must come first next time too"
            );
            assert!(t.requeue.is_some());
        }
    }

    /// Whatever the lookup answers, the resource neither fails nor resends:
    /// the action may exist.
    #[test]
    fn a_failed_lookup_never_fails_the_resource() {
        let s = settings();
        let spec = by_id();
        let current = submitting_since(60);
        let v = view(&spec, &current);
        for error in [
            MdeError::NotFound {
                message: "m".into(),
            },
            MdeError::BadRequest {
                status: 400,
                code: "InvalidFilter".into(),
                message: "m".into(),
            },
            MdeError::Forbidden {
                code: "Forbidden".into(),
                message: "m".into(),
            },
            MdeError::NotSent { reason: "m".into() },
        ] {
            let AfterLookUp::Wait(t) = after_lookup(&v, Err(error.clone()), &s) else {
                panic!("{error:?}")
            };
            assert_eq!(t.status.phase, Some(Phase::Submitting), "{error:?}");
            assert!(
                t.requeue.is_some() && t.status.completed_at.is_none(),
                "{error:?}"
            );
        }
    }

    #[test]
    fn waiting_for_budget_keeps_the_resolved_machine() {
        let spec = by_name();
        let none = DeviceOffboardStatus::default();
        let waiting =
            waiting_for_budget(&view(&spec, &none), Duration::from_secs(1), MACHINE).status;
        assert_eq!(waiting.machine_id.as_deref(), Some(MACHINE));
        assert_eq!(
            plan(&view(&spec, &waiting), &settings()),
            Plan::Submit {
                machine_id: MACHINE.into()
            },
            "no second resolve"
        );
    }

    #[test]
    fn a_retry_after_in_the_past_still_waits_a_second() {
        let spec = by_id();
        let current = status(Phase::Pending);
        let past = MdeError::Throttled {
            family: ApiFamily::Offboard,
            retry_at: now() - SignedDuration::from_secs(5),
        };
        let t = on_error(&view(&spec, &current), &past, Phase::Pending, &settings());
        assert_eq!(t.requeue, Some(Duration::from_secs(1)));
    }

    #[test]
    fn an_action_id_is_never_replaced() {
        let spec = by_id();
        let current = with_action(Phase::InProgress, "Pending");
        let mut other = action(ActionStatus::Pending);
        other.id = "00000000-0000-0000-0000-000000000000".into();
        let t = record_action(&view(&spec, &current), &other, true);
        assert_eq!(t.status.machine_action_id.as_deref(), Some(ACTION));
        assert_eq!(after_poll(&view(&spec, &current), &other), None);
    }

    #[test]
    fn poll_results_move_to_final_phases() {
        let spec = by_id();
        let current = with_action(Phase::InProgress, "Pending");
        let v = view(&spec, &current);
        assert_eq!(
            after_poll(&v, &action(ActionStatus::Pending)),
            None,
            "no change, no write"
        );
        let t = after_poll(&v, &action(ActionStatus::InProgress)).unwrap();
        assert_eq!(
            (t.status.phase, t.status.action_status.as_deref()),
            (Some(Phase::InProgress), Some("InProgress"))
        );
        assert!(t.note.is_none());
        for (status, phase, event) in [
            (
                ActionStatus::Succeeded,
                Phase::Succeeded,
                EventReason::OffboardSucceeded,
            ),
            (
                ActionStatus::Failed,
                Phase::Failed,
                EventReason::OffboardFailed,
            ),
            (
                ActionStatus::TimeOut,
                Phase::Failed,
                EventReason::OffboardFailed,
            ),
            (
                ActionStatus::Cancelled,
                Phase::Failed,
                EventReason::OffboardFailed,
            ),
        ] {
            let word = status.as_str().to_string();
            let t = after_poll(&v, &action(status)).unwrap();
            assert_eq!(t.status.phase, Some(phase), "{word}");
            assert_eq!(t.status.action_status.as_deref(), Some(word.as_str()));
            assert_eq!(t.status.completed_at, Some(Time(now())));
            assert_eq!(t.note.unwrap().reason, event);
            assert_eq!(
                ready(&t.status).0,
                if phase == Phase::Succeeded {
                    "True"
                } else {
                    "False"
                }
            );
            if phase == Phase::Failed {
                assert_eq!(t.status.last_error.as_ref().unwrap().code, word);
            }
        }
        let done = with_action(Phase::Succeeded, "Succeeded");
        assert_eq!(
            after_poll(&view(&spec, &done), &action(ActionStatus::Failed)),
            None,
            "terminal stays terminal"
        );
    }

    #[test]
    fn device_names_resolve_to_exactly_one_machine() {
        let s = settings();
        let spec = by_name();
        let current = DeviceOffboardStatus::default();
        let v = view(&spec, &current);
        let machine = |id: &str| Machine {
            id: id.into(),
            last_seen: Some("2026-05-01T00:00:00Z".into()),
            ..Default::default()
        };
        assert_eq!(
            after_resolve(&v, "pc-1.contoso.com", Ok(vec![machine(MACHINE)]), &s),
            Ok(MACHINE.to_string())
        );

        let t = after_resolve(&v, "pc-1.contoso.com", Ok(vec![]), &s).unwrap_err();
        assert_eq!(t.status.phase, Some(Phase::Failed));
        assert_eq!(ready(&t.status).1, "DeviceNotFound");
        assert!(
            t.status
                .last_error
                .unwrap()
                .message
                .contains("pc-1.contoso.com")
        );

        let t = after_resolve(
            &v,
            "pc-1.contoso.com",
            Ok(vec![machine("a1"), machine("b2")]),
            &s,
        )
        .unwrap_err();
        assert_eq!(ready(&t.status).1, "DeviceAmbiguous");
        let message = t.status.last_error.unwrap().message;
        assert!(
            message.contains("a1") && message.contains("b2") && message.contains("spec.machineId"),
            "{message}"
        );

        let t = after_resolve(&v, "pc-1.contoso.com", Err(throttled()), &s).unwrap_err();
        assert_eq!(t.status.phase, Some(Phase::Pending));
        assert!(t.status.next_retry_at.is_some());
    }

    #[test]
    fn unchanged_state_produces_an_identical_status() {
        let spec = by_id();
        let first = waiting_for_budget(
            &view(&spec, &status(Phase::Pending)),
            Duration::from_secs(1),
            MACHINE,
        );
        let later = View {
            now: now() + SignedDuration::from_secs(60),
            ..view(&spec, &first.status)
        };
        let second = waiting_for_budget(&later, Duration::from_secs(1), MACHINE);
        assert_eq!(
            first.status, second.status,
            "waiting again must not cause a status write"
        );
    }
}
