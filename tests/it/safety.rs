//! The safety rails in the real controller, against the in-memory API and the
//! MDE simulator: the blast-radius breaker holds new sends beyond
//! `--max-offboards-per-hour` and lets an annotated resource go; with
//! `--require-approval` nothing is sent until someone other than the creator
//! approves. Every POST is counted at the simulator, per machine.

use crate::common::*;
use crate::controller::{Env, create, start_with};
use defender_offboard::crd::{
    APPROVED_BY_ANNOTATION, CREATED_BY_ANNOTATION, DeviceOffboard, Phase,
    RELEASE_BREAKER_ANNOTATION,
};
use defender_offboard::operator::offboard::decision::Settings;
use defender_offboard::simulator::SimConfig;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// Each resource's name, phase, `Ready` reason and action id.
async fn states(client: &kube::Client) -> Vec<(String, Phase, String, Option<String>)> {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| {
            let status = d.status.unwrap_or_default();
            let reason = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.reason.clone())
                .unwrap_or_default();
            (
                d.metadata.name.unwrap(),
                status.phase.unwrap_or_default(),
                reason,
                status.machine_action_id,
            )
        })
        .collect()
}

/// Wait until `done` holds for the resources' states.
async fn wait_for(
    client: &kube::Client,
    seconds: u64,
    done: impl Fn(&[(String, Phase, String, Option<String>)]) -> bool,
) -> Vec<(String, Phase, String, Option<String>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let now = states(client).await;
        if done(&now) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not there after {seconds}s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn annotate(client: &kube::Client, name: &str, key: &str, value: &str) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let patch = json!({"metadata": {"annotations": {key: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Offboard POSTs the simulator received, per machine.
fn posts(env: &Env) -> BTreeMap<String, u64> {
    env.sim.stats().offboard_requests_by_machine
}

/// 50 resources with `--max-offboards-per-hour 10`: 10 POSTs, 40 held in
/// `Pending/BreakerOpen` (one Warning Event each, the counter and the gauge
/// say so), and no more sent while the hour lasts; annotated with
/// `release-breaker=true`, each held one is sent, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_resources_at_ten_an_hour_send_ten_and_the_released_rest_once_each() {
    let settings = Settings {
        max_offboards_per_hour: 10,
        ..fast_settings()
    };
    let env = start_with(
        SimConfig {
            machines: 120,
            ..fast_sim_config()
        },
        settings,
    )
    .await;
    let machines = windows_machines(&client(&env.sim, FAST_LIMITS), 50).await;
    for (i, id) in machines.iter().enumerate() {
        create(&env.client, &format!("bulk-{i:02}"), id).await;
    }
    let held = |s: &[(String, Phase, String, Option<String>)]| {
        s.iter()
            .filter(|(_, phase, reason, _)| *phase == Phase::Pending && reason == "BreakerOpen")
            .count()
    };
    let sent = |s: &[(String, Phase, String, Option<String>)]| {
        s.iter()
            .filter(|(_, _, _, action)| action.is_some())
            .count()
    };
    wait_for(&env.client, 60, |s| {
        s.len() == 50 && sent(s) == 10 && held(s) == 40
    })
    .await;
    // Nothing more goes out while the hour lasts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = states(&env.client).await;
    assert_eq!((sent(&now), held(&now)), (10, 40), "{now:?}");
    let counted = posts(&env);
    assert_eq!(counted.values().sum::<u64>(), 10, "{counted:?}");
    assert!(counted.values().all(|n| *n == 1), "{counted:?}");
    let metrics = env.metrics.encode();
    assert!(
        metrics.contains("defender_offboard_breaker_held_total{tenant=\"sim-tenant\"} 40"),
        "{metrics}"
    );
    assert!(
        metrics.contains("defender_offboard_breaker_open{tenant=\"sim-tenant\"} 1"),
        "{metrics}"
    );
    // One Warning Event per held resource, naming the limit and the way out.
    let events: Api<Event> = Api::namespaced(env.client.clone(), "default");
    let breaker_events: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BreakerOpen"))
        .collect();
    assert_eq!(breaker_events.len(), 40);
    let mut regarding: Vec<_> = breaker_events
        .iter()
        .filter_map(|e| e.regarding.as_ref()?.name.clone())
        .collect();
    regarding.dedup();
    assert_eq!(regarding.len(), 40, "one Event per held resource");
    let event = &breaker_events[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.as_deref().unwrap_or_default();
    assert!(
        note.contains("the limit is 10") && note.contains(RELEASE_BREAKER_ANNOTATION),
        "{note}"
    );
    // The documented release: annotate the held resources.
    for (name, _, reason, _) in &now {
        if reason == "BreakerOpen" {
            annotate(&env.client, name, RELEASE_BREAKER_ANNOTATION, "true").await;
        }
    }
    wait_for(&env.client, 60, |s| sent(s) == 50).await;
    let counted = posts(&env);
    assert_eq!(counted.len(), 50, "every machine offboarded");
    assert!(
        counted.values().all(|n| *n == 1),
        "one POST per machine: {counted:?}"
    );
    for id in &machines {
        assert_eq!(counted.get(id), Some(&1), "{id}");
    }
}

async fn create_by(client: &kube::Client, name: &str, machine_id: &str, creator: &str) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let mut resource = DeviceOffboard::new(name, retired(machine_id));
    resource.metadata.annotations = Some(
        [(CREATED_BY_ANNOTATION.to_string(), creator.to_string())]
            .into_iter()
            .collect(),
    );
    api.create(&PostParams::default(), &resource).await.unwrap();
}

/// With approvals required: an unapproved resource waits in
/// `Pending/AwaitingApproval` and MDE hears nothing of it; approved by its
/// own creator it still waits; approved by someone else it is sent, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_approvals_required_only_an_approval_by_another_person_sends_once() {
    let settings = Settings {
        require_approval: true,
        ..fast_settings()
    };
    let env = start_with(fast_sim_config(), settings).await;
    let machine = windows_machines(&client(&env.sim, FAST_LIMITS), 1).await[0].clone();
    // The listing above is the test's own; count from here.
    let calls_before = env.sim.stats().requests;
    create_by(&env.client, "needs-approval", &machine, "alice@contoso.com").await;
    let waiting = |s: &[(String, Phase, String, Option<String>)]| {
        s.len() == 1 && s[0].1 == Phase::Pending && s[0].2 == "AwaitingApproval"
    };
    wait_for(&env.client, 30, waiting).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(posts(&env).get(&machine), None, "nothing sent unapproved");
    assert_eq!(
        env.sim.stats().requests,
        calls_before,
        "no MDE call at all for an unapproved resource"
    );
    // Approved by its creator: still waiting (the admission policy refuses
    // this too; the operator does not rely on it).
    annotate(
        &env.client,
        "needs-approval",
        APPROVED_BY_ANNOTATION,
        "alice@contoso.com",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = states(&env.client).await;
    assert!(waiting(&now), "{now:?}");
    assert_eq!(
        posts(&env).get(&machine),
        None,
        "a self-approval sends nothing"
    );
    // Approved by someone else: sent, once.
    annotate(
        &env.client,
        "needs-approval",
        APPROVED_BY_ANNOTATION,
        "bob@contoso.com",
    )
    .await;
    wait_for(&env.client, 30, |s| {
        s.len() == 1 && s[0].1 == Phase::Succeeded
    })
    .await;
    assert_eq!(posts(&env).get(&machine), Some(&1));
    assert_eq!(posts(&env).values().sum::<u64>(), 1);
}

/// The chart's breaker default is `run`'s, and both flags are in `run --help`.
#[test]
fn the_breaker_is_on_by_default_in_run_and_the_chart() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: defender_offboard::cli::RunArgs,
    }
    let run = Cli::parse_from(["run"]).run;
    assert_eq!(
        run.max_offboards_per_hour, 100,
        "a safe default, not 0 (off)"
    );
    assert!(!run.require_approval);
    let config = run.config().settings;
    assert_eq!(config.max_offboards_per_hour, 100);
    let values: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string("charts/defender-offboard/values.yaml").unwrap(),
    )
    .unwrap();
    let safety = &values["safety"];
    assert_eq!(
        safety["maxOffboardsPerHour"].as_u64(),
        Some(u64::from(run.max_offboards_per_hour))
    );
    assert_eq!(safety["requireApproval"].as_bool(), Some(false));
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    for flag in ["--max-offboards-per-hour", "--require-approval"] {
        assert!(help.contains(flag), "{flag} missing from run --help");
    }
    let parsed = Cli::parse_from(["run", "--max-offboards-per-hour", "0", "--require-approval"]);
    assert_eq!(parsed.run.config().settings.max_offboards_per_hour, 0);
    assert!(parsed.run.config().settings.require_approval);
}
