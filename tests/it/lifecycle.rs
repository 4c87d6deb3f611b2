//! Cluster lifecycle: node offboarding and TTL cleanup, in process against
//! the in-memory API and the simulator.

use crate::common::*;
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use defender_offboard::metrics::Metrics;
use defender_offboard::operator::nodes::{self, NODE_FINALIZER, NODE_UID_LABEL};
use defender_offboard::operator::offboard::ports::KubeStore;
use defender_offboard::operator::ttl;
use defender_offboard::playground::{
    create_dev_node, create_node, dev_node_named, embedded_controller_with,
};
use defender_offboard::simulator::SimHandle;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use std::time::Duration;

/// The machine id the simulator gives `win-node-N`.
fn machine_of(node: u8) -> String {
    format!("7a11e0de0000000000000000000000000000000{node}")
}

/// A controller with node offboarding on, its records in `default`.
fn start_controller(client: kube::Client, sim: &SimHandle) -> tokio::task::JoinHandle<()> {
    let controller = embedded_controller_with(
        client,
        sim,
        FAST_LIMITS.parse().unwrap(),
        fast_settings(),
        Duration::from_millis(200),
        |run| {
            run.nodes.offboard_deleted_nodes = true;
            run.nodes.node_offboard_namespace = Some("default".into());
        },
    )
    .unwrap();
    tokio::spawn(controller)
}

fn node_options() -> nodes::NodeOptions {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        nodes: defender_offboard::cli::NodeArgs,
    }
    Cli::parse_from(["run"]).nodes.options("default")
}

async fn held(nodes: &Api<Node>, name: &str) -> bool {
    nodes.get(name).await.ok().is_some_and(|n| {
        n.metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == NODE_FINALIZER)
    })
}

async fn wait_until_held(nodes: &Api<Node>, name: &str) {
    with_timeout(30, async {
        while !held(nodes, name).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn wait_until_gone(nodes: &Api<Node>, name: &str) {
    with_timeout(30, async {
        while nodes.get_opt(name).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn wait_for_phase(records: &Api<DeviceOffboard>, name: &str, phase: Phase) -> DeviceOffboard {
    // Seconds alone; the headroom is for a full parallel run on 2 cores,
    // where these node tests have once exceeded 60 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let record = records.get_opt(name).await.unwrap();
        if let Some(r) = &record
            && r.status.as_ref().and_then(|s| s.phase) == Some(phase)
        {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {phase:?}; last seen: {:#?}",
            record.map(|r| r.status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_windows_node_creates_one_offboard_and_one_post() {
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let admin = api.client().await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    let records: Api<DeviceOffboard> = Api::namespaced(admin.clone(), "default");
    create_dev_node(&admin, dev_node_named("win-node-1").unwrap())
        .await
        .unwrap();
    let controller = start_controller(admin.clone(), &sim);
    wait_until_held(&nodes, "win-node-1").await;

    let uid = nodes.get("win-node-1").await.unwrap().metadata.uid.unwrap();
    nodes
        .delete("win-node-1", &DeleteParams::default())
        .await
        .unwrap();
    let record = wait_for_phase(&records, "win-node-1", Phase::Succeeded).await;
    wait_until_gone(&nodes, "win-node-1").await;
    controller.abort();

    assert_eq!(record.spec.device_name.as_deref(), Some("win-node-1"));
    assert_eq!(record.metadata.labels.unwrap()[NODE_UID_LABEL], uid);
    assert!(
        record.spec.comment.contains("Node win-node-1"),
        "{}",
        record.spec.comment
    );
    let all = records.list(&ListParams::default()).await.unwrap().items;
    let names: Vec<_> = all
        .iter()
        .map(|r| r.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["win-node-1"], "one DeviceOffboard");
    let stats = sim.stats();
    println!(
        "node offboarding: records {names:?}, offboard POSTs by machine {:?}",
        stats.offboard_requests_by_machine
    );
    assert_eq!(
        stats.offboard_requests_by_machine.get(&machine_of(1)),
        Some(&1)
    );
    assert_eq!(
        stats.offboard_requests_by_machine.values().sum::<u64>(),
        1,
        "one POST in all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_while_the_operator_is_down_is_offboarded_after_restart() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("offboard_operator=debug,defender_offboard=debug")
        .with_test_writer()
        .try_init();
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let admin = api.client().await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    let records: Api<DeviceOffboard> = Api::namespaced(admin.clone(), "default");
    create_dev_node(&admin, dev_node_named("win-node-2").unwrap())
        .await
        .unwrap();
    let first = start_controller(admin.clone(), &sim);
    wait_until_held(&nodes, "win-node-2").await;
    first.abort();
    let _ = first.await;

    nodes
        .delete("win-node-2", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = nodes.get("win-node-2").await.unwrap();
    assert!(
        terminating.metadata.deletion_timestamp.is_some(),
        "the finalizer keeps the Node while no operator runs"
    );
    assert!(records.get_opt("win-node-2").await.unwrap().is_none());

    let second = start_controller(admin.clone(), &sim);
    wait_for_phase(&records, "win-node-2", Phase::Succeeded).await;
    wait_until_gone(&nodes, "win-node-2").await;
    second.abort();
    assert_eq!(
        sim.stats().offboard_requests_by_machine.get(&machine_of(2)),
        Some(&1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstalling_removes_the_operators_finalizers() {
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let admin = api.client().await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    let records: Api<DeviceOffboard> = Api::namespaced(admin.clone(), "default");
    for name in ["win-node-1", "win-node-3"] {
        create_dev_node(&admin, dev_node_named(name).unwrap())
            .await
            .unwrap();
    }
    let controller = start_controller(admin.clone(), &sim);
    wait_until_held(&nodes, "win-node-1").await;
    wait_until_held(&nodes, "win-node-3").await;
    controller.abort();
    let _ = controller.await;
    // One Node is already being deleted when the chart is uninstalled.
    nodes
        .delete("win-node-3", &DeleteParams::default())
        .await
        .unwrap();

    let released = nodes::remove_finalizers(&admin, &node_options(), None, &Metrics::default())
        .await
        .unwrap();
    assert_eq!(released, 2);
    assert!(!held(&nodes, "win-node-1").await, "no finalizer is left");
    wait_until_gone(&nodes, "win-node-3").await;
    assert!(
        records.get_opt("win-node-3").await.unwrap().is_some(),
        "the Node being deleted still got its DeviceOffboard"
    );
    assert!(records.get_opt("win-node-1").await.unwrap().is_none());
}

async fn finished(
    records: &Api<DeviceOffboard>,
    name: &str,
    ttl: Option<i64>,
    phase: Phase,
    completed_secs_ago: Option<i64>,
) {
    let spec = DeviceOffboardSpec {
        machine_id: None,
        device_name: Some("pc-1".into()),
        comment: "ttl".into(),
        ttl_seconds_after_finished: ttl,
        connection_ref: None,
        node: None,
    };
    records
        .create(&PostParams::default(), &DeviceOffboard::new(name, spec))
        .await
        .unwrap();
    let status = DeviceOffboardStatus {
        phase: Some(phase),
        completed_at: completed_secs_ago
            .map(|s| Time(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(s))),
        ..Default::default()
    };
    records
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": status})),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_deletes_a_finished_resource_and_never_an_unfinished_one() {
    let api = spawn_api().await;
    let admin = api.client().await.unwrap();
    let records: Api<DeviceOffboard> = Api::namespaced(admin.clone(), "default");
    finished(&records, "expired", Some(60), Phase::Succeeded, Some(120)).await;
    finished(&records, "failed-expired", Some(0), Phase::Failed, Some(1)).await;
    finished(&records, "not-yet", Some(3600), Phase::Succeeded, Some(10)).await;
    finished(&records, "in-progress", Some(0), Phase::InProgress, None).await;
    finished(&records, "pending", Some(0), Phase::Pending, None).await;
    finished(&records, "kept", None, Phase::Succeeded, Some(999_999)).await;

    let store = KubeStore {
        client: admin.clone(),
        reporter: Reporter {
            controller: "test".into(),
            instance: None,
        },
    };
    let metrics = Metrics::default();
    let next = ttl::sweep(&records, &store, &metrics).await.unwrap();

    let mut left: Vec<_> = records
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|r| r.metadata.name.unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["in-progress", "kept", "not-yet", "pending"]);
    let next = next.expect("not-yet falls due later");
    assert!(
        next > Duration::from_secs(3500) && next <= Duration::from_secs(3590),
        "{next:?}"
    );
    assert!(
        metrics
            .encode()
            .contains("defender_offboard_ttl_deletions_total 2")
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let expired: Vec<_> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Expired"))
        .filter_map(|e| e.regarding?.name)
        .collect();
    assert_eq!(expired.len(), 2, "{expired:?}");
    assert!(
        expired.contains(&"expired".to_string()) && expired.contains(&"failed-expired".to_string())
    );

    // A second sweep deletes nothing more.
    ttl::sweep(&records, &store, &metrics).await.unwrap();
    assert_eq!(
        records
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        4
    );
}

/// A Node whose record cannot be created (here: its namespace does not
/// exist) is held and retried until `--node-finalizer-max-age`, then released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_never_held_past_the_bound() {
    let api = spawn_api().await;
    let admin = api.client().await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "win-node-1", "labels": {"kubernetes.io/os": "windows"},
                     "finalizers": [NODE_FINALIZER]},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    nodes
        .delete("win-node-1", &DeleteParams::default())
        .await
        .unwrap();
    let mut options = node_options();
    options.namespace = "no-such-namespace".into();
    let metrics = Metrics::default();

    let terminating = nodes.get("win-node-1").await.unwrap();
    nodes::handle(&admin, &terminating.metadata, &options, &metrics).await;
    assert!(
        held(&nodes, "win-node-1").await,
        "within the bound: held, retried later"
    );
    assert!(
        metrics
            .encode()
            .contains("defender_offboard_node_offboards_total{result=\"error\"} 1")
    );

    options.max_age = Duration::ZERO;
    nodes::handle(&admin, &terminating.metadata, &options, &metrics).await;
    wait_until_gone(&nodes, "win-node-1").await;
    assert!(
        metrics
            .encode()
            .contains("defender_offboard_node_offboards_total{result=\"released\"} 1")
    );
}

/// Anyone who can register a Node can name it after a workstation and delete
/// it. Under the default `--node-identity required` no MDE record of the name
/// carries this Node's VM identity: nothing is sent, and the reason says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_named_after_a_workstation_sends_nothing() {
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let admin = api.client().await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    let records: Api<DeviceOffboard> = Api::namespaced(admin.clone(), "default");
    create_node(&admin, "finance-laptop-07", "windows")
        .await
        .unwrap();
    let controller = start_controller(admin.clone(), &sim);
    wait_until_held(&nodes, "finance-laptop-07").await;
    nodes
        .delete("finance-laptop-07", &DeleteParams::default())
        .await
        .unwrap();
    let record = wait_for_phase(&records, "finance-laptop-07", Phase::Failed).await;
    wait_until_gone(&nodes, "finance-laptop-07").await;
    controller.abort();
    let error = record.status.unwrap().last_error.unwrap();
    assert_eq!(error.code, "NodeIdentityUnverified", "{}", error.message);
    assert_eq!(
        sim.stats()
            .offboard_requests_by_machine
            .values()
            .sum::<u64>(),
        0,
        "the workstation is not offboarded"
    );
}
