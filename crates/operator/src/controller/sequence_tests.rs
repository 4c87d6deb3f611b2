//! The reconcile sequence (budget → intent write → send → record) against an
//! in-memory MDE and an in-memory store, one row per fault class. POSTs are
//! counted at the fake MDE per correlation key, whatever it answered.

use super::Error;
use super::decision::Settings;
use super::fakes::{FakeMde, Lookup, Send};
use super::ports::{FailWith, MemoryStore};
use super::sequence::{Ports, step};
use super::status::{SUBMITTED, condition};
use crate::crd::{DeviceOffboard, DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use crate::metrics::Metrics;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mde_client::{ApiFamily, MdeError};
use std::time::Duration;

const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const UID: &str = "6f1c1a52-1111-4a4a-9c9c-000000000001";

fn resource(status: Option<DeviceOffboardStatus>) -> DeviceOffboard {
    let mut obj = DeviceOffboard::new(
        "laptop",
        DeviceOffboardSpec {
            machine_id: Some(MACHINE.into()),
            device_name: None,
            comment: "returned".into(),
        },
    );
    obj.metadata.namespace = Some("it".into());
    obj.metadata.uid = Some(UID.into());
    obj.metadata.generation = Some(1);
    obj.status = status;
    obj
}

/// No waiting: a lookup is due as soon as the intent is recorded.
fn settings() -> Settings {
    Settings {
        lookup_delay: Duration::ZERO,
        retry_backoff: Duration::ZERO,
        access_backoff: Duration::ZERO,
    }
}

/// Step the stored resource until MDE's action is recorded, restarting after
/// every failed step as a new process would (from what the store holds).
async fn drive(mde: &FakeMde, store: &MemoryStore) -> (DeviceOffboardStatus, Vec<Error>) {
    let (settings, metrics) = (settings(), Metrics::default());
    let ports = Ports {
        mde,
        store,
        settings: &settings,
        metrics: &metrics,
    };
    let mut errors = Vec::new();
    for _ in 0..20 {
        let status = store.object().status.unwrap_or_default();
        if status.machine_action_id.is_some() || status.phase.is_some_and(Phase::is_terminal) {
            return (status, errors);
        }
        if let Err(error) = step(&store.object(), &ports).await {
            errors.push(error);
        }
    }
    panic!(
        "no action recorded after 20 steps: {:?}",
        store.object().status
    );
}

fn unknown(reason: &str) -> MdeError {
    MdeError::OutcomeUnknown {
        reason: reason.into(),
    }
}

fn submitted_reason(status: &DeviceOffboardStatus) -> String {
    condition(status, SUBMITTED).map_or_else(String::new, |c| c.reason.clone())
}

/// Name, scripted sends, scripted lookups, POSTs for the key, Submitted reason.
type SendRow = (&'static str, Vec<Send>, Vec<Lookup>, u32, &'static str);

/// Each fault on the send: POSTs for the key, actions at MDE, and how the
/// action came to be recorded. A second POST is only ever sent after a
/// complete lookup proved that the first created nothing.
#[tokio::test]
async fn every_send_fault_ends_with_one_action() {
    let throttled = MdeError::Throttled {
        family: ApiFamily::Offboard,
        retry_at: Timestamp::now(),
    };
    let rows: Vec<SendRow> = vec![
        ("accepted", vec![], vec![], 1, "Requested"),
        (
            "timeout after MDE acted",
            vec![Send::CreateThenFail(unknown("operation timed out"))],
            vec![],
            1,
            "Adopted",
        ),
        (
            "timeout before MDE acted: resent after a lookup proved absence",
            vec![Send::Fail(unknown("operation timed out"))],
            vec![],
            2,
            "Requested",
        ),
        (
            "connection reset after MDE acted",
            vec![Send::CreateThenFail(unknown("connection reset by peer"))],
            vec![],
            1,
            "Adopted",
        ),
        (
            "503 after MDE acted",
            vec![Send::CreateThenFail(unknown("MDE answered 503"))],
            vec![],
            1,
            "Adopted",
        ),
        (
            "503 before MDE acted: resent after a lookup proved absence",
            vec![Send::Fail(unknown("MDE answered 503"))],
            vec![],
            2,
            "Requested",
        ),
        (
            "lost response, lookup fails twice first",
            vec![Send::CreateThenFail(unknown("answer lost"))],
            vec![
                Lookup::Fail(MdeError::Unavailable {
                    status: 503,
                    message: "busy".into(),
                }),
                Lookup::Fail(MdeError::NotFound {
                    message: "wrong regional host".into(),
                }),
            ],
            1,
            "Adopted",
        ),
        (
            "2xx whose body does not parse",
            vec![Send::CreateThenFail(MdeError::InvalidResponse {
                message: "garbled".into(),
            })],
            vec![],
            1,
            "Adopted",
        ),
        (
            "429 (a refusal: nothing created), then sent",
            vec![Send::Fail(throttled)],
            vec![],
            2,
            "Requested",
        ),
    ];
    for (name, sends, lookups, posts, reason) in rows {
        let mde = FakeMde::default().sends(sends).lookups(lookups);
        let store = MemoryStore::new(resource(None));
        let (status, errors) = drive(&mde, &store).await;
        assert!(errors.is_empty(), "{name}: {errors:?}");
        assert_eq!(mde.posts_for(UID), posts, "{name}: POSTs for the key");
        assert_eq!(mde.actions_for(MACHINE), 1, "{name}: actions at MDE");
        assert_eq!(status.phase, Some(Phase::InProgress), "{name}");
        assert_eq!(submitted_reason(&status), reason, "{name}");
    }
}

/// A status write that fails (another writer, or the process dying) at each
/// point of the sequence: the restarted step never sends a second time.
#[tokio::test]
async fn a_failed_write_at_any_point_sends_once() {
    // name, failing write (1 = the intent, 2 = the record), how, POSTs, reason
    let rows = [
        (
            "conflict on the intent write",
            1,
            FailWith::Conflict,
            "Requested",
        ),
        (
            "crash before the intent lands",
            1,
            FailWith::Crash,
            "Requested",
        ),
        ("conflict on the record", 2, FailWith::Conflict, "Adopted"),
        (
            "crash between send and record",
            2,
            FailWith::Crash,
            "Adopted",
        ),
    ];
    for (name, write, with, reason) in rows {
        let mde = FakeMde::default();
        let store = MemoryStore::new(resource(None));
        store.fail_write(write, with);
        let (status, errors) = drive(&mde, &store).await;
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert_eq!(mde.posts_for(UID), 1, "{name}: POSTs for the key");
        assert_eq!(status.phase, Some(Phase::InProgress), "{name}");
        assert_eq!(submitted_reason(&status), reason, "{name}");
    }
}

/// The process died after the intent write and before the send: the next
/// one finds `Submitting`, looks up, proves absence, and sends once.
#[tokio::test]
async fn a_crash_between_intent_and_send_sends_once_after_the_lookup() {
    let crashed = DeviceOffboardStatus {
        phase: Some(Phase::Submitting),
        machine_id: Some(MACHINE.into()),
        attempts: Some(1),
        submitted_at: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    let mde = FakeMde::default();
    let store = MemoryStore::new(resource(Some(crashed)));
    let (status, _) = drive(&mde, &store).await;
    assert_eq!(mde.posts_for(UID), 1);
    assert_eq!(status.attempts, Some(2), "the intent is recorded again");
    // And when the earlier process had sent: adopted, nothing sent.
    let mde = FakeMde::default();
    let marker = format!("[defender-offboard:{UID}] returned");
    let created = mde.insert(MACHINE, &marker);
    let crashed = store.object().status.map(|s| DeviceOffboardStatus {
        machine_action_id: None,
        phase: Some(Phase::Submitting),
        ..s
    });
    let store = MemoryStore::new(resource(crashed));
    let (status, _) = drive(&mde, &store).await;
    assert_eq!(mde.posts_for(UID), 0);
    assert_eq!(status.machine_action_id, Some(created.id));
}

/// Two workers (or replicas) holding the same resourceVersion: only the one
/// whose intent write lands may send.
#[tokio::test]
async fn two_workers_on_one_version_send_once() {
    let mde = FakeMde::default();
    let store = MemoryStore::new(resource(None));
    let snapshot = store.object();
    let (settings, metrics) = (settings(), Metrics::default());
    let ports = Ports {
        mde: &mde,
        store: &store,
        settings: &settings,
        metrics: &metrics,
    };
    let (first, second) = tokio::join!(step(&snapshot, &ports), step(&snapshot, &ports));
    let conflicts = [&first, &second]
        .iter()
        .filter(|r| matches!(r, Err(Error::Conflict)))
        .count();
    assert_eq!(conflicts, 1, "{first:?} {second:?}");
    assert_eq!(mde.posts_for(UID), 1);
}

/// Terminal or recorded resources cost no MDE call.
#[tokio::test]
async fn final_resources_make_no_call() {
    let mde = FakeMde::default();
    for phase in [Phase::Succeeded, Phase::Failed] {
        let store = MemoryStore::new(resource(Some(DeviceOffboardStatus {
            phase: Some(phase),
            ..Default::default()
        })));
        drive(&mde, &store).await;
    }
    assert_eq!(mde.calls(), 0);
}
