//! Fairness between tenants: tenant A (the operator's own credentials) has
//! thousands of resources queued behind its budget on an MDE that takes 2 s
//! for every call; tenant B (a `DefenderConnection` to a second simulated
//! tenant) applies its own resources. B's figures come from B's simulator
//! and a watch of B's namespace, once before A's load is applied and once
//! while A works through it:
//! - apply → action recorded, one resource at a time with B's budget free
//!   (p50 / p99, the first probe left out);
//! - a burst at once: the time until B's simulator had every POST, against
//!   the ceiling of B's own budget (the earliest a perfect client could make
//!   that many calls);
//! - POSTs per machine at each simulator, counted there.

use super::suite::{self, Config, Seen};
use defender_offboard::crd::{ConnectionRef, DeviceOffboard};
use defender_offboard::playground::{create_connection, sim_host};
use defender_offboard::simulator::{self, SimConfig, SimHandle};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const TENANT_B: &str = "team-b";
const CONNECTION_B: &str = "tenant-b";

/// What a slow MDE takes for each of A's calls (wall time).
pub const A_CALL: Duration = Duration::from_secs(2);

/// B's figures in one phase.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub burst: usize,
    /// Apply of the burst's first resource → B's simulator had every POST.
    pub burst_secs: f64,
    /// POSTs B's simulator saw for the burst (by the deadline).
    pub burst_sent: u64,
    pub ceiling_secs: f64,
    /// The ceiling of calls that go no sooner than their resource's create
    /// returned (the burst is created one after another).
    pub ceiling_from_creates_secs: f64,
    /// A's resources final or with an action when this phase ended.
    pub a_sent: u64,
}

impl Phase {
    pub fn ratio(&self) -> f64 {
        self.ceiling_secs / self.burst_secs
    }
    pub fn ratio_from_creates(&self) -> f64 {
        self.ceiling_from_creates_secs / self.burst_secs
    }
}

#[derive(Clone, Debug, Default)]
pub struct Fairness {
    pub a_resources: usize,
    pub alone: Phase,
    pub loaded: Phase,
    /// The most POSTs any machine got, at either simulator.
    pub max_posts_per_machine: u64,
}

fn b_resource(name: &str, machine: &str) -> DeviceOffboard {
    let mut obj = suite::resource(name, machine);
    obj.metadata.namespace = Some(TENANT_B.into());
    obj.spec.connection_ref = Some(ConnectionRef {
        name: CONNECTION_B.into(),
    });
    obj
}

fn posts(sim: &SimHandle) -> u64 {
    sim.stats().offboard_requests_by_machine.values().sum()
}

/// Wait until `seen` has `name`'s action, at most `limit`.
async fn recorded(seen: &Mutex<Seen>, name: &str, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(at) = seen.lock().unwrap().recorded.get(name) {
            return Some(*at);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// B's probes one at a time, then a burst, on `machines` (probes first).
async fn measure_b(
    client: &kube::Client,
    b: &SimHandle,
    a: &SimHandle,
    seen: &Mutex<Seen>,
    machines: &[String],
    (probes, tag): (usize, &str),
    limits: &defender_offboard::mde::limiter::RateLimits,
) -> Phase {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), TENANT_B);
    let mut latency_ms = Vec::new();
    for (i, machine) in machines[..probes].iter().enumerate() {
        let name = format!("{tag}-probe-{i}");
        let applied = Instant::now();
        api.create(&PostParams::default(), &b_resource(&name, machine))
            .await
            .unwrap();
        if let Some(at) = recorded(seen, &name, Duration::from_secs(60)).await {
            latency_ms.push(at.duration_since(applied).as_secs_f64() * 1000.0);
        }
    }
    // The first probe of a phase may include B's sign-in.
    if latency_ms.len() > 1 {
        latency_ms.remove(0);
    }
    // Let the probes leave B's minute window: the ceiling is a fresh budget's.
    tokio::time::sleep(limits.0[0].window + Duration::from_millis(100)).await;
    let burst = &machines[probes..];
    let before = posts(b);
    let started = Instant::now();
    let mut created = Vec::with_capacity(burst.len());
    for (i, machine) in burst.iter().enumerate() {
        api.create(
            &PostParams::default(),
            &b_resource(&format!("{tag}-burst-{i}"), machine),
        )
        .await
        .unwrap();
        created.push(started.elapsed());
    }
    let ceiling = suite::ceiling(burst.len(), limits);
    let deadline = started + (ceiling * 3).max(Duration::from_secs(60));
    while posts(b) - before < burst.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst_secs = started.elapsed().as_secs_f64();
    Phase {
        p50_ms: suite::percentile(&latency_ms, 50.0),
        p99_ms: suite::percentile(&latency_ms, 99.0),
        burst: burst.len(),
        burst_secs,
        burst_sent: posts(b) - before,
        ceiling_secs: ceiling.as_secs_f64(),
        ceiling_from_creates_secs: suite::ceiling_from(&created, limits).as_secs_f64(),
        a_sent: posts(a),
    }
}

pub async fn fairness_row(config: &Config, a_resources: usize, b_resources: usize) -> Fairness {
    let scale = config.time_scale;
    let probes = config.latency_probes.min(b_resources.max(2));
    let stage = suite::stage(a_resources * 5 / 4 + 200, scale).await;
    let per_phase = probes + b_resources;
    let b = simulator::spawn(
        SimConfig {
            tenant_id: "tenant-b".into(),
            client_id: "app-b".into(),
            client_secret: "secret-b".into(),
            ..suite::sim_config(2 * per_phase * 5 / 4 + 200, scale)
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let limits = suite::scaled(&suite::mde_limits(), scale, 1.0);
    let helper = |sim: &SimHandle| {
        suite::mde_client_as(sim, limits.clone(), Arc::new(suite::Throttled::default()))
    };
    let a_machines = suite::windows_machines(&helper(&stage.sim), a_resources).await;
    let b_machines = suite::windows_machines(&helper(&b), 2 * per_phase).await;
    // A's MDE turns slow once its machines are listed (simulated time: the
    // simulator divides it by the time scale).
    let slow = serde_json::json!({"latency": format!("{}ms", A_CALL.mul_f64(scale).as_millis())});
    let answer = reqwest::Client::new()
        .post(format!("{}/_sim/faults", stage.sim.base_url()))
        .json(&slow)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let client = stage.client.clone();
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": TENANT_B}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    create_connection(&client, TENANT_B, CONNECTION_B, &b)
        .await
        .unwrap();
    let mut run_config = config.clone();
    run_config.run_args.extend([
        "--connections".into(),
        format!("--connection-allowed-hosts={}", sim_host(&b)),
    ]);
    let mut run = suite::start_run(&run_config, &stage, &limits);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = suite::watch_namespace(&client, TENANT_B, seen.clone()).await;
    let alone = measure_b(
        &client,
        &b,
        &stage.sim,
        &seen,
        &b_machines[..per_phase],
        (probes, "alone"),
        &limits,
    )
    .await;
    eprintln!("fairness, B alone: {alone:?}");
    // A's load: every resource applied, 64 at a time.
    let a_api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    futures::stream::iter(a_machines.iter().enumerate())
        .for_each_concurrent(64, |(i, machine)| {
            let a_api = a_api.clone();
            async move {
                a_api
                    .create(
                        &PostParams::default(),
                        &suite::resource(&format!("a-{i}"), machine),
                    )
                    .await
                    .unwrap();
            }
        })
        .await;
    // A's slots are taken by its slow calls by now.
    tokio::time::sleep(A_CALL).await;
    let loaded = measure_b(
        &client,
        &b,
        &stage.sim,
        &seen,
        &b_machines[per_phase..],
        (probes, "loaded"),
        &limits,
    )
    .await;
    eprintln!("fairness, B beside A's load: {loaded:?}");
    let max_posts_per_machine = [stage.sim.stats(), b.stats()]
        .iter()
        .map(suite::most_posts_for_one_machine)
        .max()
        .unwrap_or(0);
    watch.abort();
    let _ = run.child.start_kill();
    let _ = run.child.wait().await;
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    b.shutdown().await;
    Fairness {
        a_resources,
        alone,
        loaded,
        max_posts_per_machine,
    }
}

/// The row's lines for the table.
pub fn table(row: &Fairness) -> String {
    let line = |label: &str, p: &Phase| {
        format!(
            "| B {label}: apply → action (p50 / p99) | {:.1} / {:.1} ms | ≤ 250 ms (p99) | {:.2} |\n\
             | B {label}: {} at once, until B's MDE had every POST ({} seen) | {:.2} s | {:.2} s (B's ceiling) | {:.3} |\n\
             | B {label}: the same against the ceiling of calls no sooner than their create | {:.2} s | {:.2} s | {:.3} |\n",
            p.p50_ms,
            p.p99_ms,
            p.p99_ms / 250.0,
            p.burst,
            p.burst_sent,
            p.burst_secs,
            p.ceiling_secs,
            p.ratio(),
            p.burst_secs,
            p.ceiling_from_creates_secs,
            p.ratio_from_creates(),
        )
    };
    format!(
        "\n### Fairness between tenants\n\n\
         Tenant A: {} resources applied at once, each MDE call {} s; tenant B: a connection of its own:\n\n\
         | figure | value | target | ratio |\n|---|---|---|---|\n{}{}\
         | A's POSTs at its MDE by the end | {} | | |\n\
         | most POSTs for one machine (both tenants) | {} | 1 | |\n",
        row.a_resources,
        A_CALL.as_secs(),
        line("alone", &row.alone),
        line("beside A's load", &row.loaded),
        row.loaded.a_sent,
        row.max_posts_per_machine,
    )
}
