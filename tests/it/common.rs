//! Shared helpers of the integration tests: everything on 127.0.0.1, port 0.
#![allow(dead_code)]

use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec};
use defender_offboard::mde::{ClientConfig, ClientIdentity, DefenderClient, RateLimits};
use defender_offboard::metrics::Metrics;
use defender_offboard::operator::offboard::decision::Settings;
use defender_offboard::simulator::{self, SimConfig, SimHandle};
use defender_offboard::{devcluster, playground};
use kube::CustomResourceExt;
use std::sync::Arc;
use std::time::Duration;

pub async fn spawn_sim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    simulator::spawn(config, listener).await.unwrap()
}

/// A simulator with MDE's limits, one simulated hour per wall-clock minute
/// (`time_scale` 60): 100 calls per second and 1500 per minute.
pub fn fast_sim_config() -> SimConfig {
    SimConfig {
        time_scale: 60.0,
        pending_for: Duration::from_secs(6),
        in_progress_for: Duration::from_secs(6),
        ..SimConfig::default()
    }
}

/// The client's own budget matching [`fast_sim_config`].
pub const FAST_LIMITS: &str = "100/1s,1500/60s";

/// The client configuration for the simulator, with another secret when a test needs a wrong one.
pub fn client_config(sim: &SimHandle, secret: &str, limits: &str) -> ClientConfig {
    let mut config = playground::sim_client_config(sim, limits.parse::<RateLimits>().unwrap());
    config.identity = ClientIdentity::from_parts(
        Some("sim-tenant".into()),
        Some("sim-client".into()),
        Some(secret.into()),
        None,
        None,
    )
    .unwrap();
    config
}

/// The in-memory Kubernetes API with the project's CRDs.
pub async fn spawn_api() -> devcluster::ApiHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = devcluster::ApiServerConfig {
        crds: vec![
            DeviceOffboard::crd(),
            defender_offboard::operator::tenants::resource::DefenderConnection::crd(),
        ],
        ..Default::default()
    };
    devcluster::spawn_api(config, listener).await.unwrap()
}

/// Controller timings compressed for tests.
pub fn fast_settings() -> Settings {
    Settings {
        lookup_delay: Duration::from_millis(300),
        retry_backoff: Duration::from_millis(300),
        access_backoff: Duration::from_secs(5),
        // A deleted Node's offboard waits this long for the Node to come back.
        node_grace: Duration::from_millis(300),
        ..Settings::default()
    }
}

pub fn client(sim: &SimHandle, limits: &str) -> DefenderClient {
    DefenderClient::new(
        client_config(sim, "sim-secret", limits),
        Arc::new(Metrics::default()),
    )
    .unwrap()
}

/// POST a JSON body to a `/_sim/*` control route.
pub async fn control(sim: &SimHandle, route: &str, body: serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/_sim/{route}", sim.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "/_sim/{route}: {}",
        response.status()
    );
}

/// Ids of Windows machines the simulator generated (offboard works on them).
pub async fn windows_machines(client: &DefenderClient, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for platform in [
        "Windows10",
        "Windows11",
        "WindowsServer2019",
        "WindowsServer2022",
    ] {
        let machines = client
            .list_machines(&format!("osPlatform eq '{platform}'"))
            .await
            .unwrap();
        ids.extend(machines.into_iter().map(|m| m.id));
    }
    ids.sort();
    ids.dedup();
    assert!(
        ids.len() >= n,
        "simulator has only {} Windows machines, {n} wanted",
        ids.len()
    );
    ids.truncate(n);
    ids
}

pub async fn with_timeout<T>(seconds: u64, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), future)
        .await
        .expect("test timed out")
}

/// The spec of a resource that offboards `machine_id` ("retired").
pub fn retired(machine_id: &str) -> DeviceOffboardSpec {
    DeviceOffboardSpec {
        machine_id: Some(machine_id.into()),
        device_name: None,
        comment: "retired".into(),
        ttl_seconds_after_finished: None,
        connection_ref: None,
        node: None,
    }
}

/// Create `obj` and give it `status` (as the operator would have written it).
pub async fn create_with_status(
    api: &kube::Api<DeviceOffboard>,
    obj: &DeviceOffboard,
    status: &defender_offboard::crd::DeviceOffboardStatus,
) {
    use kube::ResourceExt;
    api.create(&kube::api::PostParams::default(), obj)
        .await
        .unwrap();
    api.patch_status(
        &obj.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap();
}
