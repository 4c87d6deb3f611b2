//! Table tests of the decision: a new case is one row. The fixtures marked
//! `pub(crate)` are shared with the rails' tests (`safety`, `protection`).
use super::timing::SubmittingClock;
use super::*;
use crate::crd::{CancelState, DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use crate::offboard::status::{READY, Reason, STALLED, SUBMITTED, condition};
use crate::tenants::Unavailable;
use crate::test_kit;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mde_client::{ActionStatus, ApiFamily, Machine, MachineAction, MdeError};
use std::time::Duration;

pub(crate) const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const ACTION: &str = "5382f7ea-7557-4ab7-9782-d50480024a4e";

pub(crate) fn now() -> Timestamp {
    "2026-06-01T12:00:00Z".parse().unwrap()
}

pub(crate) fn by_id() -> DeviceOffboardSpec {
    test_kit::offboard("by-id")
        .machine_id(MACHINE)
        .comment("retired")
        .spec()
}

pub(crate) fn by_name() -> DeviceOffboardSpec {
    test_kit::offboard("by-name")
        .device_name("pc-1.contoso.com")
        .comment("retired")
        .spec()
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
    let recorded = record_action(&view(&spec, &sent), &action(word), Origin::Sent).status;
    assert_eq!(recorded.phase, Some(phase), "fixture");
    recorded
}

fn action(status: ActionStatus) -> MachineAction {
    serde_json::from_value(serde_json::json!({
        "id": ACTION, "type": "Offboard", "status": status.as_str(), "machineId": MACHINE,
        "requestorComment": "[defender-offboard:uid] retired"
    }))
    .unwrap()
}

pub(crate) fn view<'a>(spec: &'a DeviceOffboardSpec, status: &'a DeviceOffboardStatus) -> View<'a> {
    View {
        spec,
        status,
        generation: Some(1),
        now: now(),
        submitting: None,
        retry_wait: None,
        cancel: None,
        cancel_clock: None,
        not_found_for: None,
        own_retry_at: true,
        created: None,
        tenant: None,
    }
}

fn settings() -> Settings {
    Settings {
        lookup_delay: Duration::from_secs(5),
        retry_backoff: Duration::from_secs(10),
        access_backoff: Duration::from_secs(300),
        ..Settings::default()
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

/// Since when this process has seen a resource `Submitting`.
fn clock(seconds: u64, looked_early: bool) -> Option<SubmittingClock> {
    Some(SubmittingClock {
        seen_for: Duration::from_secs(seconds),
        looked_early,
    })
}

#[test]
fn plan_for_every_phase() {
    let s = settings();
    let none = DeviceOffboardStatus::default();
    let later = DeviceOffboardStatus {
        next_retry_at: Some(Time(now() + SignedDuration::from_secs(30))),
        ..status(Phase::Pending)
    };
    let refused_once = DeviceOffboardStatus {
        attempts: Some(1),
        ..status(Phase::Pending)
    };
    let crashed_after_send = DeviceOffboardStatus {
        machine_action_id: Some(ACTION.into()),
        ..submitting_since(60)
    };
    let submit = |check_machine| Plan::Submit {
        machine_id: MACHINE.into(),
        check_machine,
    };
    let look_up = |proves_absence| Plan::LookUp {
        machine_id: MACHINE.into(),
        proves_absence,
    };
    struct Row {
        name: &'static str,
        spec: DeviceOffboardSpec,
        status: DeviceOffboardStatus,
        /// Since when this process has seen the resource `Submitting`.
        clock: Option<SubmittingClock>,
        expected: Plan,
    }
    let rows: Vec<Row> = vec![
        Row {
            name: "new, by id: check the machine first",
            spec: by_id(),
            status: none.clone(),
            clock: None,
            expected: submit(true),
        },
        Row {
            name: "new, by name",
            spec: by_name(),
            status: none.clone(),
            clock: None,
            expected: Plan::Resolve {
                device_name: "pc-1.contoso.com".into(),
                check_node: false,
            },
        },
        Row {
            name: "pending, resolved earlier",
            spec: by_name(),
            status: status(Phase::Pending),
            clock: None,
            expected: submit(true),
        },
        Row {
            name: "pending after a refused send: no second machine check",
            spec: by_id(),
            status: refused_once,
            clock: None,
            expected: submit(false),
        },
        Row {
            name: "pending, throttled",
            spec: by_id(),
            status: later,
            clock: None,
            expected: Plan::Idle {
                requeue: Some(Duration::from_secs(30)),
            },
        },
        Row {
            name: "found submitting (crash, new leader): an early lookup that may only adopt",
            spec: by_id(),
            status: submitting_since(60),
            clock: None,
            expected: look_up(false),
        },
        Row {
            // A wall-clock submittedAt an hour old proves nothing: another
            // process wrote it, and its send may have gone out much later.
            name: "submitted an hour ago by the wall clock, first seen now",
            spec: by_id(),
            status: submitting_since(3600),
            clock: None,
            expected: look_up(false),
        },
        Row {
            name: "early lookup made, delay not over",
            spec: by_id(),
            status: submitting_since(60),
            clock: clock(2, true),
            expected: Plan::Idle {
                requeue: Some(Duration::from_secs(3)),
            },
        },
        Row {
            name: "just sent by this process, ambiguous",
            spec: by_id(),
            status: submitting_since(0),
            clock: clock(0, true),
            expected: Plan::Idle {
                requeue: Some(Duration::from_secs(5)),
            },
        },
        Row {
            name: "seen submitting for the whole delay: a lookup that proves",
            spec: by_id(),
            status: submitting_since(0),
            clock: clock(5, true),
            expected: look_up(true),
        },
        Row {
            name: "crash after the action was recorded",
            spec: by_id(),
            status: crashed_after_send,
            clock: None,
            expected: Plan::Idle { requeue: None },
        },
        Row {
            name: "in progress",
            spec: by_id(),
            status: with_action(Phase::InProgress, "Pending"),
            clock: None,
            expected: Plan::Idle { requeue: None },
        },
        Row {
            name: "succeeded",
            spec: by_id(),
            status: with_action(Phase::Succeeded, "Succeeded"),
            clock: None,
            expected: Plan::Idle { requeue: None },
        },
        Row {
            name: "failed",
            spec: by_id(),
            status: status(Phase::Failed),
            clock: None,
            expected: Plan::Idle { requeue: None },
        },
    ];
    for Row {
        name,
        spec,
        status,
        clock,
        expected,
    } in rows
    {
        let v = View {
            submitting: clock,
            ..view(&spec, &status)
        };
        assert_eq!(plan(&v, &s), expected, "{name}");
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
    let answered = DeviceOffboardStatus {
        answered_at: Some(Time(now())),
        ..first
    };
    let second = submitting(&view(&spec, &answered), MACHINE);
    assert_eq!(second.attempts, Some(2));
    assert_eq!(second.answered_at, None, "the answer was the first send's");
}

/// Phase after each client outcome of the send, the event, and whether a lookup must follow.
#[test]
fn after_send_for_every_outcome() {
    struct Row {
        name: &'static str,
        /// Outcome of the send.
        result: Result<MachineAction, MdeError>,
        /// Expected phase.
        phase: Phase,
        /// Expected Ready reason.
        reason: &'static str,
        /// Expected event.
        event: Option<Reason>,
    }
    let s = settings();
    let spec = by_id();
    let current = submitting_since(0);
    let v = view(&spec, &current);
    let msg = || "m".to_string();
    let rows: Vec<Row> = vec![
        Row {
            name: "created",
            result: Ok(action(ActionStatus::Pending)),
            phase: Phase::InProgress,
            reason: "InProgress",
            event: Some(Reason::Requested),
        },
        Row {
            name: "created, already done",
            result: Ok(action(ActionStatus::Succeeded)),
            phase: Phase::Succeeded,
            reason: "Succeeded",
            event: Some(Reason::Requested),
        },
        Row {
            name: "not sent",
            result: Err(MdeError::NotSent { reason: msg() }),
            phase: Phase::Pending,
            reason: "MdeError",
            event: Some(Reason::MdeError),
        },
        Row {
            name: "throttled",
            result: Err(throttled()),
            phase: Phase::Pending,
            reason: "Throttled",
            event: Some(Reason::Throttled),
        },
        Row {
            name: "bad credentials",
            result: Err(MdeError::Unauthorized { message: msg() }),
            phase: Phase::Pending,
            reason: "AuthenticationFailed",
            event: Some(Reason::AuthenticationFailed),
        },
        Row {
            name: "sign-in",
            result: Err(MdeError::SignIn { message: msg() }),
            phase: Phase::Pending,
            reason: "AuthenticationFailed",
            event: Some(Reason::AuthenticationFailed),
        },
        Row {
            name: "no permission",
            result: Err(MdeError::Forbidden {
                code: "Forbidden".into(),
                message: msg(),
            }),
            phase: Phase::Pending,
            reason: "PermissionDenied",
            event: Some(Reason::PermissionDenied),
        },
        // A first 404 is confirmed a delay later before the resource fails
        // (see a_404_is_final_only_when_it_comes_again_a_delay_later).
        Row {
            name: "unknown machine",
            result: Err(MdeError::NotFound { message: msg() }),
            phase: Phase::Pending,
            reason: "DeviceNotFound",
            event: Some(Reason::DeviceNotFound),
        },
        Row {
            name: "linux",
            result: Err(MdeError::PlatformNotSupported { message: msg() }),
            phase: Phase::Failed,
            reason: "PlatformNotSupported",
            event: Some(Reason::PlatformNotSupported),
        },
        Row {
            name: "bad request",
            result: Err(MdeError::BadRequest {
                status: 400,
                code: "InvalidRequestBody".into(),
                message: msg(),
            }),
            phase: Phase::Failed,
            reason: "MdeError",
            event: Some(Reason::Failed),
        },
        Row {
            name: "lost response",
            result: Err(MdeError::OutcomeUnknown { reason: msg() }),
            phase: Phase::Submitting,
            reason: "OutcomeUnknown",
            event: Some(Reason::OutcomeUnknown),
        },
        Row {
            name: "5xx",
            result: Err(MdeError::Unavailable {
                status: 503,
                message: msg(),
            }),
            phase: Phase::Submitting,
            reason: "MdeError",
            event: Some(Reason::MdeError),
        },
        Row {
            name: "garbled 2xx",
            result: Err(MdeError::InvalidResponse { message: msg() }),
            phase: Phase::Submitting,
            reason: "MdeError",
            event: Some(Reason::MdeError),
        },
    ];
    for Row {
        name,
        result,
        phase,
        reason,
        event,
    } in rows
    {
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
                // What a new leader's budget counts the send from.
                assert_eq!(t.status.answered_at, Some(Time(now())), "{name}");
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
    let proving = LookUp {
        key: "uid",
        proves_absence: true,
    };
    let early = LookUp {
        proves_absence: false,
        ..proving
    };
    let AfterLookUp::Adopt(t) = after_lookup(
        &v,
        &Ok(vec![action(ActionStatus::InProgress)]),
        None,
        early,
        &s,
    ) else {
        panic!("found action must be adopted")
    };
    assert_eq!(t.status.machine_action_id.as_deref(), Some(ACTION));
    assert_eq!(t.status.phase, Some(Phase::InProgress));
    assert_eq!(condition(&t.status, SUBMITTED).unwrap().reason, "Adopted");
    assert_eq!(t.note.unwrap().reason, Reason::Adopted);
    assert_eq!(t.status.attempts, Some(1), "adoption sends nothing");

    assert_eq!(
        after_lookup(&v, &Ok(vec![]), None, proving, &s),
        AfterLookUp::Send
    );
    // Absent on an early lookup: wait out the delay, write nothing.
    let AfterLookUp::Wait(t) = after_lookup(&v, &Ok(vec![]), None, early, &s) else {
        panic!("an early lookup proves nothing")
    };
    assert_eq!(t.status, current);
    assert_eq!((t.note, t.requeue), (None, Some(s.lookup_delay)));
    // Another resource's action for the machine does not count as ours...
    let mut others = action(ActionStatus::Failed);
    others.requestor_comment = Some("[defender-offboard:uid-10] retired".into());
    assert_eq!(
        after_lookup(&v, &Ok(vec![others.clone()]), None, proving, &s),
        AfterLookUp::Send
    );
    // ... unless it is live or succeeded: then one offboard serves both.
    others.status = ActionStatus::Pending;
    let AfterLookUp::Adopt(t) = after_lookup(&v, &Ok(vec![others]), None, proving, &s) else {
        panic!("a live action of another request for the machine is adopted")
    };
    assert!(t.note.unwrap().message.contains("uid-10"));

    for error in [
        throttled(),
        MdeError::Unavailable {
            status: 503,
            message: "m".into(),
        },
    ] {
        let AfterLookUp::Wait(t) = after_lookup(&v, &Err(error), None, proving, &s) else {
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
        let proving = LookUp {
            key: "uid",
            proves_absence: true,
        };
        let AfterLookUp::Wait(t) = after_lookup(&v, &Err(error.clone()), None, proving, &s) else {
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
    let waiting = waiting_for_budget(&view(&spec, &none), Duration::from_secs(1), MACHINE).status;
    assert_eq!(waiting.machine_id.as_deref(), Some(MACHINE));
    assert_eq!(
        plan(&view(&spec, &waiting), &settings()),
        Plan::Submit {
            machine_id: MACHINE.into(),
            check_machine: true,
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
    let t = record_action(&view(&spec, &current), &other, Origin::Recovered);
    assert_eq!(t.status.machine_action_id.as_deref(), Some(ACTION));
    assert_eq!(t.status, current, "nothing else changes either");
    // ... and says what was seen: both ids, and which one is kept.
    let note = t.note.expect("an Event names the other action");
    assert_eq!(note.reason, Reason::ConflictingAction);
    assert!(
        note.message.contains(ACTION) && note.message.contains(&other.id),
        "{}",
        note.message
    );
    assert_eq!(after_poll(&view(&spec, &current), &other), None);
}

/// A spec naming no device (the schema forbids it; an old CRD may not) ends
/// `Failed` with the fix named, instead of idling without a word.
#[test]
fn a_spec_without_a_device_fails_with_the_fix_named() {
    let spec = test_kit::offboard("no-device").comment("retired").spec();
    let none = DeviceOffboardStatus::default();
    let Plan::Write(t) = plan(&view(&spec, &none), &settings()) else {
        panic!("a spec without a device must be refused")
    };
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&t.status), ("False".into(), "InvalidSpec".into()));
    assert_eq!(condition(&t.status, STALLED).unwrap().status, "True");
    let note = t.note.expect("an Event says why");
    assert!(note.message.contains("spec.machineId") && note.message.contains("spec.deviceName"));
    assert_eq!(t.requeue, None, "final: nothing to retry");
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
        (ActionStatus::Succeeded, Phase::Succeeded, Reason::Succeeded),
        (ActionStatus::Failed, Phase::Failed, Reason::Failed),
        (ActionStatus::TimeOut, Phase::Failed, Reason::Failed),
        (ActionStatus::Cancelled, Phase::Failed, Reason::Cancelled),
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
        computer_dns_name: Some("pc-1.contoso.com".into()),
        last_seen: Some("2026-05-01T00:00:00Z".into()),
        ..Default::default()
    };
    let chosen = after_resolve(&v, "pc-1.contoso.com", Ok(vec![machine(MACHINE)]), &s).unwrap();
    assert_eq!(chosen.machine_id, MACHINE);
    assert!(
        chosen.why.starts_with("1 record has the name"),
        "{}",
        chosen.why
    );
    // The choice is written before anything is sent, with an Event saying why.
    let t = resolved(&v, &chosen);
    assert_eq!(t.status.machine_id.as_deref(), Some(MACHINE));
    assert_eq!(t.status.resolution.as_deref(), Some(chosen.why.as_str()));
    assert_eq!(t.status.phase, None, "the phase is left as it was");
    assert_eq!(t.note.map(|n| n.reason), Some(Reason::DeviceResolved));

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

fn node_spec() -> DeviceOffboardSpec {
    DeviceOffboardSpec {
        node: Some(crate::crd::NodeIdentity {
            name: "aks-pool-1".into(),
            uid: "node-uid".into(),
            provider_id: Some("azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/aks-pool-1".into()),
            system_uuid: None,
        }),
        ..test_kit::offboard("aks-pool-1")
            .device_name("aks-pool-1")
            .comment("node deleted")
            .spec()
    }
}

#[test]
fn a_deleted_nodes_offboard_waits_the_grace_from_its_creation_then_checks_the_node() {
    let s = Settings {
        node_grace: Duration::from_secs(300),
        ..settings()
    };
    let spec = node_spec();
    let fresh = DeviceOffboardStatus::default();
    let created = |secs_ago: i64| View {
        created: Some(now() - SignedDuration::from_secs(secs_ago)),
        // A restarted process wrote no nextRetryAt: the grace still holds.
        own_retry_at: false,
        ..view(&spec, &fresh)
    };
    let Plan::Write(waiting) = plan(&created(60), &s) else {
        panic!("a node's offboard within its grace waits")
    };
    assert_eq!(waiting.requeue, Some(Duration::from_secs(240)));
    assert_eq!(ready(&waiting.status).1, "WaitingForNodeGrace");
    assert_eq!(waiting.status.phase, Some(Phase::Pending));
    assert_eq!(
        waiting.note.as_ref().map(|n| n.reason),
        Some(Reason::WaitingForNodeGrace),
        "an Event the first time"
    );
    // Looked at again while waiting: the same status, no second Event.
    let again_view = View {
        now: now() + SignedDuration::from_secs(60),
        created: Some(now() - SignedDuration::from_secs(60)),
        own_retry_at: false,
        ..view(&spec, &waiting.status)
    };
    let Plan::Write(again) = plan(&again_view, &s) else {
        panic!("still waiting")
    };
    assert_eq!(again.status, waiting.status, "waiting writes nothing new");
    assert_eq!(again.note, None);
    // Past the grace: the Node is looked for before the name is resolved.
    assert_eq!(
        plan(&created(301), &s),
        Plan::Resolve {
            device_name: "aks-pool-1".into(),
            check_node: true
        }
    );
    // A resource made by hand (no spec.node) neither waits nor checks.
    let by_hand = by_name();
    assert_eq!(
        plan(
            &View {
                created: Some(now()),
                ..view(&by_hand, &fresh)
            },
            &s
        ),
        Plan::Resolve {
            device_name: "pc-1.contoso.com".into(),
            check_node: false
        }
    );
    // Once resolved (waiting for budget), neither again.
    let resolved_status = DeviceOffboardStatus {
        machine_id: Some(MACHINE.into()),
        ..Default::default()
    };
    assert!(matches!(
        plan(
            &View {
                created: Some(now()),
                ..view(&spec, &resolved_status)
            },
            &s
        ),
        Plan::Submit { .. }
    ));
}

#[test]
fn a_node_that_is_back_fails_the_resource_without_sending() {
    let spec = node_spec();
    let fresh = DeviceOffboardStatus::default();
    let t = node_returned(
        &view(&spec, &fresh),
        "a Node named \"aks-pool-1\" exists again (uid u2)",
    );
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&t.status).1, "NodeReturned");
    assert_eq!(t.status.machine_action_id, None);
    let message = t.status.last_error.unwrap().message;
    assert!(
        message.contains("exists again") && message.contains("nothing was sent"),
        "{message}"
    );
    assert_eq!(t.note.map(|n| n.reason), Some(Reason::NodeReturned));
}

#[test]
fn an_offboard_answered_404_reads_the_machine_before_anything_else() {
    let s = settings();
    let spec = by_id();
    let sent = submitting_since(0);
    let AfterSend::Record(t) = after_send(
        &view(&spec, &sent),
        Err(MdeError::NotFound {
            message: "Machine was not found".into(),
        }),
        &s,
    ) else {
        panic!("recorded")
    };
    assert_eq!(
        t.status.phase,
        Some(Phase::Pending),
        "a 404 created nothing"
    );
    assert!(
        t.status
            .last_error
            .as_ref()
            .unwrap()
            .message
            .contains("the machine is read again")
    );
    let after = View {
        own_retry_at: false,
        ..view(&spec, &t.status)
    };
    assert_eq!(
        plan(&after, &s),
        Plan::ConfirmMachine {
            machine_id: MACHINE.into()
        }
    );
    // The machine's own 404, `lookup_delay` after the first: final.
    let confirmed = View {
        not_found_for: Some(s.lookup_delay),
        ..after.clone()
    };
    let t = on_error(
        &confirmed,
        &MdeError::NotFound {
            message: "Machine was not found".into(),
        },
        Phase::Pending,
        &s,
    );
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&t.status).1, "DeviceNotFound");
}

#[test]
fn already_pending_for_another_action_type_backs_off_with_its_own_reason() {
    let s = settings();
    let offboard = |status: &str, updated: &str| -> MachineAction {
        serde_json::from_value(serde_json::json!({
            "id": ACTION, "type": "Offboard", "status": status, "machineId": MACHINE,
            "lastUpdateDateTimeUtc": updated,
        }))
        .unwrap()
    };
    let long_ago = "2026-05-01T00:00:00Z";
    let just_now = "2026-06-01T11:59:59Z";
    let rows: [(&str, Vec<MachineAction>, bool); 4] = [
        ("no offboard action at all", vec![], true),
        (
            "only offboards finished long ago",
            vec![offboard("Failed", long_ago)],
            true,
        ),
        (
            "an offboard that just finished may be the pending one",
            vec![offboard("Succeeded", just_now)],
            false,
        ),
        (
            "a pending offboard is the pending one",
            vec![offboard("Pending", long_ago)],
            false,
        ),
    ];
    for (case, actions, another) in rows {
        assert_eq!(
            pending_is_another_type(&actions, now(), &s),
            another,
            "{case}"
        );
    }
    let spec = by_id();
    let refused = DeviceOffboardStatus {
        attempts: Some(1),
        ..submitting_since(0)
    };
    let t = other_action_pending(&view(&spec, &refused), MACHINE, &s);
    // The read that found no pending offboard may have lagged behind this
    // resource's own: the next send waits for a lookup that proves absence.
    assert_eq!(t.status.phase, Some(Phase::Submitting));
    let later = View {
        own_retry_at: true,
        now: now() + SignedDuration::from_secs(3600),
        submitting: Some(SubmittingClock {
            seen_for: Duration::from_secs(3600),
            looked_early: true,
        }),
        ..view(&spec, &t.status)
    };
    assert!(
        matches!(plan(&later, &s), Plan::LookUp { .. }),
        "looked up before any resend"
    );
    assert_eq!(ready(&t.status).1, "OtherActionPending");
    assert!(
        t.requeue.unwrap() >= s.access_backoff,
        "backs off, not every lookup delay"
    );
    assert_eq!(t.note.map(|n| n.reason), Some(Reason::OtherActionPending));
}

#[test]
fn a_long_budget_wait_says_when_it_ends_and_is_waited_out() {
    let spec = by_id();
    let waiting = waiting_for_budget(
        &view(&spec, &status(Phase::Pending)),
        Duration::from_secs(600),
        MACHINE,
    )
    .status;
    let at = now() + SignedDuration::from_secs(600);
    assert_eq!(waiting.next_retry_at, Some(Time(at)));
    assert_eq!(
        plan(&view(&spec, &waiting), &settings()),
        Plan::Idle {
            requeue: Some(Duration::from_secs(600))
        },
        "nothing is tried before its time"
    );
    let due = View {
        now: at,
        ..view(&spec, &waiting)
    };
    assert_eq!(
        plan(&due, &settings()),
        Plan::Submit {
            machine_id: MACHINE.into(),
            check_machine: true,
        }
    );
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

/// What the cancel annotation leads to, for every state a resource can be in.
#[test]
fn plan_for_a_cancel_annotation() {
    let spec = by_id();
    let s = settings();
    let cancelling = |status: &DeviceOffboardStatus, clock| {
        let v = View {
            cancel: Some("wrong device"),
            cancel_clock: clock,
            ..view(&spec, status)
        };
        plan(&v, &s)
    };
    // Pending at MDE: send the cancel.
    let pending = with_action(Phase::InProgress, "Pending");
    assert_eq!(
        cancelling(&pending, None),
        Plan::Cancel {
            action_id: ACTION.into(),
            reason: "wrong device".into()
        }
    );
    // InProgress at MDE: too late, said once, nothing sent.
    let running = with_action(Phase::InProgress, "InProgress");
    let Plan::Write(t) = cancelling(&running, None) else {
        panic!("too late is a write")
    };
    assert_eq!(t.note.as_ref().unwrap().reason, Reason::CancelTooLate);
    let cancel = t.status.cancel.clone().unwrap();
    assert_eq!(cancel.state, crate::crd::CancelState::TooLate);
    assert_eq!(
        t.status.phase,
        Some(Phase::InProgress),
        "the offboard goes on"
    );
    assert_eq!(
        cancelling(&t.status, None),
        Plan::Idle { requeue: None },
        "said once"
    );
    // Final: nothing at all.
    let done = with_action(Phase::Succeeded, "Succeeded");
    assert_eq!(cancelling(&done, None), Plan::Idle { requeue: None });
    // Not sent yet: end cancelled, nothing sent.
    let Plan::Write(t) = cancelling(&status(Phase::Pending), None) else {
        panic!("a cancel before sending is a write")
    };
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&t.status).1, "Cancelled");
    assert_eq!(t.status.machine_action_id, None);
    // Submitting: the lookup comes first.
    assert!(matches!(
        cancelling(&submitting_since(0), None),
        Plan::LookUp { .. }
    ));
    // A cancel recorded but unconfirmed: read the action; only a read after
    // the delay may lead to a second request.
    let mut requesting = pending.clone();
    requesting.cancel = Some(crate::crd::CancelStatus {
        reason: "wrong device".into(),
        state: crate::crd::CancelState::Requesting,
        requested_at: None,
        attempts: 1,
    });
    assert_eq!(
        cancelling(&requesting, clock(0, false)),
        Plan::ReadCancelled {
            action_id: ACTION.into(),
            proves_absence: false
        }
    );
    assert_eq!(
        cancelling(&requesting, clock(1, true)),
        Plan::Idle {
            requeue: Some(Duration::from_secs(4))
        }
    );
    assert_eq!(
        cancelling(&requesting, clock(5, true)),
        Plan::ReadCancelled {
            action_id: ACTION.into(),
            proves_absence: true
        }
    );
    // Without the annotation, a recorded action is the poller's.
    assert_eq!(
        plan(&view(&spec, &pending), &s),
        Plan::Idle { requeue: None }
    );
}

/// After the cancel request: accepted ends `Failed`/`Cancelled`; refused is
/// too late; an ambiguous answer keeps the intent and reads after the delay.
#[test]
fn after_a_cancel_request() {
    let spec = by_id();
    let s = settings();
    let pending = with_action(Phase::InProgress, "Pending");
    let intent = cancel_intent(&view(&spec, &pending), "wrong device");
    assert_eq!(intent.cancel.as_ref().unwrap().attempts, 1);
    assert_ne!(
        intent, pending,
        "the intent write always changes the object"
    );
    let v = view(&spec, &intent);

    let mut cancelled_action = action(ActionStatus::Cancelled);
    cancelled_action.cancellation_comment = Some("[defender-offboard:uid] wrong device".into());
    let t = after_cancel(&v, Ok(cancelled_action.clone()), &s);
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(t.status.action_status.as_deref(), Some("Cancelled"));
    assert_eq!(ready(&t.status).1, "Cancelled");
    assert_eq!(
        t.status.cancel.as_ref().unwrap().state,
        crate::crd::CancelState::Sent
    );
    assert_eq!(t.note.as_ref().unwrap().reason, Reason::Cancelled);

    let refused = MdeError::BadRequest {
        status: 400,
        code: "BadRequest".into(),
        message: "Action is already Succeeded and can no longer be cancelled.".into(),
    };
    let t = after_cancel(&v, Err(refused), &s);
    assert_eq!(
        t.status.cancel.as_ref().unwrap().state,
        crate::crd::CancelState::TooLate
    );
    assert_eq!(t.note.unwrap().reason, Reason::CancelTooLate);

    let timeout = MdeError::OutcomeUnknown {
        reason: "timed out".into(),
    };
    let t = after_cancel(&v, Err(timeout.clone()), &s);
    assert_eq!(
        t.status.cancel.as_ref().unwrap().state,
        crate::crd::CancelState::Requesting
    );
    assert_eq!(t.requeue, Some(s.lookup_delay));

    // The read afterwards: cancelled is adopted whenever it is read; still
    // Pending resends only after the delay; InProgress is too late.
    assert!(matches!(
        after_cancel_read(&v, Ok(cancelled_action), false, &s),
        AfterCancelRead::Write(t) if t.status.phase == Some(Phase::Failed)
    ));
    assert_eq!(
        after_cancel_read(&v, Ok(action(ActionStatus::Pending)), true, &s),
        AfterCancelRead::Resend
    );
    assert!(matches!(
        after_cancel_read(&v, Ok(action(ActionStatus::Pending)), false, &s),
        AfterCancelRead::Write(t) if t.status == intent
    ));
    assert!(matches!(
        after_cancel_read(&v, Ok(action(ActionStatus::InProgress)), true, &s),
        AfterCancelRead::Write(t) if t.note.as_ref().unwrap().reason == Reason::CancelTooLate
    ));
    assert!(matches!(
        after_cancel_read(&v, Err(timeout), true, &s),
        AfterCancelRead::Write(t) if t.status.cancel.as_ref().unwrap().state == crate::crd::CancelState::Requesting
    ));
    // A status MDE answered as null (or a word it may add later) proves
    // neither: keep the intent and read again after the delay.
    assert!(matches!(
        after_cancel_read(&v, Ok(action(ActionStatus::Other("null".into()))), true, &s),
        AfterCancelRead::Write(t) if t.status == intent && t.requeue == Some(s.lookup_delay)
    ));
}

/// An action cancelled elsewhere (the Defender portal) ends `Failed` with
/// reason `Cancelled`, not a generic failure.
#[test]
fn an_action_cancelled_elsewhere_reads_cancelled() {
    let spec = by_id();
    let pending = with_action(Phase::InProgress, "Pending");
    let t = after_poll(&view(&spec, &pending), &action(ActionStatus::Cancelled)).unwrap();
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(ready(&t.status).1, "Cancelled");
    assert_eq!(condition(&t.status, STALLED).unwrap().reason, "Cancelled");
}

/// A resource whose connection cannot be used waits in its phase with the
/// reason and the fix; nothing final, and the Event only when the reason is new.
#[test]
fn an_unavailable_connection_waits_with_the_reason() {
    let spec = by_id();
    let settings = Settings::default();
    let cases = [
        (
            Unavailable::NotFound {
                namespace: "team-b".into(),
                name: "contoso".into(),
            },
            Reason::ConnectionNotFound,
            settings.retry_backoff,
            "own namespace",
        ),
        (
            Unavailable::NotReady {
                name: "contoso".into(),
                reason: "AuthenticationFailed".into(),
                message: "invalid_client".into(),
            },
            Reason::ConnectionNotReady,
            settings.retry_backoff,
            "AuthenticationFailed",
        ),
        (
            Unavailable::Disabled {
                name: "contoso".into(),
            },
            Reason::ConnectionsDisabled,
            settings.access_backoff,
            "--connections",
        ),
        (
            Unavailable::NoDefault,
            Reason::NoDefaultConnection,
            settings.access_backoff,
            "spec.connectionRef",
        ),
    ];
    for phase in [Phase::Pending, Phase::Submitting] {
        for (unavailable, reason, wait, fix) in &cases {
            let before = status(phase);
            let t = connection_unavailable(&view(&spec, &before), unavailable, &settings);
            assert_eq!(t.status.phase, Some(phase), "{unavailable:?}");
            assert_eq!(t.requeue, Some(*wait), "{unavailable:?}");
            let error = t.status.last_error.clone().unwrap();
            assert_eq!(error.code, reason.as_str());
            assert!(error.message.contains(fix), "{}", error.message);
            assert_eq!(t.note.as_ref().map(|n| n.reason), Some(*reason));
            assert_eq!(ready(&t.status), ("False".into(), reason.as_str().into()));
            // The same reason again: the status holds it, no second Event.
            let again = connection_unavailable(&view(&spec, &t.status), unavailable, &settings);
            assert_eq!(again.note, None, "{unavailable:?}");
            assert_eq!(again.status.last_error, t.status.last_error);
        }
    }
}

/// What counts as a failed step (its retry wait grows with the failures in a
/// row): a retry with an error and no action recorded; nothing else.
#[test]
fn only_a_retry_with_an_error_and_no_action_is_a_failed_step() {
    let error = || {
        Some(crate::crd::LastError {
            code: "ServerError".into(),
            message: "503".into(),
        })
    };
    struct Row {
        name: &'static str,
        requeue: Option<Duration>,
        last_error: Option<crate::crd::LastError>,
        action: Option<&'static str>,
        failed: bool,
    }
    let rows = [
        Row {
            name: "retry after an error, nothing sent",
            requeue: Some(Duration::from_secs(10)),
            last_error: error(),
            action: None,
            failed: true,
        },
        Row {
            name: "an error that ends the resource (no retry)",
            requeue: None,
            last_error: error(),
            action: None,
            failed: false,
        },
        Row {
            name: "a wait without an error (budget, poll)",
            requeue: Some(Duration::from_secs(10)),
            last_error: None,
            action: None,
            failed: false,
        },
        Row {
            name: "an error kept once an action is recorded",
            requeue: Some(Duration::from_secs(10)),
            last_error: error(),
            action: Some(ACTION),
            failed: false,
        },
    ];
    for row in rows {
        let transition = Transition {
            status: DeviceOffboardStatus {
                last_error: row.last_error,
                machine_action_id: row.action.map(Into::into),
                ..status(Phase::Pending)
            },
            note: None,
            requeue: row.requeue,
        };
        assert_eq!(is_failed_retry(&transition), row.failed, "{}", row.name);
    }
}

/// A lookup proved the first send created nothing: with a cancel asked for
/// meanwhile the resource ends `Cancelled` with nothing sent, the reason
/// kept; without one, it is sent again.
#[test]
fn a_cancel_asked_before_a_resend_ends_the_resource_instead() {
    let spec = by_id();
    let submitting = submitting_since(60);
    let plain = view(&spec, &submitting);
    assert_eq!(cancel_instead_of_resend(&plain), None, "no cancel: resend");
    let asked = View {
        cancel: Some("wrong device"),
        ..view(&spec, &submitting)
    };
    let transition = cancel_instead_of_resend(&asked).expect("cancelled instead of resent");
    assert_eq!(transition.status.phase, Some(Phase::Failed));
    assert_eq!(
        transition.status.machine_action_id, None,
        "nothing was sent"
    );
    let (holds, reason) = ready(&transition.status);
    assert_eq!(
        (holds.as_str(), reason.as_str()),
        ("False", Reason::Cancelled.as_str())
    );
    let message = &condition(&transition.status, READY).unwrap().message;
    assert!(message.contains("wrong device"), "{message}");
}

/// Which action stands for the machine (docs/architecture.md): another
/// request's `Succeeded` offboard is adopted only when it was created within
/// the adopt window and MDE has not seen the machine since it ended; a
/// machine seen again (onboarded again) gets a new offboard. Days are
/// counted back from `now()`.
#[test]
fn another_requests_succeeded_offboard_stands_only_for_a_machine_not_seen_since() {
    let s = settings();
    let spec = by_id();
    let current = DeviceOffboardStatus::default();
    let v = view(&spec, &current);
    let first_send = LookUp {
        key: "uid-new",
        proves_absence: true,
    };
    let days_ago = |days: i64| (now() - SignedDuration::from_hours(24 * days)).to_string();
    let old_offboard = |status: ActionStatus, created: Option<i64>, updated: Option<i64>| {
        let mut a = action(status);
        a.requestor_comment = Some("[defender-offboard:uid-old] retired".into());
        a.creation_date_time_utc = created.map(days_ago);
        a.last_update_date_time_utc = updated.map(days_ago);
        a
    };
    let machine = |last_seen: Option<&str>| -> Machine {
        serde_json::from_value(serde_json::json!({ "id": MACHINE, "lastSeen": last_seen })).unwrap()
    };
    let seen = days_ago(1);
    let long_ago = days_ago(30);
    let months_ago = days_ago(100);
    enum Then {
        ReadMachine,
        Adopt,
        Send,
    }
    // (status, created, last updated (days ago), machine's lastSeen, outcome)
    type Row<'a> = (
        ActionStatus,
        Option<i64>,
        Option<i64>,
        Option<Option<&'a str>>,
        Then,
    );
    let rows: [Row; 10] = [
        // Recent, the machine not read yet: read it before deciding.
        (
            ActionStatus::Succeeded,
            Some(3),
            Some(3),
            None,
            Then::ReadMachine,
        ),
        // Not seen since it ended: the old offboard stands.
        (
            ActionStatus::Succeeded,
            Some(3),
            Some(3),
            Some(Some(&long_ago)),
            Then::Adopt,
        ),
        (
            ActionStatus::Succeeded,
            Some(3),
            Some(3),
            Some(None),
            Then::Adopt,
        ),
        // Seen after it ended: onboarded again, a new offboard.
        (
            ActionStatus::Succeeded,
            Some(3),
            Some(2),
            Some(Some(&seen)),
            Then::Send,
        ),
        // No end time: the creation time is the end.
        (
            ActionStatus::Succeeded,
            Some(3),
            None,
            Some(Some(&seen)),
            Then::Send,
        ),
        // Months ago, within the adopt window (MDE's 180 days), not seen
        // since: it stands too.
        (
            ActionStatus::Succeeded,
            Some(90),
            Some(90),
            Some(Some(&months_ago)),
            Then::Adopt,
        ),
        // Older than the adopt window, or of unreadable age: never stands,
        // whatever the index holds (and no read of the machine).
        (
            ActionStatus::Succeeded,
            Some(200),
            Some(200),
            None,
            Then::Send,
        ),
        (ActionStatus::Succeeded, None, None, None, Then::Send),
        // A finished one that did not succeed never stands.
        (ActionStatus::Failed, Some(3), Some(3), None, Then::Send),
        // A live one stands whatever its age or the machine's lastSeen.
        (ActionStatus::Pending, Some(60), Some(60), None, Then::Adopt),
    ];
    for (i, (status, created, updated, last_seen, then)) in rows.into_iter().enumerate() {
        let actions = Ok(vec![old_offboard(status, created, updated)]);
        let record = last_seen.map(machine);
        let needs = needs_machine(actions.as_ref().unwrap(), first_send.key, now(), &s);
        let got = after_lookup(&v, &actions, record.as_ref(), first_send, &s);
        match then {
            Then::ReadMachine => {
                assert!(needs, "row {i}");
                assert!(
                    matches!(got, AfterLookUp::Wait(_)),
                    "row {i}: never sent without the machine's record"
                );
            }
            Then::Send => assert_eq!(got, AfterLookUp::Send, "row {i}"),
            Then::Adopt => {
                let AfterLookUp::Adopt(t) = got else {
                    panic!("row {i}: adopted, got {got:?}")
                };
                assert!(t.note.unwrap().message.contains("uid-old"), "row {i}");
            }
        }
    }
    // A zero window: another request's finished offboard never stands.
    let zero = Settings {
        adopt_window: Duration::ZERO,
        ..settings()
    };
    let recent = Ok(vec![old_offboard(
        ActionStatus::Succeeded,
        Some(0),
        Some(0),
    )]);
    assert_eq!(
        after_lookup(&v, &recent, None, first_send, &zero),
        AfterLookUp::Send
    );
}

/// A `Pending` resource asked to cancel ends cancelled even while its
/// connection cannot be used: nothing was sent, and nothing needs the tenant.
/// A `Submitting` one waits: its send may have created an action.
#[test]
fn a_cancel_before_any_send_needs_no_connection() {
    let spec = by_id();
    let settings = Settings::default();
    let unavailable = Unavailable::NotFound {
        namespace: "team-b".into(),
        name: "contoso".into(),
    };
    let pending = status(Phase::Pending);
    let v = View {
        cancel: Some("wrong device"),
        ..view(&spec, &pending)
    };
    let t = connection_unavailable(&v, &unavailable, &settings);
    assert_eq!(t.status.phase, Some(Phase::Failed));
    assert_eq!(t.note.unwrap().reason, Reason::Cancelled);
    let submitting = submitting_since(5);
    let v = View {
        cancel: Some("wrong device"),
        ..view(&spec, &submitting)
    };
    let t = connection_unavailable(&v, &unavailable, &settings);
    assert_eq!(t.status.phase, Some(Phase::Submitting));
}

/// Cancel works per action: only the request whose marker created an
/// action cancels it. One that adopted another request's action sends no
/// cancel (it says whose the action is); and when the owner cancels, the
/// adopter drops the action and sends its own offboard, unless it was asked
/// to cancel too.
#[test]
fn only_the_request_that_created_an_action_cancels_it() {
    let s = settings();
    let spec = by_id();
    let sent = submitting_since(0);
    let mut theirs = action(ActionStatus::Pending);
    theirs.requestor_comment = Some("[defender-offboard:uid-owner] retired".into());
    let adopted = record_action(
        &view(&spec, &sent),
        &theirs,
        Origin::Shared {
            key: "uid-owner".into(),
        },
    )
    .status;
    assert_eq!(adopted.adopted_from.as_deref(), Some("uid-owner"));
    let own = record_action(
        &view(&spec, &sent),
        &action(ActionStatus::Pending),
        Origin::Sent,
    )
    .status;
    assert_eq!(own.adopted_from, None);
    let cancel = |status: &DeviceOffboardStatus| {
        plan(
            &View {
                cancel: Some("wrong device"),
                ..view(&spec, status)
            },
            &s,
        )
    };
    assert!(
        matches!(cancel(&own), Plan::Cancel { .. }),
        "the owner cancels its own action"
    );
    let Plan::Write(t) = cancel(&adopted) else {
        panic!("an adopter sends no cancel")
    };
    assert_eq!(
        t.status.cancel.as_ref().unwrap().state,
        CancelState::NotOwner
    );
    let note = t.note.clone().unwrap();
    assert_eq!(note.reason, Reason::CancelNotOwner);
    assert!(note.message.contains("uid-owner"), "{}", note.message);
    assert_eq!(
        cancel(&t.status),
        Plan::Idle { requeue: None },
        "said once; the adopter follows the action"
    );
    // The owner cancelled: the adopter drops the action and sends its own.
    let mut cancelled = theirs.clone();
    cancelled.status = ActionStatus::Cancelled;
    let t = after_poll(&view(&spec, &adopted), &cancelled).unwrap();
    assert_eq!(t.status.phase, Some(Phase::Pending));
    assert_eq!(
        (
            t.status.machine_action_id.as_ref(),
            t.status.adopted_from.as_ref()
        ),
        (None, None)
    );
    assert_eq!(
        t.note.as_ref().unwrap().reason,
        Reason::AdoptedActionCancelled
    );
    assert!(matches!(
        plan(&view(&spec, &t.status), &s),
        Plan::Submit { .. }
    ));
    // ... unless it was asked to cancel too: then it ends cancelled, unsent.
    let Plan::Write(t2) = cancel(&t.status) else {
        panic!("cancelled before its own send")
    };
    assert_eq!(t2.status.phase, Some(Phase::Failed));
    // Its own action cancelled ends the owner's resource.
    let mut own_cancelled = action(ActionStatus::Cancelled);
    own_cancelled.id = ACTION.into();
    let t = after_poll(&view(&spec, &own), &own_cancelled).unwrap();
    assert_eq!(t.status.phase, Some(Phase::Failed));
}

/// The lookup delay leaves MDE a minute past the request timeout to list an
/// action a timed-out request created; the defaults keep that, and a shorter
/// one is named with the fix.
#[test]
fn the_lookup_delay_outlasts_a_timed_out_request_by_a_minute() {
    let timeout = Duration::from_secs(30);
    assert_eq!(
        lookup_delay_warning(Settings::default().lookup_delay, timeout),
        None
    );
    let warning = lookup_delay_warning(Duration::from_secs(35), timeout).unwrap();
    assert!(
        warning.contains("--lookup-delay to at least 90s"),
        "{warning}"
    );
}

/// MDE answers 404 now and then for what exists (and a gateway or a wrong
/// path answers 404 too): a 404 ends a resource only when it comes again
/// `lookup_delay` after the first, for the POST and for the recorded action
/// alike. Everywhere else a 404 already proves nothing.
#[test]
fn a_404_is_final_only_when_it_comes_again_a_delay_later() {
    let s = settings();
    let spec = by_id();
    let sending = submitting_since(0);
    let not_found = || MdeError::NotFound {
        message: "Machine was not found".into(),
    };
    for (seen_for, final_) in [
        (None, false),
        (Some(Duration::ZERO), false),
        (Some(s.lookup_delay - Duration::from_secs(1)), false),
        (Some(s.lookup_delay), true),
    ] {
        let v = View {
            not_found_for: seen_for,
            ..view(&spec, &sending)
        };
        let AfterSend::Record(t) = after_send(&v, Err(not_found()), &s) else {
            panic!()
        };
        let phase = if final_ {
            Phase::Failed
        } else {
            Phase::Pending
        };
        assert_eq!(t.status.phase, Some(phase), "{seen_for:?}");
        if !final_ {
            assert_eq!(t.requeue, Some(s.lookup_delay.max(s.retry_backoff)));
        }
        let recorded = with_action(Phase::InProgress, "Pending");
        let v = View {
            not_found_for: seen_for,
            ..view(&spec, &recorded)
        };
        assert_eq!(
            action_gone(&v, ACTION, &s).is_some(),
            final_,
            "{seen_for:?}"
        );
    }
}

/// A `nextRetryAt` another replica wrote (its clock may be skewed; it had a
/// budget of its own) is not waited for: the resource is planned against this
/// process's budget, which writes a time of its own.
#[test]
fn only_a_retry_time_this_process_wrote_is_waited_for() {
    let s = settings();
    let spec = by_id();
    let waiting = DeviceOffboardStatus {
        next_retry_at: Some(Time(now() + SignedDuration::from_hours(2))),
        ..status(Phase::Pending)
    };
    assert_eq!(
        plan(&view(&spec, &waiting), &s),
        Plan::Idle {
            requeue: Some(Duration::from_secs(7200))
        }
    );
    let after_failover = View {
        own_retry_at: false,
        ..view(&spec, &waiting)
    };
    assert!(matches!(plan(&after_failover, &s), Plan::Submit { .. }));
}

pub(crate) fn tenant(id: &str) -> crate::crd::StatusTenant {
    crate::crd::StatusTenant {
        tenant_id: id.into(),
        client_id: "app-1".into(),
        api: "https://api.security.microsoft.com/".into(),
    }
}

/// A resource records the tenant of its first decision and keeps it; one
/// whose connection later reaches another tenant (or app, or API host)
/// stops there, whatever its phase, and sends nothing more.
#[test]
fn a_resource_begun_in_one_tenant_never_goes_on_in_another() {
    let s = settings();
    let spec = by_id();
    let fresh = DeviceOffboardStatus::default();
    let first = View {
        tenant: Some(tenant("tenant-a")),
        ..view(&spec, &fresh)
    };
    let Plan::Submit { .. } = plan(&first, &s) else {
        panic!("a new resource is sent")
    };
    let intent = submitting(&first, MACHINE);
    assert_eq!(
        intent.tenant,
        Some(tenant("tenant-a")),
        "recorded with the intent"
    );
    // Same tenant: it goes on (the lookup of its Submitting state).
    let same = View {
        tenant: Some(tenant("tenant-a")),
        submitting: Some(SubmittingClock {
            seen_for: Duration::from_secs(600),
            looked_early: true,
        }),
        ..view(&spec, &intent)
    };
    assert!(matches!(plan(&same, &s), Plan::LookUp { .. }));
    // Tenant, app or API host changed under it: Failed, nothing planned.
    for other in [
        tenant("tenant-b"),
        crate::crd::StatusTenant {
            client_id: "app-2".into(),
            ..tenant("tenant-a")
        },
        crate::crd::StatusTenant {
            api: "https://eu.api.security.microsoft.com/".into(),
            ..tenant("tenant-a")
        },
    ] {
        let moved = View {
            tenant: Some(other.clone()),
            submitting: Some(SubmittingClock {
                seen_for: Duration::from_secs(600),
                looked_early: true,
            }),
            ..view(&spec, &intent)
        };
        let Plan::Write(t) = plan(&moved, &s) else {
            panic!("stopped: {other:?}")
        };
        assert_eq!(t.status.phase, Some(Phase::Failed));
        assert_eq!(ready(&t.status).1, "ConnectionChanged");
        assert_eq!(
            t.status.tenant,
            Some(tenant("tenant-a")),
            "the first is kept"
        );
        let message = t.status.last_error.unwrap().message;
        assert!(message.contains("nothing is sent"), "{message}");
    }
}
