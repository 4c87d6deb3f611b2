//! Property tests of the exactly-once path.
//!
//! One resource: random interleavings of MDE outcomes (accepted, timeout,
//! reset, 5xx, 429, lost response), lookups that fail or lag, status-write
//! conflicts, crashes between any two steps, restarts and leader changes (a
//! process that remembers nothing), and time passing. Whatever happens:
//! - MDE never holds two offboard actions for the machine;
//! - a second POST for the key only follows a POST that failed ambiguously
//!   without creating anything (which only a proving lookup may resend), and
//!   at the server no second POST for the machine comes without a proving
//!   read in between;
//! - once MDE answers normally again, the resource ends with its action.
//!
//! Several resources per machine, with the adopt index on: see
//! `several_resources_per_machine_one_post_without_proof_and_all_final` and
//! the invariants above it.

use super::decision::Settings;
use super::fakes::{FailWith, ScriptedStore};
use super::fakes::{FakeMde, Lookup, Send};
use super::fakes::{on_tokio_time, restarted};
use super::ports::MdeCalls;
use super::state::OffboardState;
use super::step::{Ports, record_poll, step};
use crate::crd::{DeviceOffboard, Phase};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::test_kit;
use jiff::Timestamp;
use mde_client::{ActionStatus, ApiFamily, MdeError};
use proptest::prelude::*;
use std::time::Duration;

const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const UID: &str = "6f1c1a52-1111-4a4a-9c9c-00000000000a";
/// MDE's list may lag up to this long; the lookup delay is longer.
const LOOKUP_DELAY: Duration = Duration::from_secs(35);

/// One thing that happens before the next step.
#[derive(Debug, Clone)]
enum Event {
    /// The next POST: accepted, or one of the faults.
    Post(PostOutcome),
    /// The next lookup fails (5xx, or a 404 from a list).
    LookupFails(bool),
    /// The next (or the one after: the record that follows an intent) status
    /// write conflicts, or the process dies before it lands.
    WriteFails { conflict: bool, later: bool },
    /// The process restarts (a crash, a new leader): it remembers nothing.
    Restart,
    /// Time passes.
    Wait(u64),
}

#[derive(Debug, Clone, Copy)]
enum PostOutcome {
    Accepted,
    /// MDE acted, the answer was lost (timeout, reset, 504).
    AnswerLost,
    /// The request timed out or got a 5xx before MDE acted.
    FailedBeforeActing,
    Throttled,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => prop_oneof![
            Just(PostOutcome::Accepted),
            Just(PostOutcome::AnswerLost),
            Just(PostOutcome::FailedBeforeActing),
            Just(PostOutcome::Throttled),
        ]
        .prop_map(Event::Post),
        1 => any::<bool>().prop_map(Event::LookupFails),
        1 => (any::<bool>(), any::<bool>())
            .prop_map(|(conflict, later)| Event::WriteFails { conflict, later }),
        1 => Just(Event::Restart),
        2 => (0u64..60).prop_map(Event::Wait),
    ]
}

fn post(outcome: PostOutcome) -> Send {
    let unknown = |reason: &str| MdeError::OutcomeUnknown {
        reason: reason.into(),
    };
    match outcome {
        PostOutcome::Accepted => Send::Accept,
        PostOutcome::AnswerLost => Send::CreateThenFail(unknown("answer lost")),
        PostOutcome::FailedBeforeActing => Send::Fail(unknown("timed out before MDE acted")),
        PostOutcome::Throttled => Send::Fail(MdeError::Throttled {
            family: ApiFamily::Offboard,
            retry_at: Timestamp::now(),
        }),
    }
}

fn resource() -> DeviceOffboard {
    test_kit::offboard("laptop")
        .machine_id(MACHINE)
        .comment("returned")
        .uid(UID)
        .generation(1)
        .build()
}

/// Run the events, a step after each, then steps until the action is recorded.
async fn run(events: Vec<Event>, list_lag: Duration) -> Result<(), TestCaseError> {
    let mde = FakeMde::default().list_lag(list_lag);
    let store = ScriptedStore::new(resource());
    let settings = Settings {
        lookup_delay: LOOKUP_DELAY,
        retry_backoff: Duration::from_secs(1),
        access_backoff: Duration::from_secs(60),
        ..Settings::default()
    };
    let metrics = Metrics::default();
    let mut state = on_tokio_time();
    let origin = state.clone();
    let step_once = |state: OffboardState| {
        let ports = (&mde, &store, &settings, &metrics);
        async move {
            let (mde, store, settings, metrics) = ports;
            let ports = Ports {
                mde,
                store,
                state: &state,
                settings,
                metrics,
            };
            step(&store.object(), &ports).await
        }
    };
    for event in events {
        match event {
            Event::Post(outcome) => mde.push_send(post(outcome)),
            Event::LookupFails(not_found) => mde.push_lookup(Lookup::Fail(if not_found {
                MdeError::NotFound {
                    message: "a 404 from a list".into(),
                }
            } else {
                MdeError::Unavailable {
                    status: 503,
                    message: "busy".into(),
                }
            })),
            Event::WriteFails { conflict, later } => {
                let with = if conflict {
                    FailWith::Conflict
                } else {
                    FailWith::Crash
                };
                store.fail_write(store.writes() + 1 + u64::from(later), with);
            }
            Event::Restart => state = restarted(&origin),
            Event::Wait(seconds) => tokio::time::advance(Duration::from_secs(seconds)).await,
        }
        if let Err(Error::Kube(_)) = step_once(state.clone()).await {
            // The process died mid-step: the next one remembers nothing.
            state = restarted(&origin);
        }
        tokio::time::advance(Duration::from_millis(200)).await;
    }
    // MDE behaves from now on: the resource must end with its action.
    for _ in 0..100 {
        if store
            .object()
            .status
            .and_then(|s| s.machine_action_id)
            .is_some()
        {
            break;
        }
        let wait = step_once(state.clone()).await.ok().flatten();
        tokio::time::advance(
            wait.unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(10)),
        )
        .await;
    }
    let status = store.object().status.unwrap_or_default();
    prop_assert!(
        status.machine_action_id.is_some(),
        "never recorded: {status:?}"
    );
    prop_assert!(mde.actions_for(MACHINE) <= 1, "two actions at MDE");
    prop_assert!(
        mde.double_posts().is_empty(),
        "a second POST without a proving read: {:?}",
        mde.machine_log(MACHINE)
    );
    prop_assert!(
        mde.posts_for(UID) <= 1 + mde.refused_before_acting(),
        "{} POSTs, but only {} failed before MDE acted",
        mde.posts_for(UID),
        mde.refused_before_acting()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn no_second_post_without_proof_and_always_final(
        events in proptest::collection::vec(event(), 0..24),
        lag in 0u64..30,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(run(events, Duration::from_secs(lag)))?;
    }
}

// Several resources per machine, one MDE and one process at a time: the
// per-machine machinery (claims, the adopt index, "already pending") under
// interleaved steps of the resources, restarts and leader changes between
// any two of them. Whatever happens, at MDE:
// - a second offboard POST for a machine (whichever resource sends it) only
//   follows a read, since the POST before it, that proved MDE held nothing to
//   adopt for the machine (`FakeMde::double_posts`);
// - MDE never holds two live offboards for one machine;
// - once MDE answers normally again, every resource ends `Succeeded`, with an
//   action that offboarded its machine (not one the machine was seen after).

/// The adopt index's window (the default `--adopt-window`).
const ADOPT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a lease lasts from each renewal: a leader that does nothing for
/// longer (a long wait) holds it anew, from then.
const LEASE: Duration = Duration::from_secs(30);
const MACHINES: [&str; 2] = [
    "1a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
    "2a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
];

/// One thing that happens between two steps.
#[derive(Debug, Clone)]
enum Act {
    /// The leader steps resource `n` (modulo their number).
    Step(usize),
    /// The replica that is not the leader steps resource `n`: a leader
    /// frozen past its lease, waking up.
    StaleStep(usize),
    /// The next POST: accepted, or one of the faults.
    Post(PostOutcome),
    /// The next exact read of a machine's actions fails (503, or a 404 from
    /// a list).
    LookupFails(bool),
    /// The next window page fails (503, or a 404).
    PageFails(bool),
    /// A status write of resource `n` (the next, or the one after) conflicts,
    /// or the process dies before it lands.
    WriteFails {
        n: usize,
        conflict: bool,
        later: bool,
    },
    /// The leader restarts: a new process, remembering nothing, wins the lease.
    Restart,
    /// The leader loses the lease and the other replica wins it, with what it
    /// remembered from when it last led.
    LeaderChange,
    /// The poller reads every recorded action and folds it in.
    Poll,
    /// Time passes.
    Wait(u64),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        8 => (0usize..6).prop_map(Act::Step),
        1 => (0usize..6).prop_map(Act::StaleStep),
        3 => prop_oneof![
            Just(PostOutcome::Accepted),
            Just(PostOutcome::AnswerLost),
            Just(PostOutcome::FailedBeforeActing),
            Just(PostOutcome::Throttled),
        ]
        .prop_map(Act::Post),
        1 => any::<bool>().prop_map(Act::LookupFails),
        1 => any::<bool>().prop_map(Act::PageFails),
        1 => (0usize..6, any::<bool>(), any::<bool>())
            .prop_map(|(n, conflict, later)| Act::WriteFails { n, conflict, later }),
        1 => Just(Act::Restart),
        1 => Just(Act::LeaderChange),
        2 => Just(Act::Poll),
        2 => (0u64..60).prop_map(Act::Wait),
    ]
}

/// What MDE and the cluster hold before the first step.
#[derive(Debug, Clone)]
struct World {
    machines: usize,
    per_machine: usize,
    /// MDE's list lag, below the lookup delay.
    lag: u64,
    /// One action (by its number) listed later than the others, still
    /// below the lookup delay.
    spike: Option<(usize, u64)>,
    /// MDE finishes an offboard this long after creating it.
    finish_after: u64,
    /// Read slots already spent in the current minute when the process starts.
    reads_spent: usize,
    /// The first machine has a `Succeeded` offboard of another key from
    /// three months ago; `Some(true)`: it was onboarded again (seen since).
    old_offboard: Option<bool>,
}

fn world() -> impl Strategy<Value = World> {
    (
        1usize..=2,
        2usize..=3,
        0u64..30,
        proptest::option::of((0usize..4, 0u64..35)),
        40u64..600,
        prop_oneof![Just(0usize), 90usize..=100],
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            |(machines, per_machine, lag, spike, finish_after, reads_spent, old_offboard)| World {
                machines,
                per_machine,
                lag,
                spike,
                finish_after,
                reads_spent,
                old_offboard,
            },
        )
}

/// One replica: its memory and its view of the lease.
struct Replica {
    state: OffboardState,
    lease: crate::lease_clock::LeaseClock,
}

impl Replica {
    /// A new process on `base`'s wall clock and adopt window, not leading.
    fn new(base: &OffboardState) -> Self {
        let lease = crate::lease_clock::LeaseClock::candidate();
        Replica {
            state: OffboardState {
                lease: lease.clone(),
                ..restarted(base)
            },
            lease,
        }
    }

    fn lead(&self) {
        self.lease.renewed(tokio::time::Instant::now() + LEASE);
    }
}

fn uid_of(machine: usize, n: usize) -> String {
    format!("6f1c1a52-2222-4a4a-9c9c-{machine:06}{n:06}")
}

/// One MDE, the resources (uid, machine, store), and what every process shares.
struct Many {
    mde: FakeMde,
    resources: Vec<(String, &'static str, ScriptedStore)>,
    machines: &'static [&'static str],
    settings: Settings,
    metrics: Metrics,
    /// The wall clock and adopt window every new process starts with.
    base: OffboardState,
}

impl Many {
    fn new(world: &World) -> Self {
        let mut mde = FakeMde::default()
            .limits("100/60s,1500/3600s".parse().expect("valid limits"))
            .spent(ApiFamily::MachineActions, world.reads_spent)
            .list_lag(Duration::from_secs(world.lag))
            .finish_after(Duration::from_secs(world.finish_after));
        if let Some((nth, lag)) = world.spike {
            mde = mde.lag_spike(nth, Duration::from_secs(lag));
        }
        let machines = &MACHINES[..world.machines];
        if let Some(seen_again) = world.old_offboard {
            let days = |d: i64| mde.now() - jiff::SignedDuration::from_hours(24 * d);
            let comment = "[defender-offboard:6f1c1a52-0000-4a4a-9c9c-000000000000] returned";
            let old = days(90);
            mde.insert_at(machines[0], comment, ActionStatus::Succeeded, old, old);
            mde.last_seen(machines[0], if seen_again { days(30) } else { days(91) });
        }
        let resources = machines
            .iter()
            .enumerate()
            .flat_map(|(m, machine)| (0..world.per_machine).map(move |n| (m, n, *machine)))
            .map(|(m, n, machine)| {
                let uid = uid_of(m, n);
                let resource = test_kit::offboard(&format!("laptop-{m}-{n}"))
                    .namespace(if n % 2 == 0 { "team-a" } else { "team-b" })
                    .machine_id(machine)
                    .comment("returned")
                    .uid(&uid)
                    .generation(1)
                    .build();
                (uid, machine, ScriptedStore::new(resource))
            })
            .collect();
        // Controllers: a new process or leader waits out a predecessor's
        // last send before its first sends (OffboardState::with_lease).
        let mut base = on_tokio_time();
        base.after_predecessor = true;
        base.adopt.use_window(ADOPT_WINDOW);
        Many {
            mde,
            resources,
            machines,
            settings: Settings {
                lookup_delay: LOOKUP_DELAY,
                retry_backoff: Duration::from_secs(1),
                access_backoff: Duration::from_secs(60),
                adopt_window: ADOPT_WINDOW,
                ..Settings::default()
            },
            metrics: Metrics::default(),
            base,
        }
    }

    fn ports<'a>(
        &'a self,
        store: &'a ScriptedStore,
        state: &'a OffboardState,
    ) -> Ports<'a, FakeMde, ScriptedStore> {
        Ports {
            mde: &self.mde,
            store,
            state,
            settings: &self.settings,
            metrics: &self.metrics,
        }
    }

    fn store(&self, n: usize) -> &ScriptedStore {
        &self.resources[n % self.resources.len()].2
    }

    /// A new process: remembers nothing; leads if `leads`.
    fn process(&self, leads: bool) -> Replica {
        let replica = Replica::new(&self.base);
        if leads {
            replica.lead();
        }
        replica
    }

    /// One step of resource `n` by `replica`; a process that died mid-step
    /// comes back as a new one (and leads again if it led).
    async fn step(&self, replica: &mut Replica, n: usize, leads: bool) -> Option<Duration> {
        if leads {
            replica.lead();
        }
        let store = self.store(n);
        let result = step(&store.object(), &self.ports(store, &replica.state)).await;
        if let Err(Error::Kube(_)) = result {
            *replica = self.process(leads);
        }
        result.ok().flatten()
    }

    /// The poller: every recorded action read by id and folded in.
    async fn poll(&self, state: &OffboardState) {
        for (_, _, store) in &self.resources {
            let obj = store.object();
            let Some(id) = obj
                .status
                .as_ref()
                .and_then(|s| s.machine_action_id.clone())
            else {
                continue;
            };
            if let Ok(action) = self.mde.get_machine_action(&id).await {
                // A conflict or a crash: the next poll folds it in.
                let _ = record_poll(&self.ports(store, state), &obj, &action).await;
            }
        }
    }

    fn all_final(&self) -> bool {
        self.resources.iter().all(|(_, _, store)| {
            store
                .object()
                .status
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_terminal)
        })
    }

    /// Each resource's status and each machine's log at MDE.
    fn report(&self) -> String {
        let statuses: Vec<String> = self
            .resources
            .iter()
            .map(|(uid, machine, store)| {
                let s = store.object().status.unwrap_or_default();
                format!(
                    "{uid} on {}: {:?} action {:?} ({:?}), {:?}",
                    &machine[..2],
                    s.phase,
                    s.machine_action_id,
                    s.action_status,
                    s.conditions.last().map(|c| c.reason.clone()),
                )
            })
            .collect();
        let logs: Vec<String> = self
            .machines
            .iter()
            .map(|m| format!("{}: {:?}", &m[..2], self.mde.machine_log(m)))
            .collect();
        format!("\n{}\n{}", statuses.join("\n"), logs.join("\n"))
    }
}

/// A list read that failed: a 404 (which proves nothing from a list) or a 503.
fn list_error(not_found: bool) -> MdeError {
    if not_found {
        MdeError::NotFound {
            message: "a 404 from a list".into(),
        }
    } else {
        MdeError::Unavailable {
            status: 503,
            message: "busy".into(),
        }
    }
}

async fn run_many(world: World, acts: Vec<Act>) -> Result<(), TestCaseError> {
    let many = Many::new(&world);
    let mde = &many.mde;
    let mut replicas = [many.process(true), many.process(false)];
    let mut leader = 0;
    for act in acts {
        match act {
            Act::Step(n) => {
                many.step(&mut replicas[leader], n, true).await;
            }
            Act::StaleStep(n) => {
                many.step(&mut replicas[1 - leader], n, false).await;
            }
            Act::Post(outcome) => mde.push_send(post(outcome)),
            Act::LookupFails(not_found) => mde.push_lookup(Lookup::Fail(list_error(not_found))),
            Act::PageFails(not_found) => mde.push_window_read(Lookup::Fail(list_error(not_found))),
            Act::WriteFails { n, conflict, later } => {
                let with = if conflict {
                    FailWith::Conflict
                } else {
                    FailWith::Crash
                };
                let store = many.store(n);
                store.fail_write(store.writes() + 1 + u64::from(later), with);
            }
            Act::Restart => replicas[leader] = many.process(true),
            Act::LeaderChange => {
                replicas[leader].lease.lost();
                leader = 1 - leader;
                replicas[leader].lead();
            }
            Act::Poll => many.poll(&replicas[leader].state).await,
            Act::Wait(seconds) => tokio::time::advance(Duration::from_secs(seconds)).await,
        }
        tokio::time::advance(Duration::from_millis(200)).await;
    }
    // MDE and the cluster behave from now on, and one leader stays: every
    // resource must end, well within MDE's time to finish.
    mde.behave();
    for (_, _, store) in &many.resources {
        store.heal();
    }
    for _ in 0..600 {
        if many.all_final() {
            break;
        }
        let mut wait = Duration::from_secs(5);
        for n in 0..many.resources.len() {
            if let Some(requeue) = many.step(&mut replicas[leader], n, true).await {
                wait = wait.min(requeue);
            }
        }
        many.poll(&replicas[leader].state).await;
        tokio::time::advance(wait.max(Duration::from_millis(10))).await;
    }
    prop_assert!(
        mde.double_posts().is_empty(),
        "a second POST without a proving read for {:?}{}",
        mde.double_posts(),
        many.report()
    );
    for machine in many.machines {
        prop_assert!(
            mde.most_live_at_once(machine) <= 1,
            "two live offboards of {}{}",
            machine,
            many.report()
        );
    }
    for (uid, _, store) in &many.resources {
        let status = store.object().status.unwrap_or_default();
        prop_assert_eq!(
            status.phase,
            Some(Phase::Succeeded),
            "{} did not end Succeeded{}",
            uid,
            many.report()
        );
        let action = status.machine_action_id.unwrap_or_default();
        prop_assert!(
            mde.offboarded_by(&action),
            "{} ended with {}, which did not offboard its machine (seen again since){}",
            uid,
            action,
            many.report()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        // The minimal failing case is printed; the shared regression file
        // is left to the single-resource test.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn several_resources_per_machine_one_post_without_proof_and_all_final(
        world in world(),
        acts in proptest::collection::vec(act(), 0..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(run_many(world, acts))?;
    }
}

/// The world of the minimal cases the property test shrinks to: one
/// machine, three resources for it, a list that lags 2 s.
fn three_on_one_machine() -> World {
    World {
        machines: 1,
        per_machine: 3,
        lag: 2,
        spike: None,
        finish_after: 40,
        reads_spent: 0,
        old_offboard: None,
    }
}

fn run_case(world: World, acts: Vec<Act>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    if let Err(failed) = runtime.block_on(run_many(world, acts)) {
        panic!("{failed}");
    }
}

/// A resource sends, and the process restarts before MDE lists the action:
/// the new process must not take its first read (the adopt index's fill, or
/// the exact read) for proof that the machine has nothing to adopt, and
/// after an "already pending" it could not list, another resource for the
/// machine must not send too.
#[test]
fn a_restart_within_the_list_lag_sends_no_second_post() {
    run_case(three_on_one_machine(), vec![Act::Step(0), Act::Restart]);
}

/// The same when the other replica takes the lease.
#[test]
fn a_leader_change_within_the_list_lag_sends_no_second_post() {
    run_case(
        three_on_one_machine(),
        vec![Act::Step(0), Act::LeaderChange],
    );
}

/// The same when the process dies on a status write (here the adopting
/// resource's record of the action another resource just sent).
#[test]
fn a_crash_within_the_list_lag_sends_no_second_post() {
    let crash = Act::WriteFails {
        n: 1,
        conflict: false,
        later: false,
    };
    run_case(
        three_on_one_machine(),
        vec![Act::Step(0), crash, Act::Step(1)],
    );
}

/// Found by the property test: a throttled send, then a restart; the new
/// process's heal loop steps every resource of a machine in turn.
#[test]
fn a_throttled_send_then_a_restart_sends_no_second_post() {
    let world = World {
        machines: 2,
        per_machine: 2,
        lag: 0,
        spike: None,
        finish_after: 40,
        reads_spent: 0,
        old_offboard: None,
    };
    run_case(
        world,
        vec![
            Act::Wait(8),
            Act::Step(0),
            Act::Post(PostOutcome::Throttled),
            Act::Wait(27),
            Act::Step(5),
            Act::Step(4),
            Act::Restart,
        ],
    );
}
