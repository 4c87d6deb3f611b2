//! The fault matrix of docs/reliability.md, in process: the real controller
//! against the in-memory Kubernetes API and a simulator that misbehaves one
//! way per row (MDE time-scaled ×60 unless a row says otherwise). Every row
//! asserts what a user relies on: no resource lost, every resource final, at
//! most one offboard POST per machine unless a read after the earlier one
//! showed nothing stands for the machine (counted at the simulator, per
//! machine whatever the resources: `unproven_offboard_requests_by_machine`),
//! no machine offboarded again while an earlier offboard of it stands, and
//! at most one cancel POST per action. Rows add checks of their own.
//!
//! `cargo test --test it fault_matrix -- --nocapture` prints the table.

use crate::common::*;
use crate::controller::{Env, start_with};
use defender_offboard::crd::{CANCEL_ANNOTATION, DeviceOffboard, DeviceOffboardSpec, Phase};
use defender_offboard::mde::comment_with_marker;
use defender_offboard::metrics::Metrics;
use defender_offboard::operator::cache::final_label::FINAL_LABEL;
use defender_offboard::operator::offboard::decision::Settings;
use defender_offboard::simulator::{
    BulkHistory, FaultConfig, LostResponseMode, MachineHistory, PastOffboard,
    PendingConflictWording, PriorCalls, SimConfig, SimStats,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const RESOURCES: usize = 40;
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Where the rows that use a second namespace put its resources.
const OTHER_NAMESPACE: &str = "team-b";

struct Row {
    name: &'static str,
    /// What the row disturbs: its "must have disturbed" check keys on it.
    scenario: Scenario,
    /// Resources applied (deleted ones included).
    resources: usize,
    seconds: f64,
    stats: SimStats,
    lost: usize,
    all_final: bool,
    /// Status writes the controller lost to a concurrent writer (409);
    /// `None` for a controller started with flags the observed one lacks.
    conflicts: Option<u64>,
    /// Watches the API server ended with an in-stream `410 Expired`.
    watches_expired: u64,
    /// What the row's disturbance did, counted (its "must have disturbed").
    disturbed: u64,
    /// What the row's own checks found wrong.
    failures: Vec<String>,
    /// Figures of its own, printed under the table.
    notes: Vec<String>,
}

/// The faults one row injects.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    Calm,
    ServerErrors,
    LostAnswers(LostResponseMode),
    ListLag,
    SecondClient,
    Quirks,
    TwoPerMachine,
    RecreatedMidFlight,
    LoginOutage,
    StatusConflicts,
    WatchExpiry,
    /// Item 1: applied carrying the final label (copies of finished
    /// resources), and the label put on a quarter of the others mid-flight.
    FinalLabelled,
    /// Item 3: machines offboarded long ago by other requests, half of them
    /// onboarded again since; with the adopt index on or off.
    PastOffboards {
        index: bool,
    },
    /// Item 5: four resources for each machine under lost answers, unknown
    /// outcomes and list lag, one of each four deleted mid-send.
    SharedMachines,
    /// Item 6: cancels of adopted actions, of own ones, and of one action by
    /// both resources that share it.
    CancelAdopted,
    /// Item 2: the hourly read budget nearly spent by the process before,
    /// and 25,000 offboards in a 30-day adopt window (three pages of $top).
    SpentReads,
}

/// MDE's own limits, for the row that runs in MDE's time.
const MDE_LIMITS: &str = "100/60s,1500/3600s";

/// Machines of the past-offboards row: re-onboarded ones first, then those
/// still offboarded, each offboarded 60 or 3 days ago by another request.
const PAST_MACHINES: usize = 20;

fn past_machine(i: usize) -> String {
    format!("5a57{i:036x}")
}

fn re_onboarded(i: usize) -> bool {
    i < PAST_MACHINES / 2
}

/// Alternately 60 days (outside the default 7-day adopt window) and 3 days.
fn past_age(i: usize) -> Duration {
    if i.is_multiple_of(2) {
        60 * DAY
    } else {
        3 * DAY
    }
}

fn past_offboards() -> Vec<MachineHistory> {
    (0..PAST_MACHINES)
        .map(|i| {
            let offboard = PastOffboard::succeeded(
                comment_with_marker("retired", &format!("an-earlier-request-{i}")),
                past_age(i),
            );
            let ended = past_age(i) - offboard.took;
            MachineHistory {
                machine_id: past_machine(i),
                // Seen an hour ago (onboarded again), or a minute before it ended.
                last_seen_ago: if re_onboarded(i) {
                    Duration::from_secs(3600)
                } else {
                    ended + Duration::from_secs(60)
                },
                offboards: vec![offboard],
            }
        })
        .collect()
}

fn sim_config(scenario: Scenario) -> SimConfig {
    let faults = match scenario {
        Scenario::ServerErrors => FaultConfig {
            error_rate: 0.3,
            ..FaultConfig::default()
        },
        Scenario::LostAnswers(mode) => FaultConfig {
            lost_response_rate: 0.3,
            lost_response_mode: mode,
            ..FaultConfig::default()
        },
        // A minute of lag in MDE's time (one second here), with lost answers
        // so that lookups must wait it out.
        Scenario::ListLag => FaultConfig {
            list_lag: Duration::from_secs(60),
            lost_response_rate: 0.3,
            ..FaultConfig::default()
        },
        Scenario::Quirks => FaultConfig {
            nulls: true,
            pending_conflict_wording: PendingConflictWording::MessageOnly,
            list_404_rate: 0.2,
            lost_response_rate: 0.2,
            ..FaultConfig::default()
        },
        // Every MDE call takes 0.2 s, so another writer has time to change a
        // resource between the controller's intent write and its record write.
        Scenario::StatusConflicts => FaultConfig {
            latency: Duration::from_secs(12),
            ..FaultConfig::default()
        },
        // Lost answers (both ways), 5xx before MDE acts (an unknown outcome to
        // the controller), a minute of list lag, and 0.1 s a call so that a
        // resource can be deleted while its POST is on its way. Half the
        // answers to the row's ten or so created actions are lost: at 0.3,
        // about one run in 35 lost none and the row proved nothing.
        Scenario::SharedMachines => FaultConfig {
            lost_response_rate: 0.5,
            lost_response_mode: LostResponseMode::Mixed,
            error_rate: 0.1,
            list_lag: Duration::from_secs(60),
            latency: Duration::from_secs(6),
            ..FaultConfig::default()
        },
        _ => FaultConfig::default(),
    };
    let base = SimConfig {
        machines: 100,
        faults,
        ..fast_sim_config()
    };
    match scenario {
        Scenario::PastOffboards { .. } => SimConfig {
            history: past_offboards(),
            ..base
        },
        // Five simulated minutes Pending: time to adopt and cancel.
        Scenario::CancelAdopted => SimConfig {
            pending_for: Duration::from_secs(300),
            in_progress_for: Duration::from_secs(60),
            unsuccessful_share: 0.0,
            ..base
        },
        // MDE's own time: at ×60 a `Retry-After` of one whole second is a
        // simulated minute, and the reads the process before made would
        // leave the window 25 at a time.
        Scenario::SpentReads => SimConfig {
            time_scale: 1.0,
            rate_limits: defender_offboard::simulator::parse_rate_limits(MDE_LIMITS)
                .unwrap()
                .0,
            pending_for: Duration::from_secs(2),
            in_progress_for: Duration::from_secs(2),
            // 1,499 reads in the last hour, one every 2.4 s: one left now, and
            // one more each time the oldest leaves.
            prior_calls: vec![PriorCalls {
                family: "machineactions".into(),
                calls: 1499,
                over: Duration::from_secs(3600),
            }],
            bulk_history: BulkHistory {
                offboards: 25_000,
                span: 30 * DAY,
                marked: true,
            },
            ..base
        },
        _ => base,
    }
}

/// The controller's settings and the flags the observed controller lacks.
struct ControllerSetup {
    settings: Settings,
    limits: &'static str,
    /// The adopt index's window (`--adopt-window`); `None`: the default.
    index_window: Option<Duration>,
}

fn controller_setup(scenario: Scenario) -> ControllerSetup {
    // The lookup delay must exceed MDE's list lag (one second here).
    let settings = Settings {
        lookup_delay: Duration::from_millis(1500),
        ..fast_settings()
    };
    match scenario {
        Scenario::PastOffboards { index: false } => ControllerSetup {
            settings,
            limits: FAST_LIMITS,
            index_window: Some(Duration::ZERO),
        },
        Scenario::SpentReads => ControllerSetup {
            settings: Settings {
                adopt_window: 30 * DAY,
                ..settings
            },
            limits: MDE_LIMITS,
            index_window: Some(30 * DAY),
        },
        _ => ControllerSetup {
            settings,
            limits: FAST_LIMITS,
            index_window: None,
        },
    }
}

/// The environment of a row: the observed controller when the defaults do,
/// else one started with the row's flags (its metrics are not read).
async fn start_row(scenario: Scenario) -> (Env, bool) {
    let setup = controller_setup(scenario);
    let config = sim_config(scenario);
    let Some(window) = setup.index_window else {
        return (start_with(config, setup.settings).await, true);
    };
    let sim = spawn_sim(config).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let controller = defender_offboard::playground::embedded_controller_with(
        client.clone(),
        &sim,
        setup.limits.parse().unwrap(),
        setup.settings,
        Duration::from_millis(300),
        |run| run.adopt_window = window,
    )
    .unwrap();
    let env = Env {
        _api: api,
        sim,
        client,
        controller: tokio::spawn(controller),
        metrics: Arc::new(Metrics::default()),
    };
    (env, false)
}

/// One resource a row applies.
#[derive(Clone, Debug)]
struct Target {
    namespace: &'static str,
    name: String,
    machine: String,
    /// Applied carrying `defender.offboard.dev/final: "true"`.
    final_label: bool,
}

impl Target {
    fn new(name: String, machine: &str) -> Target {
        Target {
            namespace: "default",
            name,
            machine: machine.to_owned(),
            final_label: false,
        }
    }
}

async fn apply(client: &kube::Client, target: &Target) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), target.namespace);
    let spec = DeviceOffboardSpec {
        machine_id: Some(target.machine.clone()),
        device_name: None,
        comment: "retired".into(),
        ttl_seconds_after_finished: None,
        connection_ref: None,
        node: None,
    };
    let mut resource = DeviceOffboard::new(&target.name, spec);
    if target.final_label {
        resource.metadata.labels = Some(BTreeMap::from([(
            FINAL_LABEL.to_owned(),
            "true".to_owned(),
        )]));
    }
    api.create(&PostParams::default(), &resource).await.unwrap();
}

/// One resource as listed: where, its phase, its action, its cancel.
#[derive(Clone, Debug)]
struct Listed {
    namespace: String,
    name: String,
    phase: Phase,
    action: Option<String>,
    cancel: Option<defender_offboard::crd::CancelState>,
}

/// Every DeviceOffboard in every namespace.
async fn listed(client: &kube::Client) -> Vec<Listed> {
    let api: Api<DeviceOffboard> = Api::all(client.clone());
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| {
            let status = d.status.unwrap_or_default();
            Listed {
                namespace: d.metadata.namespace.unwrap_or_default(),
                name: d.metadata.name.unwrap_or_default(),
                phase: status.phase.unwrap_or_default(),
                action: status.machine_action_id,
                cancel: status.cancel.map(|c| c.state),
            }
        })
        .collect()
}

fn find<'a>(all: &'a [Listed], namespace: &str, name: &str) -> Option<&'a Listed> {
    all.iter()
        .find(|l| l.namespace == namespace && l.name == name)
}

/// The resources a row applies at its start (the cancel row applies its own
/// as it goes).
fn plan(scenario: Scenario, slug: &str, machines: &[String]) -> Vec<Target> {
    let named = |i: usize, machine: &String| Target::new(format!("{slug}-{i:03}"), machine);
    match scenario {
        // Two resources name each of half as many machines.
        Scenario::TwoPerMachine => machines[..RESOURCES / 2]
            .iter()
            .chain(&machines[..RESOURCES / 2])
            .enumerate()
            .map(|(i, m)| named(i, m))
            .collect(),
        Scenario::FinalLabelled => machines
            .iter()
            .enumerate()
            .map(|(i, m)| Target {
                final_label: true,
                ..named(i, m)
            })
            .collect(),
        Scenario::PastOffboards { .. } => (0..PAST_MACHINES)
            .map(|i| named(i, &past_machine(i)))
            .collect(),
        // Four resources for each of ten machines: `-m{j}-r{k}`.
        Scenario::SharedMachines => (0..RESOURCES)
            .map(|i| {
                let (machine, copy) = (i / 4, i % 4);
                Target::new(format!("{slug}-m{machine}-r{copy}"), &machines[machine])
            })
            .collect(),
        Scenario::CancelAdopted => Vec::new(),
        Scenario::SpentReads => machines[..5]
            .iter()
            .enumerate()
            .map(|(i, m)| named(i, m))
            .collect(),
        _ => machines
            .iter()
            .enumerate()
            .map(|(i, m)| named(i, m))
            .collect(),
    }
}

/// What a row's disturbance did.
#[derive(Default)]
struct Disturbance {
    /// Counted for the row's "must have disturbed" check.
    done: u64,
    /// Resources it deleted for good.
    deleted: usize,
    failures: Vec<String>,
    notes: Vec<String>,
    /// The cancel row's actions.
    cancels: Option<CancelActions>,
}

async fn run_row(name: &'static str, slug: &str, scenario: Scenario) -> Row {
    let (env, observed) = start_row(scenario).await;
    if let Scenario::CancelAdopted = scenario {
        let namespace: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": OTHER_NAMESPACE}}))
                .unwrap();
        Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
    let machines = windows_machines(&client(&env.sim, FAST_LIMITS), RESOURCES).await;
    let started = Instant::now();
    let targets = plan(scenario, slug, &machines);
    for target in &targets {
        apply(&env.client, target).await;
    }
    let stop = stop_flag();
    let deleted = Arc::new(AtomicUsize::new(0));
    let disturbance: Option<tokio::task::JoinHandle<Disturbance>> = match scenario {
        // Another client of the tenant eats the budget: 429 storms, again and again.
        Scenario::SecondClient => {
            let (url, stop) = (env.sim.base_url(), stop.clone());
            Some(tokio::spawn(async move {
                storms(url, stop).await;
                Disturbance::default()
            }))
        }
        // The login host down at the start and again mid-flight, with tokens
        // revoked each time so the controller must sign in during the outage.
        Scenario::LoginOutage => {
            let (url, client) = (env.sim.base_url(), env.client.clone());
            Some(tokio::spawn(async move {
                login_outages(url, client).await;
                Disturbance::default()
            }))
        }
        // Another writer (a GitOps tool, a person with kubectl) changes every
        // resource's labels over and over: status writes race with it.
        Scenario::StatusConflicts => {
            let (client, stop) = (env.client.clone(), stop.clone());
            Some(tokio::spawn(async move {
                touch_labels(client, stop).await;
                Disturbance::default()
            }))
        }
        Scenario::FinalLabelled => Some(tokio::spawn(label_live_ones(env.client.clone()))),
        Scenario::SharedMachines => Some(tokio::spawn(delete_mid_send(
            env.client.clone(),
            targets.clone(),
            deleted.clone(),
            stop.clone(),
        ))),
        Scenario::CancelAdopted => Some(tokio::spawn(cancels(
            env.client.clone(),
            slug.to_owned(),
            machines[..3].to_vec(),
        ))),
        _ => None,
    };
    if let Scenario::RecreatedMidFlight = scenario {
        recreate_some(&env, &targets).await;
    }
    let expected = match scenario {
        Scenario::CancelAdopted => CANCEL_RESOURCES,
        _ => targets.len(),
    };
    // Not a panic on timeout: the row is printed "no" and the assertions
    // below fail with the whole table in view.
    let all_final = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let now = listed(&env.client).await;
            let gone = deleted.load(Ordering::SeqCst);
            if now.len() + gone >= expected && now.iter().all(|l| l.phase.is_terminal()) {
                return true;
            }
            if now.len() + gone < expected && disturbance.as_ref().is_some_and(|t| t.is_finished())
            {
                // What should apply the rest has given up: its failures say why.
                return false;
            }
            if let Scenario::SpentReads = scenario
                && first_post_simulated(&env).is_none_or(|s| s > FIRST_SEND_WITHIN)
                && started.elapsed() > scaled_first_send_deadline()
            {
                // No first send in the time allowed: the row has failed already.
                return false;
            }
            if let Scenario::WatchExpiry = scenario {
                // The API server forgets its watch history and ends open
                // watches: the controller resumes from a version too old,
                // gets 410 Expired and must list again.
                env._api.compact();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or(false);
    if !all_final {
        // What was left, for whoever reads the failure.
        for resource in listed(&env.client).await {
            if !resource.phase.is_terminal() {
                println!("{name}: not final: {resource:?}");
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let done = match disturbance {
        Some(task) => task.await.unwrap_or_else(|e| Disturbance {
            failures: vec![format!("the disturbance panicked: {e}")],
            ..Disturbance::default()
        }),
        None => Disturbance::default(),
    };
    let seconds = started.elapsed().as_secs_f64();
    let present = listed(&env.client).await;
    let lost = (expected - done.deleted).saturating_sub(present.len());
    let stats = env.sim.stats();
    let conflicts = observed.then(|| {
        env.metrics
            .reconcile_errors
            .get_or_create(&defender_offboard::metrics::ErrorLabels {
                error: "conflict".into(),
            })
            .get()
    });
    let watches_expired = watches_expired(&env._api.url()).await;
    let mut failures = done.failures;
    let mut notes = done.notes;
    match scenario {
        Scenario::PastOffboards { .. } => {
            failures.extend(past_offboard_failures(&stats, &present, slug))
        }
        Scenario::CancelAdopted => {
            let (more, note) = cancel_checks(&stats, &done.cancels.unwrap_or_default());
            failures.extend(more);
            notes.push(note);
        }
        Scenario::SpentReads => {
            let first = first_post_simulated(&env);
            notes.push(match first {
                Some(s) => format!("first offboard POST {s:.1} s (MDE's time) after the start"),
                None => "no offboard POST".into(),
            });
            if first.is_none_or(|s| s > FIRST_SEND_WITHIN) {
                failures.push(format!(
                    "the first send did not start within {FIRST_SEND_WITHIN} s of MDE's time: {first:?}"
                ));
            }
        }
        _ => {}
    }
    Row {
        name,
        scenario,
        resources: expected,
        seconds,
        stats,
        lost,
        all_final,
        conflicts,
        watches_expired,
        disturbed: done.done,
        failures,
        notes,
    }
}

/// The item-2 row's bound on its first send, in MDE's (simulated) seconds.
const FIRST_SEND_WITHIN: f64 = 60.0;

/// The item-2 row's bound in wall-clock time, with a little to spare to see it pass.
fn scaled_first_send_deadline() -> Duration {
    let scale = sim_config(Scenario::SpentReads).time_scale;
    Duration::from_secs_f64(FIRST_SEND_WITHIN / scale + 1.0)
}

/// When the simulator received its first offboard POST, in MDE's seconds
/// after it started.
fn first_post_simulated(env: &Env) -> Option<f64> {
    let scale = env.sim.config().time_scale;
    env.sim
        .stats()
        .first_offboard_request_ms
        .map(|ms| ms as f64 / 1000.0 * scale)
}

/// Item 3: a machine onboarded again after its old offboard gets exactly one
/// new POST; one still offboarded gets none and its resource ends
/// `Succeeded` by adoption, whatever the offboard's age and the index.
fn past_offboard_failures(stats: &SimStats, present: &[Listed], slug: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for i in 0..PAST_MACHINES {
        let machine = past_machine(i);
        let posts = stats
            .offboard_requests_by_machine
            .get(&machine)
            .copied()
            .unwrap_or(0);
        let age = past_age(i).as_secs() / DAY.as_secs();
        let resource = find(present, "default", &format!("{slug}-{i:03}"));
        if re_onboarded(i) {
            if posts != 1 {
                failures.push(format!(
                    "onboarded again after an offboard {age} days ago: {posts} POSTs, one wanted"
                ));
            }
        } else if posts != 0 || resource.is_none_or(|r| r.phase != Phase::Succeeded) {
            failures.push(format!(
                "still offboarded by an offboard {age} days ago: {posts} POSTs and {:?}, none and Succeeded wanted",
                resource.map(|r| r.phase)
            ));
        }
    }
    failures
}

/// Resources of the cancel row.
const CANCEL_RESOURCES: usize = 5;

/// Item 6, on three machines: A sends and B (another namespace) adopts,
/// then B asks to cancel: nothing may be sent and A's offboard goes on.
/// A2 sends and asks to cancel: one cancel. C sends, D adopts, both ask:
/// one cancel for the one action.
async fn cancels(client: kube::Client, slug: String, machines: Vec<String>) -> Disturbance {
    let mut out = Disturbance::default();
    let target = |namespace, name: &str, machine: &String| Target {
        namespace,
        ..Target::new(format!("{slug}-{name}"), machine)
    };
    let (a, b) = (
        target("default", "a", &machines[0]),
        target(OTHER_NAMESPACE, "b", &machines[0]),
    );
    let own = target("default", "a2", &machines[1]);
    let (c, d) = (
        target("default", "c", &machines[2]),
        target(OTHER_NAMESPACE, "d", &machines[2]),
    );
    for first in [&a, &own, &c] {
        apply(&client, first).await;
    }
    let a_action = action_of(&client, &a).await;
    let c_action = action_of(&client, &c).await;
    for second in [&b, &d] {
        apply(&client, second).await;
    }
    let b_action = action_of(&client, &b).await;
    let d_action = action_of(&client, &d).await;
    // Each must have adopted, or the row proves nothing.
    if b_action.is_some() && b_action == a_action {
        out.done += 1;
    } else {
        out.failures.push(format!(
            "B did not adopt A's action: {b_action:?} / {a_action:?}"
        ));
    }
    if d_action.is_some() && d_action == c_action {
        out.done += 1;
    } else {
        out.failures.push(format!(
            "D did not adopt C's action: {d_action:?} / {c_action:?}"
        ));
    }
    let own_action = action_of(&client, &own).await;
    for asking in [&b, &own, &c, &d] {
        annotate_cancel(&client, asking, "wrong device").await;
    }
    // Wait for every resource to be final, then read what was sent.
    let finals = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let all = listed(&client).await;
            if all.len() == CANCEL_RESOURCES && all.iter().all(|l| l.phase.is_terminal()) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    out.cancels = Some(CancelActions {
        adopted: a_action,
        own: own_action,
        shared: c_action,
    });
    let Ok(all) = finals else {
        out.failures
            .push("the cancel row's resources did not all end".into());
        return out;
    };
    let phase = |t: &Target| find(&all, t.namespace, &t.name).map(|l| l.phase);
    if phase(&a) != Some(Phase::Succeeded) {
        out.failures.push(format!(
            "A's offboard did not go on after B (which adopted it) asked to cancel: {:?}",
            find(&all, a.namespace, &a.name)
        ));
    }
    out.notes.push(format!(
        "cancel states: B {:?}, A2 {:?}, C {:?}, D {:?}",
        find(&all, b.namespace, &b.name).and_then(|l| l.cancel),
        find(&all, own.namespace, &own.name).and_then(|l| l.cancel),
        find(&all, c.namespace, &c.name).and_then(|l| l.cancel),
        find(&all, d.namespace, &d.name).and_then(|l| l.cancel),
    ));
    out
}

/// The actions of the cancel row, as its resources recorded them.
#[derive(Debug, Default)]
struct CancelActions {
    /// A's, adopted by B, whose cancel B asked for.
    adopted: Option<String>,
    /// A2's own, whose cancel it asked for.
    own: Option<String>,
    /// C's, adopted by D; both asked for its cancel.
    shared: Option<String>,
}

/// The cancel row's checks on what the simulator counted: no cancel for
/// the action B adopted, one each for A2's and the shared one.
fn cancel_checks(stats: &SimStats, actions: &CancelActions) -> (Vec<String>, String) {
    let posts = |action: &Option<String>| {
        action.as_deref().map_or(0, |a| {
            stats
                .cancel_requests_by_action
                .get(&a.to_ascii_lowercase())
                .copied()
                .unwrap_or(0)
        })
    };
    let (adopted, own, shared) = (
        posts(&actions.adopted),
        posts(&actions.own),
        posts(&actions.shared),
    );
    let mut failures = Vec::new();
    if adopted != 0 {
        failures.push(format!(
            "{adopted} cancel POSTs for A's action, asked for only by B, which adopted it"
        ));
    }
    if own != 1 {
        failures.push(format!(
            "{own} cancel POSTs for A2's own action, one wanted"
        ));
    }
    if shared != 1 {
        failures.push(format!(
            "{shared} cancel POSTs for the action C and D share, both asking: one wanted"
        ));
    }
    let note = format!(
        "cancel POSTs: for A's action asked by B (adopted) {adopted}, for A2's own {own}, for the one C and D share {shared}"
    );
    (failures, note)
}

/// The action a resource records, once it has one (10 s at most).
async fn action_of(client: &kube::Client, target: &Target) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let all = listed(client).await;
            if let Some(action) =
                find(&all, target.namespace, &target.name).and_then(|l| l.action.clone())
            {
                return action;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .ok()
}

async fn annotate_cancel(client: &kube::Client, target: &Target, reason: &str) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), target.namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {CANCEL_ANNOTATION: reason}}});
    api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Item 1 mid-flight: once five resources have an action, a person puts the
/// final label on ten that are not final yet (`kubectl label`).
async fn label_live_ones(client: kube::Client) -> Disturbance {
    let mut out = Disturbance::default();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while listed(&client)
            .await
            .iter()
            .filter(|l| l.action.is_some())
            .count()
            < 5
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if ready.is_err() {
        out.failures.push("no five resources got an action".into());
        return out;
    }
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let patch = serde_json::json!({"metadata": {"labels": {FINAL_LABEL: "true"}}});
    for live in listed(&client)
        .await
        .into_iter()
        .filter(|l| !l.phase.is_terminal())
        .take(10)
    {
        if api
            .patch(&live.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .is_ok()
        {
            out.done += 1;
        }
    }
    out.notes.push(format!(
        "final label put on {} resources not final yet",
        out.done
    ));
    out
}

/// Item 5: the first resource of each machine is deleted while its POST may
/// be on its way (`Submitting`), or else once it has an action and is not
/// final; `done` counts the deletions mid-send.
async fn delete_mid_send(
    client: kube::Client,
    targets: Vec<Target>,
    deleted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Disturbance {
    let mut out = Disturbance::default();
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let mut waiting: Vec<&Target> = targets.iter().filter(|t| t.name.ends_with("-r0")).collect();
    let mut mid_flight = 0;
    while !waiting.is_empty() && !stop.load(Ordering::SeqCst) {
        let all = listed(&client).await;
        let mut still = Vec::new();
        for target in waiting {
            let Some(now) = find(&all, target.namespace, &target.name) else {
                continue;
            };
            let sending = now.phase == Phase::Submitting;
            let in_flight = now.action.is_some() && !now.phase.is_terminal();
            if now.phase.is_terminal() {
                continue;
            }
            if (sending || in_flight)
                && api
                    .delete(&target.name, &DeleteParams::default())
                    .await
                    .is_ok()
            {
                deleted.fetch_add(1, Ordering::SeqCst);
                out.deleted += 1;
                if sending {
                    out.done += 1;
                } else {
                    mid_flight += 1;
                }
                continue;
            }
            still.push(target);
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out.notes.push(format!(
        "deleted {} resources while Submitting and {mid_flight} with an action in flight",
        out.done
    ));
    out
}

fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// 429 for a second out of every two, on both families the controller uses.
async fn storms(url: String, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::SeqCst) {
        for family in ["offboard", "machineactions"] {
            let _ = http
                .post(format!("{url}/_sim/throttle"))
                .json(&serde_json::json!({"family": family, "seconds": 1.0}))
                .send()
                .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `devcluster_watch_expired_total` from the API server's `/metrics`.
async fn watches_expired(api_url: &str) -> u64 {
    let text = reqwest::get(format!("{api_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("devcluster_watch_expired_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no devcluster_watch_expired_total in {text}"))
}

/// Revoke every token and take the login host down for 3 s at once; again
/// for 2 s once ten resources have an action.
async fn login_outages(url: String, client: kube::Client) {
    let http = reqwest::Client::new();
    let outage = |seconds: f64| {
        let http = http.clone();
        let url = url.clone();
        async move {
            for (route, body) in [
                ("revoke-tokens", serde_json::json!({})),
                ("token-outage", serde_json::json!({ "seconds": seconds })),
            ] {
                let _ = http
                    .post(format!("{url}/_sim/{route}"))
                    .json(&body)
                    .send()
                    .await;
            }
        }
    };
    outage(3.0).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while listed(&client)
            .await
            .iter()
            .filter(|l| l.action.is_some())
            .count()
            < 10
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    outage(2.0).await;
}

/// Merge-patch a label onto every resource every 20 ms (no resourceVersion:
/// this writer always wins), until stopped.
async fn touch_labels(client: kube::Client, stop: Arc<AtomicBool>) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        for resource in listed(&client).await {
            let patch = serde_json::json!({"metadata": {"labels": {"touched": round.to_string()}}});
            let _ = api
                .patch(
                    &resource.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Once a few are submitted, delete a quarter of the resources and apply them
/// again under the same names (a GitOps prune and re-apply): new uids.
async fn recreate_some(env: &Env, targets: &[Target]) {
    let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");
    with_timeout(30, async {
        while listed(&env.client)
            .await
            .iter()
            .filter(|l| l.action.is_some())
            .count()
            < 5
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for target in targets.iter().take(RESOURCES / 4) {
        api.delete(&target.name, &DeleteParams::default())
            .await
            .unwrap();
        apply(&env.client, target).await;
    }
}

/// Second POSTs for machines (each POST after a machine's first).
fn second_posts(stats: &SimStats) -> u64 {
    stats
        .offboard_requests_by_machine
        .values()
        .map(|n| n.saturating_sub(1))
        .sum()
}

fn unproven(stats: &SimStats) -> u64 {
    stats.unproven_offboard_requests_by_machine.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    let scenarios = [
        ("no faults", Scenario::Calm),
        ("5xx storm (30% of calls)", Scenario::ServerErrors),
        (
            "lost answers, connection dropped (30%)",
            Scenario::LostAnswers(LostResponseMode::Drop),
        ),
        (
            "lost answers, 504 (30%)",
            Scenario::LostAnswers(LostResponseMode::GatewayTimeout),
        ),
        (
            "list lag of 60 s simulated, lost answers",
            Scenario::ListLag,
        ),
        (
            "a second client eating the budget (429 storms)",
            Scenario::SecondClient,
        ),
        (
            "quirks: nulls, pending worded differently, list 404s, lost answers",
            Scenario::Quirks,
        ),
        ("two resources for each machine", Scenario::TwoPerMachine),
        (
            "delete and re-create a quarter mid-flight",
            Scenario::RecreatedMidFlight,
        ),
        (
            "login host down 3 s, then 2 s mid-flight (tokens revoked)",
            Scenario::LoginOutage,
        ),
        (
            "status-write conflicts (another writer patches every resource every 20 ms)",
            Scenario::StatusConflicts,
        ),
        (
            "watch 410 Gone (history compacted every 200 ms)",
            Scenario::WatchExpiry,
        ),
        (
            "applied with the final label, and the label put on ten mid-flight",
            Scenario::FinalLabelled,
        ),
        (
            "offboarded 60 or 3 days ago by other requests, half onboarded again since (adopt index on)",
            Scenario::PastOffboards { index: true },
        ),
        (
            "offboarded 60 or 3 days ago by other requests, half onboarded again since (adopt index off)",
            Scenario::PastOffboards { index: false },
        ),
        (
            "four resources for each machine: lost answers, 5xx, list lag, one of four deleted mid-send",
            Scenario::SharedMachines,
        ),
        (
            "cancel asked by a resource that adopted another's action, by the owner, and by both sharers",
            Scenario::CancelAdopted,
        ),
        (
            "read budget nearly spent by the process before, 25,000 offboards in a 30-day adopt window (MDE's time, ×1)",
            Scenario::SpentReads,
        ),
    ];
    // `FAULT_MATRIX_ROWS=re-create` runs only the rows whose name holds it
    // (to chase one row in a loop); the full matrix runs otherwise. A filter
    // that holds no row's name fails the test, naming the rows.
    let only = std::env::var("FAULT_MATRIX_ROWS").unwrap_or_default();
    // `FAULT_MATRIX_LOG=offboard_operator=debug` prints the controller's log.
    if let Ok(filter) = std::env::var("FAULT_MATRIX_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    // Numbered before filtering: a row keeps its slug whatever else runs.
    let selected: Vec<_> = scenarios
        .iter()
        .enumerate()
        .filter(|(_, (name, _))| name.contains(only.as_str()))
        .collect();
    // A mistyped filter must not pass by running nothing.
    assert!(
        !selected.is_empty(),
        "FAULT_MATRIX_ROWS={only:?} selects no row (a row runs when its name contains the filter); the rows are:\n{}",
        scenarios
            .iter()
            .map(|(name, _)| format!("  {name}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut rows = Vec::new();
    for (row, &(name, scenario)) in selected {
        rows.push(run_row(name, &format!("row{row}"), scenario).await);
    }
    println!(
        "| row | resources | POSTs | actions created | max POSTs per machine | second POSTs for a machine / after a read that showed none | answers lost | 429s | sign-ins refused | status-write conflicts | watches expired (410) | cancel POSTs (max per action) | resources lost | machines offboarded again | all final | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let stats = &row.stats;
        let posts: u64 = stats.offboard_requests_by_machine.values().sum();
        let max = stats
            .offboard_requests_by_machine
            .values()
            .max()
            .copied()
            .unwrap_or(0);
        let seconds = second_posts(stats);
        let cancels: u64 = stats.cancel_requests_by_action.values().sum();
        let max_cancels = stats
            .cancel_requests_by_action
            .values()
            .max()
            .copied()
            .unwrap_or(0);
        println!(
            "| {} | {} | {posts} | {} | {max} | {seconds} / {} | {} | {} | {} | {} | {} | {cancels} ({max_cancels}) | {} | {} | {} | {:.1} s |",
            row.name,
            row.resources,
            stats.actions_created,
            seconds - unproven(stats).min(seconds),
            stats.lost_responses,
            stats.throttled,
            stats.count("token", "503"),
            row.conflicts.map_or("–".to_owned(), |c| c.to_string()),
            row.watches_expired,
            row.lost,
            stats.offboarded_again_by_machine.len(),
            if row.all_final { "yes" } else { "no" },
            row.seconds
        );
    }
    for row in &rows {
        for note in &row.notes {
            println!("- {}: {note}", row.name);
        }
    }
    let mut failed = Vec::new();
    for row in &rows {
        let stats = &row.stats;
        let mut fail = |what: String| failed.push(format!("{}: {what}", row.name));
        if row.lost != 0 {
            fail(format!("{} resources lost", row.lost));
        }
        if !row.all_final {
            fail("not all final".into());
        }
        if !stats.unproven_offboard_requests_by_machine.is_empty() {
            fail(format!(
                "offboard POSTs for a machine after an earlier one, with no read in between showing none: {:?}",
                stats.unproven_offboard_requests_by_machine
            ));
        }
        if !stats.offboarded_again_by_machine.is_empty() {
            fail(format!(
                "machines offboarded again while an earlier offboard of theirs stood: {:?}",
                stats.offboarded_again_by_machine
            ));
        }
        if let Some((action, n)) = stats
            .cancel_requests_by_action
            .iter()
            .find(|(_, n)| **n > 1)
        {
            fail(format!("{n} cancel POSTs for action {action}"));
        }
        for failure in &row.failures {
            fail(failure.clone());
        }
        // The disturbing rows must have disturbed: otherwise they prove nothing.
        let disturbed = match row.scenario {
            Scenario::LoginOutage => stats.count("token", "503") > 0,
            Scenario::StatusConflicts => row.conflicts.is_some_and(|c| c > 0),
            Scenario::WatchExpiry => row.watches_expired > 0,
            Scenario::ServerErrors => {
                stats.count("offboard", "500") + stats.count("offboard", "503") > 0
            }
            Scenario::LostAnswers(_) | Scenario::ListLag | Scenario::Quirks => {
                stats.lost_responses > 0
            }
            Scenario::FinalLabelled => row.disturbed > 0,
            Scenario::SharedMachines => row.disturbed > 0 && stats.lost_responses > 0,
            // Both adoptions happened (each counted once).
            Scenario::CancelAdopted => row.disturbed == 2,
            // The budget was spent: the process met MDE's 429s.
            Scenario::SpentReads => stats.count("machineactions", "429") > 0,
            // Nothing of their own to count: the calm row disturbs nothing,
            // the second client's 429s depend on timing, the rows that share
            // or re-create resources build that themselves, and the past
            // rows' own checks read the past. A new scenario must pick an arm.
            Scenario::Calm
            | Scenario::SecondClient
            | Scenario::TwoPerMachine
            | Scenario::RecreatedMidFlight
            | Scenario::PastOffboards { .. } => true,
        };
        if !disturbed {
            fail(format!(
                "did not disturb what it is for ({:?})",
                row.scenario
            ));
        }
    }
    assert!(failed.is_empty(), "\n{}", failed.join("\n"));
}
