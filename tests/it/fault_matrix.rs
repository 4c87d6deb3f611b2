//! The fault matrix of docs/reliability.md, in process: the real controller
//! against the in-memory Kubernetes API and a simulator that misbehaves one
//! way per row (MDE time-scaled ×60). Every row asserts what a user relies on:
//! no resource lost, every resource final, no machine offboarded twice, and no
//! second POST for a key unless the first was refused before MDE acted (the
//! only case where a lookup can prove absence and a resend is right).
//!
//! `cargo test --test it fault_matrix -- --nocapture` prints the table.

use crate::common::*;
use crate::controller::{Env, create, phases, start_with};
use defender_offboard::crd::DeviceOffboard;
use defender_offboard::simulator::{
    FaultConfig, LostResponseMode, PendingConflictWording, SimConfig, SimStats,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use std::time::{Duration, Instant};

const RESOURCES: usize = 40;

struct Row {
    name: &'static str,
    /// What the row disturbs: its "must have disturbed" check keys on it.
    scenario: Scenario,
    resources: usize,
    seconds: f64,
    stats: SimStats,
    lost: usize,
    all_final: bool,
    /// Status writes the controller lost to a concurrent writer (409).
    conflicts: u64,
    /// Watches the API server ended with an in-stream `410 Expired`.
    watches_expired: u64,
    /// Machines with a second offboard sent while an earlier one was live or
    /// had succeeded (after a Failed or TimeOut one, a new resource may retry).
    offboarded_twice: Vec<String>,
}

/// The faults one row injects.
#[derive(Clone, Copy)]
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
        _ => FaultConfig::default(),
    };
    SimConfig {
        machines: 100,
        faults,
        ..fast_sim_config()
    }
}

async fn run_row(name: &'static str, slug: &str, scenario: Scenario) -> Row {
    // The lookup delay must exceed MDE's list lag (one second here).
    let settings = defender_offboard::operator::offboard::decision::Settings {
        lookup_delay: Duration::from_millis(1500),
        ..fast_settings()
    };
    let env: Env = start_with(sim_config(scenario), settings).await;
    let machines = windows_machines(&client(&env.sim, FAST_LIMITS), RESOURCES).await;
    let started = Instant::now();
    let targets: Vec<&String> = match scenario {
        // Two resources name each of half as many machines.
        Scenario::TwoPerMachine => machines[..RESOURCES / 2]
            .iter()
            .chain(&machines[..RESOURCES / 2])
            .collect(),
        _ => machines.iter().collect(),
    };
    for (i, machine) in targets.iter().enumerate() {
        create(&env.client, &format!("{slug}-{i:03}"), machine).await;
    }
    let stop = stop_flag();
    let second_client = match scenario {
        // Another client of the tenant eats the budget: 429 storms, again and again.
        Scenario::SecondClient => Some(tokio::spawn(storms(env.sim.base_url(), stop.clone()))),
        _ => None,
    };
    let disturbance = match scenario {
        // The login host down at the start and again mid-flight, with tokens
        // revoked each time so the controller must sign in during the outage.
        Scenario::LoginOutage => Some(tokio::spawn(login_outages(
            env.sim.base_url(),
            env.client.clone(),
        ))),
        // Another writer (a GitOps tool, a person with kubectl) changes every
        // resource's labels over and over: status writes race with it.
        Scenario::StatusConflicts => {
            Some(tokio::spawn(touch_labels(env.client.clone(), stop.clone())))
        }
        _ => None,
    };
    if let Scenario::RecreatedMidFlight = scenario {
        recreate_some(&env, slug, &targets).await;
    }
    // Not a panic on timeout: the row is printed "no" and the assertions
    // below fail with the whole table in view.
    let all_final = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let now = phases(&env.client).await;
            if now.len() == targets.len() && now.iter().all(|(_, p, _)| p.is_terminal()) {
                return;
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
    .is_ok();
    if !all_final {
        // What was left, for whoever reads the failure.
        let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");
        for resource in api
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let status = resource.status.clone().unwrap_or_default();
            if !status.phase.unwrap_or_default().is_terminal() {
                println!(
                    "{name}: not final: {} {:?}",
                    resource.metadata.name.clone().unwrap_or_default(),
                    status
                );
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in second_client.into_iter().chain(disturbance) {
        let _ = task.await;
    }
    let lost = targets.len() - phases(&env.client).await.len();
    let stats = env.sim.stats();
    let mde = client(&env.sim, FAST_LIMITS);
    let mut offboarded_twice = Vec::new();
    for (machine, _) in stats
        .offboard_actions_by_machine
        .iter()
        .filter(|(_, n)| **n > 1)
    {
        let actions = mde.offboard_actions(machine).await.unwrap();
        let earlier_live = actions[..actions.len() - 1]
            .iter()
            .any(|a| !matches!(a.status.as_str(), "Failed" | "TimeOut" | "Cancelled"));
        if earlier_live {
            offboarded_twice.push(machine.clone());
        }
    }
    let conflicts = env
        .metrics
        .reconcile_errors
        .get_or_create(&defender_offboard::metrics::ErrorLabels {
            error: "conflict".into(),
        })
        .get();
    let watches_expired = watches_expired(&env._api.url()).await;
    Row {
        name,
        scenario,
        resources: targets.len(),
        seconds: started.elapsed().as_secs_f64(),
        stats,
        lost,
        all_final,
        conflicts,
        watches_expired,
        offboarded_twice,
    }
}

fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

/// 429 for a second out of every two, on both families the controller uses.
async fn storms(url: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let http = reqwest::Client::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
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
        while phases(&client)
            .await
            .iter()
            .filter(|(_, _, a)| a.is_some())
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
async fn touch_labels(client: kube::Client, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let mut round = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        round += 1;
        for (name, _, _) in phases(&client).await {
            let patch = serde_json::json!({"metadata": {"labels": {"touched": round.to_string()}}});
            let _ = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Once a few are submitted, delete a quarter of the resources and apply them
/// again under the same names (a GitOps prune and re-apply): new uids.
async fn recreate_some(env: &Env, slug: &str, targets: &[&String]) {
    let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");
    with_timeout(30, async {
        while phases(&env.client)
            .await
            .iter()
            .filter(|(_, _, a)| a.is_some())
            .count()
            < 5
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for (i, machine) in targets.iter().enumerate().take(RESOURCES / 4) {
        let resource = format!("{slug}-{i:03}");
        api.delete(&resource, &DeleteParams::default())
            .await
            .unwrap();
        create(&env.client, &resource, machine).await;
    }
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
        "| row | resources | POSTs | actions created | max POSTs per key | second POSTs for a key / POSTs refused before MDE acted | answers lost | 429s | sign-ins refused | status-write conflicts | watches expired (410) | resources lost | machines offboarded twice | all final | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let posts: u64 = row.stats.offboard_requests_by_key.values().sum();
        let max = row
            .stats
            .offboard_requests_by_key
            .values()
            .max()
            .copied()
            .unwrap_or(0);
        let seconds = posts.saturating_sub(row.stats.offboard_requests_by_key.len() as u64);
        println!(
            "| {} | {} | {posts} | {} | {max} | {seconds} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            row.name,
            row.resources,
            row.stats.actions_created,
            row.stats.count("offboard", "500") + row.stats.count("offboard", "503"),
            row.stats.lost_responses,
            row.stats.throttled,
            row.stats.count("token", "503"),
            row.conflicts,
            row.watches_expired,
            row.lost,
            row.offboarded_twice.len(),
            if row.all_final { "yes" } else { "no" },
            row.seconds
        );
    }
    for row in &rows {
        let refused = row.stats.count("offboard", "500") + row.stats.count("offboard", "503");
        let extra: u64 = row
            .stats
            .offboard_requests_by_key
            .values()
            .map(|n| n.saturating_sub(1))
            .sum();
        assert_eq!(row.lost, 0, "{}: resources lost", row.name);
        assert!(row.all_final, "{}: not all final", row.name);
        assert!(
            row.offboarded_twice.is_empty(),
            "{}: machines offboarded again while an earlier offboard was live or done: {:?}",
            row.name,
            row.offboarded_twice
        );
        assert!(
            extra <= refused,
            "{}: {extra} second POSTs, {refused} refusals",
            row.name
        );
    }
    // The disturbing rows must have disturbed: otherwise they prove nothing.
    for row in &rows {
        match row.scenario {
            Scenario::LoginOutage => assert!(
                row.stats.count("token", "503") > 0,
                "no sign-in was refused"
            ),
            Scenario::StatusConflicts => {
                assert!(row.conflicts > 0, "no status write met a conflict")
            }
            Scenario::WatchExpiry => assert!(row.watches_expired > 0, "no watch expired"),
            Scenario::ServerErrors => {
                let refused =
                    row.stats.count("offboard", "500") + row.stats.count("offboard", "503");
                assert!(refused > 0, "{}: no offboard POST was refused", row.name)
            }
            Scenario::LostAnswers(_) | Scenario::ListLag | Scenario::Quirks => assert!(
                row.stats.lost_responses > 0,
                "{}: no answer was lost",
                row.name
            ),
            // Nothing of their own to count: the calm row disturbs nothing,
            // the second client's 429s depend on timing, and the rows that
            // share or re-create resources build that themselves. A new
            // scenario must pick an arm.
            Scenario::Calm
            | Scenario::SecondClient
            | Scenario::TwoPerMachine
            | Scenario::RecreatedMidFlight => {}
        }
    }
}
