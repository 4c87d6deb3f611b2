//! One offboard per machine across resources, as a tenant's real inventory
//! tests it: several resources for one machine, a send of unknown outcome,
//! a machine offboarded long ago and onboarded again, an action another
//! request created, a read budget nearly spent. POSTs and cancels are
//! counted at the fake MDE per machine and per action.

use super::decision::Settings;
use super::fakes::{FailWith, FakeMde, ScriptedStore, Send, on_tokio_time};
use super::ports::MdeCalls;
use super::state::OffboardState;
use super::step::{Ports, record_poll, step};
use crate::crd::{CANCEL_ANNOTATION, CancelState, DeviceOffboard, DeviceOffboardStatus, Phase};
use crate::metrics::Metrics;
use crate::test_kit;
use jiff::SignedDuration;
use mde_client::{ActionStatus, MdeError, RateLimits, comment_with_marker};
use std::time::Duration;

const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const LOOKUP_DELAY: Duration = Duration::from_secs(35);
/// The index covers the rule's window, as the runtime sets it.
const WINDOW: Duration = super::decision::DEFAULT_ADOPT_WINDOW;

fn settings() -> Settings {
    Settings {
        lookup_delay: LOOKUP_DELAY,
        retry_backoff: Duration::from_secs(1),
        access_backoff: Duration::from_secs(60),
        ..Settings::default()
    }
}

fn request(n: u32) -> DeviceOffboard {
    builder(n).build()
}

fn builder(n: u32) -> test_kit::OffboardBuilder {
    test_kit::offboard(&format!("laptop-{n}"))
        .machine_id(MACHINE)
        .comment("returned")
        .namespace(if n.is_multiple_of(2) {
            "it"
        } else {
            "pipelines"
        })
        .uid(&format!("6f1c1a52-2222-4a4a-9c9c-00000000000{n}"))
        .generation(1)
}

/// A process's state on tokio's clock, with the adopt index on or off.
fn process(index: bool) -> OffboardState {
    let state = on_tokio_time();
    if index {
        state.adopt.use_window(WINDOW);
    }
    state
}

struct World<'a> {
    mde: &'a FakeMde,
    state: &'a OffboardState,
    settings: Settings,
    metrics: Metrics,
}

impl<'a> World<'a> {
    fn new(mde: &'a FakeMde, state: &'a OffboardState) -> Self {
        World {
            mde,
            state,
            settings: settings(),
            metrics: Metrics::default(),
        }
    }
}

impl World<'_> {
    fn ports<'b>(&'b self, store: &'b ScriptedStore) -> Ports<'b, FakeMde, ScriptedStore> {
        Ports {
            mde: self.mde,
            store,
            state: self.state,
            settings: &self.settings,
            metrics: &self.metrics,
        }
    }

    /// One step of the resource `store` holds; the requeue (1 s when none).
    async fn step(&self, store: &ScriptedStore) -> Duration {
        match step(&store.object(), &self.ports(store)).await {
            Ok(requeue) => requeue.unwrap_or(Duration::from_secs(1)),
            Err(_) => Duration::from_secs(1),
        }
    }

    /// Step until `done` holds for the status, within `limit` of tokio time.
    async fn until(
        &self,
        store: &ScriptedStore,
        limit: Duration,
        done: impl Fn(&DeviceOffboardStatus) -> bool,
    ) -> DeviceOffboardStatus {
        let started = tokio::time::Instant::now();
        loop {
            let status = store.object().status.unwrap_or_default();
            if done(&status) {
                return status;
            }
            assert!(
                started.elapsed() <= limit,
                "not done within {limit:?}: {status:?}"
            );
            let wait = self.step(store).await;
            tokio::time::advance(wait.clamp(Duration::from_millis(10), Duration::from_secs(5)))
                .await;
        }
    }
}

fn recorded(status: &DeviceOffboardStatus) -> bool {
    status.machine_action_id.is_some() || status.phase.is_some_and(Phase::is_terminal)
}

/// Item 5: a send whose answer was lost keeps the machine claimed. Another
/// resource for the machine in the same process, with a fresh adopt index
/// read before that send, must neither send at once nor trust the index:
/// it waits out the list's lag, reads the machine's list and adopts.
#[tokio::test(start_paused = true)]
async fn a_send_of_unknown_outcome_keeps_its_machine_from_a_second_post() {
    for lost in [
        "answer lost",
        "record write failed",
        "resource deleted mid-send",
    ] {
        let mde = FakeMde::default().list_lag(Duration::from_secs(20));
        if lost == "answer lost" {
            mde.push_send(Send::CreateThenFail(MdeError::OutcomeUnknown {
                reason: "timed out".into(),
            }));
        }
        let state = process(true);
        let world = World::new(&mde, &state);
        let first = ScriptedStore::new(request(1));
        if lost != "answer lost" {
            // Write 1 is the intent, write 2 the record of the action.
            first.fail_write(2, FailWith::Crash);
        }
        world.step(&first).await;
        assert_eq!(mde.posts_for_machine(MACHINE), 1, "{lost}");
        // The index is fresh (read just before that send) and shows nothing.
        // The second comes through a DefenderConnection of its namespace to
        // the same tenant: the same machine, the same claim.
        let second = ScriptedStore::new(builder(2).connection(Some("contoso")).build());
        let status = world
            .until(&second, Duration::from_secs(120), recorded)
            .await;
        assert_eq!(
            mde.posts_for_machine(MACHINE),
            1,
            "{lost}: a second POST while the first may have created an action"
        );
        assert_eq!(
            status.adopted_from.as_deref(),
            request(1).metadata.uid.as_deref()
        );
        assert!(mde.double_posts().is_empty(), "{lost}");
    }
}

/// Item 3: another request's `Succeeded` offboard stands for the machine
/// only if MDE has not seen the machine since; a machine onboarded again is
/// offboarded again. Same history, same outcome, with the adopt index on or
/// off (and whether or not the old action is inside the index's window).
#[tokio::test(start_paused = true)]
async fn an_old_offboard_stands_only_for_a_machine_not_seen_since_whatever_the_index() {
    struct Row {
        name: &'static str,
        /// How long ago the old offboard was created and ended.
        days_ago: i64,
        /// Whether MDE saw the machine after it ended.
        seen_since: bool,
        posts: u32,
    }
    let rows = [
        Row {
            name: "recent, not seen since: adopted",
            days_ago: 3,
            seen_since: false,
            posts: 0,
        },
        Row {
            name: "recent, onboarded again: sent",
            days_ago: 3,
            seen_since: true,
            posts: 1,
        },
        Row {
            name: "months ago, onboarded again: sent",
            days_ago: 90,
            seen_since: true,
            posts: 1,
        },
        Row {
            name: "months ago, not seen since: adopted",
            days_ago: 90,
            seen_since: false,
            posts: 0,
        },
        Row {
            name: "beyond MDE's 180 days and the adopt window: sent",
            days_ago: 200,
            seen_since: false,
            posts: 1,
        },
    ];
    for row in rows {
        for index in [true, false] {
            let mde = FakeMde::default();
            let ended = mde.now() - SignedDuration::from_hours(24 * row.days_ago);
            mde.insert_at(
                MACHINE,
                &comment_with_marker("retired", "uid-of-an-old-request"),
                ActionStatus::Succeeded,
                ended - SignedDuration::from_hours(1),
                ended,
            );
            let seen = if row.seen_since {
                ended + SignedDuration::from_hours(24)
            } else {
                ended - SignedDuration::from_hours(2)
            };
            mde.last_seen(MACHINE, seen);
            let state = process(index);
            let world = World::new(&mde, &state);
            let store = ScriptedStore::new(request(1));
            let status = world.until(&store, Duration::from_secs(60), recorded).await;
            assert_eq!(
                mde.posts_for_machine(MACHINE),
                row.posts,
                "{} (index {index})",
                row.name
            );
            let adopted = status.adopted_from.as_deref() == Some("uid-of-an-old-request");
            assert_eq!(adopted, row.posts == 0, "{} (index {index})", row.name);
            if adopted {
                assert_eq!(status.phase, Some(Phase::Succeeded));
            }
        }
    }
}

/// Item 2: a process starts with a large adopt window (four pages of
/// actions) and the read budget nearly spent. The first fill cannot get its
/// pages: it keeps what it read, the machine is read exactly, and the first
/// send starts within a minute, not never.
#[tokio::test(start_paused = true)]
async fn a_first_fill_short_of_read_budget_falls_back_to_the_exact_read() {
    let limits: RateLimits = "3/1m".parse().unwrap();
    let mde = FakeMde::default().limits(limits);
    let old = mde.now() - SignedDuration::from_hours(24);
    for n in 0..35_000u32 {
        let machine = format!("{n:040x}");
        mde.insert_at(
            &machine,
            &comment_with_marker("retired", &format!("uid-{n}")),
            ActionStatus::Succeeded,
            old,
            old,
        );
    }
    let state = process(true);
    let world = World::new(&mde, &state);
    let store = ScriptedStore::new(request(1));
    let started = tokio::time::Instant::now();
    world
        .until(&store, Duration::from_secs(600), recorded)
        .await;
    let waited = started.elapsed();
    assert_eq!(mde.posts_for_machine(MACHINE), 1);
    assert!(
        waited <= Duration::from_secs(60),
        "the first send started after {waited:?}"
    );
}

/// Item 6: only the request whose marker created an action cancels it,
/// once per action; an adopter's annotation cancels nothing; and when the
/// owner cancels, an adopter (a Node-path resource, say) sends its own.
#[tokio::test(start_paused = true)]
async fn a_cancel_is_per_action_and_only_its_creator_sends_it() {
    let mde = FakeMde::default();
    let state = process(true);
    let world = World::new(&mde, &state);
    let owner = ScriptedStore::new(request(1));
    let owned = world.until(&owner, Duration::from_secs(60), recorded).await;
    let action = owned.machine_action_id.clone().unwrap();
    let adopter = ScriptedStore::new(request(2));
    let adopted = world
        .until(&adopter, Duration::from_secs(60), recorded)
        .await;
    assert_eq!(adopted.machine_action_id.as_deref(), Some(action.as_str()));
    assert_eq!(mde.posts_for_machine(MACHINE), 1);

    // Both annotated: the adopter sends nothing, the owner one cancel.
    let annotated = |store: &ScriptedStore| {
        let mut obj = store.object();
        obj.metadata
            .annotations
            .get_or_insert_default()
            .insert(CANCEL_ANNOTATION.into(), "wrong device".into());
        ScriptedStore::new(obj)
    };
    let adopter = annotated(&adopter);
    let status = world
        .until(&adopter, Duration::from_secs(30), |s| s.cancel.is_some())
        .await;
    assert_eq!(status.cancel.unwrap().state, CancelState::NotOwner);
    assert_eq!(mde.cancels_for(&action), 0, "an adopter cancels nothing");
    let owner = annotated(&owner);
    let status = world
        .until(&owner, Duration::from_secs(30), |s| {
            s.phase.is_some_and(Phase::is_terminal)
        })
        .await;
    assert_eq!(status.action_status.as_deref(), Some("Cancelled"));
    world.step(&adopter).await;
    assert_eq!(mde.cancels_for(&action), 1, "one cancel for one action");
}

/// Item 6, the Node path: a resource that adopted a user's action does not
/// end cancelled when the user cancels theirs: it offboards the device.
#[tokio::test(start_paused = true)]
async fn an_adopter_whose_action_its_owner_cancelled_sends_its_own() {
    let mde = FakeMde::default();
    let state = process(true);
    let world = World::new(&mde, &state);
    let user = ScriptedStore::new(request(1));
    let sent = world.until(&user, Duration::from_secs(60), recorded).await;
    let action = sent.machine_action_id.unwrap();
    let node_path = ScriptedStore::new(request(2));
    world
        .until(&node_path, Duration::from_secs(60), recorded)
        .await;
    mde.set_status(&action, ActionStatus::Cancelled);
    let cancelled = mde.get_machine_action(&action).await.unwrap();
    record_poll(&world.ports(&node_path), &node_path.object(), &cancelled)
        .await
        .unwrap();
    let status = world
        .until(&node_path, Duration::from_secs(120), |s| {
            s.machine_action_id.as_deref().is_some_and(|a| a != action)
                || s.phase.is_some_and(Phase::is_terminal)
        })
        .await;
    assert_ne!(status.phase, Some(Phase::Failed), "{status:?}");
    assert_eq!(status.adopted_from, None);
    assert_eq!(mde.posts_for_machine(MACHINE), 2);
    assert!(mde.double_posts().is_empty(), "{:?}", mde.double_posts());
}

/// Item 8: a `nextRetryAt` a replica with a skewed clock wrote (here two
/// hours ahead) does not hold the resource after a failover: the new leader
/// plans it against its own budget, which has room, and sends.
#[tokio::test(start_paused = true)]
async fn a_retry_time_another_replica_wrote_does_not_hold_a_resource_after_failover() {
    let mde = FakeMde::default();
    let state = process(true);
    let world = World::new(&mde, &state);
    let skewed = jiff::Timestamp::now() + SignedDuration::from_hours(2);
    let waiting = DeviceOffboardStatus {
        phase: Some(Phase::Pending),
        machine_id: Some(MACHINE.into()),
        next_retry_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(skewed)),
        ..Default::default()
    };
    let store = ScriptedStore::new(builder(1).status(Some(waiting)).build());
    world.until(&store, Duration::from_secs(60), recorded).await;
    assert_eq!(mde.posts_for_machine(MACHINE), 1);
}

/// Item 8: while one worker refreshes a tenant's adopt index (a slow read),
/// another worker for that tenant does not wait on it holding an offboard
/// slot and a controller worker: it gives the slot back and looks again
/// shortly, so other tenants' resources are never stalled behind it.
#[tokio::test(start_paused = true)]
async fn a_worker_never_waits_on_another_workers_index_refresh() {
    use crate::tenants::TenantClient;
    let mde = FakeMde::default();
    let state = process(true);
    let world = World::new(&mde, &state);
    let refreshing = state
        .adopt
        .try_refreshing(&mde.account().tenant_only())
        .expect("no one refreshes yet");
    let slots = mde.budget().remaining(mde_client::ApiFamily::Offboard);
    let store = ScriptedStore::new(request(1));
    let requeue = tokio::time::timeout(Duration::from_secs(1), world.step(&store))
        .await
        .expect("the step does not wait for the other worker's refresh");
    assert!(requeue <= Duration::from_secs(1), "{requeue:?}");
    assert_eq!(
        mde.budget().remaining(mde_client::ApiFamily::Offboard),
        slots,
        "the offboard slot went back"
    );
    assert_eq!(mde.posts_for_machine(MACHINE), 0);
    drop(refreshing);
    world.until(&store, Duration::from_secs(30), recorded).await;
    assert_eq!(mde.posts_for_machine(MACHINE), 1);
}
