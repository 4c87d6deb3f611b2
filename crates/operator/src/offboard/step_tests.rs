//! The reconcile step (budget → intent write → send → record) against an
//! in-memory MDE and an in-memory store, one row per fault class. POSTs are
//! counted at the fake MDE per correlation key, whatever it answered.

use super::decision::Settings;
use super::fakes::{FailWith, ScriptedStore};
use super::fakes::{FakeMde, Lookup, Send};
use super::ports::MdeCalls;
use super::state::OffboardState;
use super::status::{SUBMITTED, condition};
use super::step::{Ports, step};
use crate::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::tenants::TenantClient;
use crate::test_kit;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mde_client::{ApiFamily, MdeError};
use std::time::Duration;

const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const UID: &str = "6f1c1a52-1111-4a4a-9c9c-000000000001";

fn laptop() -> test_kit::OffboardBuilder {
    test_kit::offboard("laptop")
        .machine_id(MACHINE)
        .comment("returned")
        .namespace("it")
        .uid(UID)
        .generation(1)
}

fn resource(status: Option<DeviceOffboardStatus>) -> DeviceOffboard {
    laptop().status(status).build()
}

/// No waiting: a lookup is due as soon as the intent is recorded.
fn settings() -> Settings {
    Settings {
        lookup_delay: Duration::ZERO,
        retry_backoff: Duration::ZERO,
        access_backoff: Duration::ZERO,
        ..Settings::default()
    }
}

/// Step the stored resource until MDE's action is recorded (or it is final),
/// restarting after every failed step as a new process would.
async fn drive(mde: &FakeMde, store: &ScriptedStore) -> (DeviceOffboardStatus, Vec<Error>) {
    drive_until(mde, store, |status| {
        status.machine_action_id.is_some() || status.phase.is_some_and(Phase::is_terminal)
    })
    .await
}

/// Step the stored resource until `done` holds for its status, restarting
/// after every failed step as a new process would (from what the store holds).
async fn drive_until(
    mde: &FakeMde,
    store: &ScriptedStore,
    done: impl Fn(&DeviceOffboardStatus) -> bool,
) -> (DeviceOffboardStatus, Vec<Error>) {
    let (settings, metrics) = (settings(), Metrics::default());
    let mut state = OffboardState::default();
    let mut errors = Vec::new();
    for _ in 0..20 {
        let status = store.object().status.unwrap_or_default();
        if done(&status) {
            return (status, errors);
        }
        let ports = Ports {
            mde,
            store,
            state: &state,
            settings: &settings,
            metrics: &metrics,
        };
        if let Err(error) = step(&store.object(), &ports).await {
            errors.push(error);
            // The next step is a new process: it remembers nothing.
            state = OffboardState::default();
        }
    }
    panic!("not done after 20 steps: {:?}", store.object().status);
}

fn unknown(reason: &str) -> MdeError {
    MdeError::OutcomeUnknown {
        reason: reason.into(),
    }
}

fn submitted_reason(status: &DeviceOffboardStatus) -> String {
    condition(status, SUBMITTED).map_or_else(String::new, |c| c.reason.clone())
}

/// Each fault on the send: POSTs for the key, actions at MDE, and how the
/// action came to be recorded. A second POST is only ever sent after a
/// complete lookup proved that the first created nothing.
#[tokio::test]
async fn every_send_fault_ends_with_one_action() {
    struct Row {
        name: &'static str,
        /// What the fake MDE answers the POSTs, in order.
        sends: Vec<Send>,
        /// What it answers the lookups, in order.
        lookups: Vec<Lookup>,
        /// POSTs for the key.
        posts: u32,
        /// The Submitted reason.
        reason: &'static str,
    }
    let throttled = MdeError::Throttled {
        family: ApiFamily::Offboard,
        retry_at: Timestamp::now(),
    };
    let rows: Vec<Row> = vec![
        Row {
            name: "accepted",
            sends: vec![],
            lookups: vec![],
            posts: 1,
            reason: "Requested",
        },
        Row {
            name: "timeout after MDE acted",
            sends: vec![Send::CreateThenFail(unknown("operation timed out"))],
            lookups: vec![],
            posts: 1,
            reason: "Adopted",
        },
        Row {
            name: "timeout before MDE acted: resent after a lookup proved absence",
            sends: vec![Send::Fail(unknown("operation timed out"))],
            lookups: vec![],
            posts: 2,
            reason: "Requested",
        },
        Row {
            name: "connection reset after MDE acted",
            sends: vec![Send::CreateThenFail(unknown("connection reset by peer"))],
            lookups: vec![],
            posts: 1,
            reason: "Adopted",
        },
        Row {
            name: "503 after MDE acted",
            sends: vec![Send::CreateThenFail(unknown("MDE answered 503"))],
            lookups: vec![],
            posts: 1,
            reason: "Adopted",
        },
        Row {
            name: "503 before MDE acted: resent after a lookup proved absence",
            sends: vec![Send::Fail(unknown("MDE answered 503"))],
            lookups: vec![],
            posts: 2,
            reason: "Requested",
        },
        Row {
            name: "lost response, lookup fails twice first",
            sends: vec![Send::CreateThenFail(unknown("answer lost"))],
            lookups: vec![
                Lookup::Fail(MdeError::Unavailable {
                    status: 503,
                    message: "busy".into(),
                }),
                Lookup::Fail(MdeError::NotFound {
                    message: "wrong regional host".into(),
                }),
            ],
            posts: 1,
            reason: "Adopted",
        },
        Row {
            name: "2xx whose body does not parse",
            sends: vec![Send::CreateThenFail(MdeError::InvalidResponse {
                message: "garbled".into(),
            })],
            lookups: vec![],
            posts: 1,
            reason: "Adopted",
        },
        Row {
            name: "429 (a refusal, not counted as a POST that could create), then sent",
            sends: vec![Send::Fail(throttled)],
            lookups: vec![],
            posts: 1,
            reason: "Requested",
        },
    ];
    for Row {
        name,
        sends,
        lookups,
        posts,
        reason,
    } in rows
    {
        let mde = FakeMde::default().sends(sends).lookups(lookups);
        let store = ScriptedStore::new(resource(None));
        let (status, errors) = drive(&mde, &store).await;
        assert!(errors.is_empty(), "{name}: {errors:?}");
        assert_eq!(mde.posts_for(UID), posts, "{name}: POSTs for the key");
        assert_eq!(mde.actions_for(MACHINE), 1, "{name}: actions at MDE");
        assert_eq!(status.phase, Some(Phase::InProgress), "{name}");
        assert_eq!(submitted_reason(&status), reason, "{name}");
    }
}

/// A status write that fails (another writer, or the process dying) at each
/// point of the step: the restarted step never sends a second time.
#[tokio::test]
async fn a_failed_write_at_any_point_sends_once() {
    struct Row {
        name: &'static str,
        /// The failing write: 1 = the intent, 2 = the record.
        write: u64,
        /// How it fails.
        with: FailWith,
        /// The Submitted reason (one POST in every row).
        reason: &'static str,
    }
    let rows = [
        Row {
            name: "conflict on the intent write",
            write: 1,
            with: FailWith::Conflict,
            reason: "Requested",
        },
        Row {
            name: "crash before the intent lands",
            write: 1,
            with: FailWith::Crash,
            reason: "Requested",
        },
        Row {
            name: "conflict on the record",
            write: 2,
            with: FailWith::Conflict,
            reason: "Adopted",
        },
        Row {
            name: "crash between send and record",
            write: 2,
            with: FailWith::Crash,
            reason: "Adopted",
        },
    ];
    for Row {
        name,
        write,
        with,
        reason,
    } in rows
    {
        let mde = FakeMde::default();
        let store = ScriptedStore::new(resource(None));
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
    let store = ScriptedStore::new(resource(Some(crashed)));
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
    let store = ScriptedStore::new(resource(crashed));
    let (status, _) = drive(&mde, &store).await;
    assert_eq!(mde.posts_for(UID), 0);
    assert_eq!(status.machine_action_id, Some(created.id));
}

/// Two workers (or replicas) holding the same resourceVersion: only the one
/// whose intent write lands may send.
#[tokio::test]
async fn two_workers_on_one_version_send_once() {
    let mde = FakeMde::default();
    let store = ScriptedStore::new(resource(None));
    let snapshot = store.object();
    let (settings, metrics, state) = (settings(), Metrics::default(), OffboardState::default());
    let ports = Ports {
        mde: &mde,
        store: &store,
        state: &state,
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
        let store = ScriptedStore::new(resource(Some(DeviceOffboardStatus {
            phase: Some(phase),
            ..Default::default()
        })));
        drive(&mde, &store).await;
    }
    assert_eq!(mde.calls(), 0);
}

fn on_machine(uid: &str) -> DeviceOffboard {
    laptop().uid(uid).build()
}

/// MDE's list lags: a previous process sent, died before recording, and its
/// action is not listed yet. The new process's lookup counts the delay from
/// when *it* first saw `Submitting` (not from the old wall-clock
/// `submittedAt`), so it finds and adopts the action instead of resending.
#[tokio::test(start_paused = true)]
async fn a_lagging_list_is_waited_out_on_this_process_clock() {
    // Listed 30 s after its creation: within the 35 s lookup delay.
    let mde = FakeMde::default().list_lag(Duration::from_secs(30));
    mde.insert(MACHINE, &format!("[defender-offboard:{UID}] returned"));
    let an_hour_ago = Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    let crashed = DeviceOffboardStatus {
        phase: Some(Phase::Submitting),
        machine_id: Some(MACHINE.into()),
        attempts: Some(1),
        submitted_at: Some(Time(an_hour_ago)),
        ..Default::default()
    };
    let store = ScriptedStore::new(resource(Some(crashed)));
    let settings = Settings {
        lookup_delay: Duration::from_secs(35),
        ..settings()
    };
    let (metrics, state) = (Metrics::default(), OffboardState::default());
    let ports = Ports {
        mde: &mde,
        store: &store,
        state: &state,
        settings: &settings,
        metrics: &metrics,
    };
    // The early lookup sees nothing and proves nothing: wait the whole delay.
    let requeue = step(&store.object(), &ports).await.unwrap();
    assert_eq!(requeue, Some(Duration::from_secs(35)));
    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(
        step(&store.object(), &ports).await.unwrap(),
        Some(Duration::from_secs(15))
    );
    tokio::time::advance(Duration::from_secs(15)).await;
    step(&store.object(), &ports).await.unwrap();
    let status = store.object().status.unwrap();
    assert_eq!(mde.posts_for(UID), 0, "nothing resent");
    assert!(status.machine_action_id.is_some());
    assert_eq!(submitted_reason(&status), "Adopted");
}

/// Two resources naming one machine, reconciled at once, while MDE's list
/// does not show new actions yet: one POST, and the second adopts it.
#[tokio::test]
async fn two_resources_for_one_machine_send_once() {
    // MDE lists nothing new during the test.
    let mde = FakeMde::default().list_lag(Duration::from_secs(3600));
    let (first, second) = (
        ScriptedStore::new(on_machine("uid-a")),
        ScriptedStore::new(on_machine("uid-b")),
    );
    let (settings, metrics, state) = (settings(), Metrics::default(), OffboardState::default());
    let ports = |store| Ports {
        mde: &mde,
        store,
        state: &state,
        settings: &settings,
        metrics: &metrics,
    };
    for _ in 0..10 {
        let (a, b) = (ports(&first), ports(&second));
        let (oa, ob) = (first.object(), second.object());
        let (ra, rb) = tokio::join!(step(&oa, &a), step(&ob, &b));
        ra.unwrap();
        rb.unwrap();
    }
    assert_eq!(mde.posts_for("uid-a") + mde.posts_for("uid-b"), 1);
    assert_eq!(mde.actions_for(MACHINE), 1);
    let (a, b) = (
        first.object().status.unwrap(),
        second.object().status.unwrap(),
    );
    assert_eq!(a.machine_action_id, b.machine_action_id);
    let adopter = if submitted_reason(&a) == "Adopted" {
        &first
    } else {
        &second
    };
    let note = adopter.notes().into_iter().last().unwrap();
    assert!(
        note.message.contains("for the same machine"),
        "{}",
        note.message
    );
}

/// A new resource for a machine another resource already offboards (a GitOps
/// prune and re-apply, a restore, a new leader): adopted, nothing sent.
#[tokio::test]
async fn a_new_resource_adopts_the_live_action_of_another() {
    let mde = FakeMde::default();
    let earlier = mde.insert(MACHINE, "[defender-offboard:old-uid] returned");
    let store = ScriptedStore::new(resource(None));
    let (status, _) = drive(&mde, &store).await;
    assert_eq!(mde.posts_for(UID), 0);
    assert_eq!(status.machine_action_id, Some(earlier.id));
    assert_eq!(submitted_reason(&status), "Adopted");
}

/// An action MDE says does not exist (asked for alone) ends the resource with
/// the reason, instead of leaving it `InProgress` for good.
#[tokio::test]
async fn an_action_mde_does_not_have_fails_the_resource() {
    let mde = FakeMde::default();
    let store = ScriptedStore::new(resource(None));
    let (status, _) = drive(&mde, &store).await;
    let recorded = status.machine_action_id.clone().unwrap();
    let (settings, metrics, state) = (settings(), Metrics::default(), OffboardState::default());
    let ports = Ports {
        mde: &mde,
        store: &store,
        state: &state,
        settings: &settings,
        metrics: &metrics,
    };
    let gone = match mde
        .get_machine_action("00000000-dead-4000-8000-000000000000")
        .await
    {
        Err(error @ MdeError::NotFound { .. }) => error,
        other => panic!("{other:?}"),
    };
    assert!(gone.to_string().contains("not found"));
    // The first 404 proves nothing (MDE answers one now and then for what
    // exists); the one after the lookup delay (zero here) does.
    super::step::record_gone(&ports, &store.object(), &recorded)
        .await
        .unwrap();
    assert_eq!(
        store.object().status.unwrap().phase,
        Some(Phase::InProgress)
    );
    super::step::record_gone(&ports, &store.object(), &recorded)
        .await
        .unwrap();
    let status = store.object().status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed));
    assert_eq!(status.last_error.as_ref().unwrap().code, "ActionNotFound");
    assert_eq!(
        submitted_reason(&status),
        "Requested",
        "it was sent: Submitted stays"
    );
    assert_eq!(status.machine_action_id, Some(recorded));
}

/// A resource whose offboard MDE holds `Pending`, annotated to cancel.
async fn pending_and_annotated(mde: &FakeMde) -> ScriptedStore {
    let store = ScriptedStore::new(resource(None));
    let (status, _) = drive(mde, &store).await;
    assert_eq!(status.action_status.as_deref(), Some("Pending"));
    let mut obj = store.object();
    obj.metadata.annotations = Some(
        [(
            crate::crd::CANCEL_ANNOTATION.to_string(),
            "wrong device".to_string(),
        )]
        .into(),
    );
    ScriptedStore::new(obj)
}

/// Step until final, or until the cancel is found too late.
async fn drive_to_final(mde: &FakeMde, store: &ScriptedStore) -> DeviceOffboardStatus {
    drive_until(mde, store, |status| {
        status.phase.is_some_and(Phase::is_terminal)
            || status
                .cancel
                .as_ref()
                .is_some_and(|c| c.state == crate::crd::CancelState::TooLate)
    })
    .await
    .0
}

/// Each fault on the cancel: cancel POSTs for the action. A second one only
/// after a read proved the first cancelled nothing.
#[tokio::test]
async fn a_cancel_is_sent_once_whatever_the_answer() {
    let rows = [
        ("accepted", vec![], 1),
        (
            "timeout after MDE cancelled: read, adopted",
            vec![Send::CreateThenFail(unknown("operation timed out"))],
            1,
        ),
        (
            "refused before MDE acted: read, then resent",
            vec![Send::Fail(MdeError::Unavailable {
                status: 503,
                message: "try later".into(),
            })],
            2,
        ),
    ];
    for (name, script, cancels) in rows {
        let mde = FakeMde::default().cancels(script);
        let store = pending_and_annotated(&mde).await;
        let status = drive_to_final(&mde, &store).await;
        let action = status.machine_action_id.clone().unwrap();
        assert_eq!(mde.cancels_for(&action), cancels, "{name}");
        assert_eq!(status.phase, Some(Phase::Failed), "{name}");
        assert_eq!(status.action_status.as_deref(), Some("Cancelled"), "{name}");
        let ready = condition(&status, super::status::READY).unwrap();
        assert_eq!(ready.reason, "Cancelled", "{name}");
        assert_eq!(mde.posts_for(UID), 1, "{name}: one offboard");
    }
    // A crash on the intent write: nothing sent; the next process sends once.
    let mde = FakeMde::default();
    let store = pending_and_annotated(&mde).await;
    store.fail_write(1, FailWith::Crash);
    let status = drive_to_final(&mde, &store).await;
    assert_eq!(
        mde.cancels_for(status.machine_action_id.as_deref().unwrap()),
        1
    );
}

/// Too late: MDE already runs the offboard. Nothing is sent, an Event says
/// so once, and the resource goes on to its real end.
#[tokio::test]
async fn a_cancel_after_in_progress_sends_nothing() {
    let mde = FakeMde::default();
    let store = pending_and_annotated(&mde).await;
    let action = store.object().status.unwrap().machine_action_id.unwrap();
    mde.set_status(&action, mde_client::ActionStatus::InProgress);
    // The poller saw it InProgress.
    let mut obj = store.object();
    obj.status.as_mut().unwrap().action_status = Some("InProgress".into());
    let store = ScriptedStore::new(obj);
    let status = drive_to_final(&mde, &store).await;
    assert_eq!(mde.cancels_for(&action), 0);
    assert_eq!(status.phase, Some(Phase::InProgress));
    let notes = store.notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].reason, super::status::Reason::CancelTooLate);
}

/// Two workers holding one resourceVersion: only one cancel leaves.
#[tokio::test]
async fn two_workers_cannot_both_cancel() {
    let mde = FakeMde::default();
    let store = pending_and_annotated(&mde).await;
    let obj = store.object();
    let (settings, metrics) = (settings(), Metrics::default());
    let (a, b) = (OffboardState::default(), OffboardState::default());
    let ports = |state| Ports {
        mde: &mde,
        store: &store,
        state,
        settings: &settings,
        metrics: &metrics,
    };
    let first = step(&obj, &ports(&a)).await;
    let second = step(&obj, &ports(&b)).await;
    assert!(first.is_ok());
    assert!(matches!(second, Err(Error::Conflict)), "{second:?}");
    let action = obj.status.unwrap().machine_action_id.unwrap();
    assert_eq!(mde.cancels_for(&action), 1);
}

/// A slot taken and given back unsent (here the intent write lost a race)
/// returns to the budget, and the resource keeps its place in the queue: sent
/// to the back, its slot would stay unused until every waiter behind it had
/// gone, which at MDE's hourly limit means the next hour.
#[tokio::test]
async fn a_slot_given_back_unsent_keeps_its_place_in_the_queue() {
    let mde = FakeMde::default();
    let store = ScriptedStore::new(resource(None));
    store.fail_write(1, FailWith::Conflict);
    let (settings, metrics, state) = (settings(), Metrics::default(), OffboardState::default());
    let tenant = mde.account().clone();
    let place = |key| {
        state
            .budget_queues
            .place(&tenant, key, tokio::time::Instant::now())
    };
    assert_eq!(place(UID), 0);
    assert_eq!(place("queued-after"), 1);
    let full = mde.budget().remaining(ApiFamily::Offboard);
    let ports = Ports {
        mde: &mde,
        store: &store,
        state: &state,
        settings: &settings,
        metrics: &metrics,
    };
    let step_result = step(&store.object(), &ports).await;
    assert!(step_result.is_err(), "the intent write fails");
    assert_eq!(mde.posts_for(UID), 0, "nothing was sent");
    assert_eq!(mde.budget().remaining(ApiFamily::Offboard), full);
    assert_eq!(
        place("queued-after"),
        1,
        "the resource is still ahead of the one queued after it"
    );
    assert_eq!(place(UID), 0);
}

/// A deleted Node's resource past its grace, and a Node of the same name
/// registered again (a kubelet re-registering after `kubectl delete node`).
#[tokio::test]
async fn a_deleted_node_that_came_back_is_never_offboarded() {
    let mde = FakeMde::default();
    let mut obj = test_kit::offboard("aks-pool-1")
        .device_name("aks-pool-1")
        .comment("node deleted")
        .namespace("it")
        .uid(UID)
        .generation(1)
        .created(Timestamp::now() - jiff::SignedDuration::from_secs(3600))
        .build();
    obj.spec.node = Some(crate::crd::NodeIdentity {
        name: "aks-pool-1".into(),
        uid: "old-node-uid".into(),
        provider_id: None,
        system_uuid: None,
    });
    let store = ScriptedStore::new(obj);
    let mut back = k8s_openapi::api::core::v1::Node::default();
    back.metadata.name = Some("aks-pool-1".into());
    back.metadata.uid = Some("new-node-uid".into());
    store.add_node(back);
    let (status, errors) = drive(&mde, &store).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(status.phase, Some(Phase::Failed));
    assert_eq!(status.last_error.unwrap().code, "NodeReturned");
    assert_eq!(mde.calls(), 0, "not even the name was looked up");
    assert_eq!(mde.posts_for_machine(MACHINE), 0);
}

/// A resource found `Submitting` that was begun in another tenant (its
/// connection was made again under its name for this one): it stops. No
/// lookup could prove absence here, and nothing is sent here.
#[tokio::test]
async fn a_resource_begun_in_another_tenant_sends_nothing_to_this_one() {
    let mde = FakeMde::default();
    let here = crate::crd::StatusTenant::from(mde.account());
    let began = crate::crd::StatusTenant {
        tenant_id: "00000000-0000-4000-8000-0000000000bb".into(),
        ..here.clone()
    };
    let crashed = DeviceOffboardStatus {
        phase: Some(Phase::Submitting),
        machine_id: Some(MACHINE.into()),
        attempts: Some(1),
        submitted_at: Some(Time(Timestamp::now())),
        tenant: Some(began.clone()),
        ..Default::default()
    };
    let store = ScriptedStore::new(resource(Some(crashed)));
    let (status, errors) = drive(&mde, &store).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(status.phase, Some(Phase::Failed));
    assert_eq!(status.last_error.unwrap().code, "ConnectionChanged");
    assert_eq!(
        status.tenant,
        Some(began),
        "the tenant it was begun in is kept"
    );
    assert_eq!(mde.posts_for(UID), 0, "nothing sent to the new tenant");
    assert_eq!(mde.calls(), 0, "not even a lookup there");
    // The same resource begun here goes on and sends once.
    let fresh = ScriptedStore::new(resource(None));
    let (status, _) = drive(&mde, &fresh).await;
    assert_eq!(status.tenant, Some(here));
    assert_eq!(mde.posts_for(UID), 1);
}
