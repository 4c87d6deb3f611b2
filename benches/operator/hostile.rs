//! One namespace against the shared operator: resources and connections
//! carrying the most annotations the API server takes, connections that
//! cannot sign in, one recreated with another tenant again and again. The
//! figure is `run`'s peak RSS beside the chart's memory limit; the counts are
//! what must hold meanwhile: nothing sent for the hostile namespace, every
//! hostile resource answered in its status, and a resource of the operator's
//! own namespace still offboarded.

use super::suite::{self, Config, Stage};
use defender_offboard::crd::{ConnectionRef, DeviceOffboard};
use defender_offboard::operator::tenants::resource::DefenderConnection;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use std::time::Duration;
use tokio::time::Instant;

/// The chart's `resources.limits.memory`.
pub const CHART_LIMIT_MIB: f64 = 128.0;

/// The API server refuses more than 256 KiB of annotations on one object.
const PAD_BYTES: usize = 255 * 1024;

const HOSTILE: &str = "hostile";

/// What the row measured.
#[derive(Clone, Debug, Default)]
pub struct Hostile {
    pub resources: usize,
    pub connections: usize,
    pub recreated: usize,
    pub peak_rss_mib: f64,
    /// POSTs the simulator saw for the hostile namespace's machines.
    pub hostile_posts: u64,
    /// Hostile resources whose status says why they wait.
    pub answered: usize,
    /// The own namespace's resource was offboarded meanwhile.
    pub own_sent: bool,
    /// `run` was still running at the end (not killed by its own memory).
    pub alive: bool,
}

fn padded<T: kube::Resource>(mut obj: T) -> T {
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert("hostile.example/pad".into(), "x".repeat(PAD_BYTES));
    obj
}

fn connection(name: &str, tenant: &str, sim_url: &str) -> DefenderConnection {
    let connection: DefenderConnection = serde_json::from_value(serde_json::json!({
        "apiVersion": "defender.offboard.dev/v1alpha1",
        "kind": "DefenderConnection",
        "metadata": {"name": name, "namespace": HOSTILE},
        "spec": {
            "tenantId": tenant,
            "clientId": "hostile-app",
            "apiUrl": sim_url,
            "loginUrl": sim_url,
            "credential": {"clientSecret": {"name": "hostile", "key": "client-secret"}},
        },
    }))
    .expect("a valid DefenderConnection");
    padded(connection)
}

fn hostile_resource(i: usize, machine: &str, connections: usize) -> DeviceOffboard {
    let mut obj = suite::resource(&format!("h-{i}"), machine);
    obj.metadata.namespace = Some(HOSTILE.into());
    // Half ask for the operator's own credentials, half for a connection.
    if i % 2 == 1 && connections > 0 {
        obj.spec.connection_ref = Some(ConnectionRef {
            name: format!("c-{}", i % connections),
        });
    }
    padded(obj)
}

/// `resources` hostile resources (half before `run` starts, so they arrive
/// in its first pages), `connections` connections, one recreated
/// `recreate` times with a new tenant.
pub async fn hostile_row(
    config: &Config,
    resources: usize,
    connections: usize,
    recreate: usize,
) -> Hostile {
    // Not every simulated machine is Windows: room for the ones that are not.
    let stage: Stage = suite::stage((resources + 1) * 5 / 4 + 200, config.time_scale).await;
    let limits = suite::scaled(&suite::mde_limits(), config.time_scale, 1.0);
    let helper = suite::mde_client(
        &stage.sim,
        limits.clone(),
        std::sync::Arc::new(suite::Throttled::default()),
    );
    let machines = suite::windows_machines(&helper, resources + 1).await;
    let client = stage.client.clone();
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": HOSTILE}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hostile", "namespace": HOSTILE},
        "stringData": {"client-secret": "not-the-secret"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), HOSTILE)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let docs: Api<DeviceOffboard> = Api::namespaced(client.clone(), HOSTILE);
    let create_resources = |range: std::ops::Range<usize>| {
        let docs = docs.clone();
        let machines = machines.clone();
        async move {
            for i in range {
                docs.create(
                    &PostParams::default(),
                    &hostile_resource(i, &machines[i], connections),
                )
                .await
                .unwrap();
            }
        }
    };
    create_resources(0..resources / 2).await;
    let mut run_config = config.clone();
    run_config.run_args.push("--connections".into());
    let mut run = suite::start_run(&run_config, &stage, &limits);
    let conns: Api<DefenderConnection> = Api::namespaced(client.clone(), HOSTILE);
    let url = stage.sim.base_url();
    for c in 0..connections {
        conns
            .create(
                &PostParams::default(),
                &connection(&format!("c-{c}"), &format!("hostile-{c}"), &url),
            )
            .await
            .unwrap();
    }
    create_resources(resources / 2..resources).await;
    // A tenantId cannot be edited (admission refuses it): deleting and
    // recreating the connection is the same churn for the operator.
    for r in 0..recreate {
        let _ = conns.delete("c-0", &DeleteParams::default()).await;
        conns
            .create(
                &PostParams::default(),
                &connection("c-0", &format!("hostile-r{r}"), &url),
            )
            .await
            .unwrap();
    }
    // The own namespace is still served.
    let own = suite::resource("own-0", &machines[resources]);
    Api::<DeviceOffboard>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &own)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut answered, mut own_sent) = (0, false);
    while Instant::now() < deadline {
        let listed = docs.list(&ListParams::default()).await.unwrap();
        answered = listed
            .items
            .iter()
            .filter(|d| d.status.as_ref().is_some_and(|s| s.phase.is_some()))
            .count();
        own_sent = stage
            .sim
            .stats()
            .offboard_requests_by_machine
            .get(&machines[resources])
            .is_some_and(|n| *n > 0);
        if answered == resources && own_sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (peak_rss_mib, _) = suite::usage(run.pid);
    let alive = matches!(run.child.try_wait(), Ok(None));
    let stats = stage.sim.stats();
    let hostile_posts = machines[..resources]
        .iter()
        .map(|m| {
            stats
                .offboard_requests_by_machine
                .get(m)
                .copied()
                .unwrap_or(0)
        })
        .sum();
    let _ = run.child.start_kill();
    let _ = run.child.wait().await;
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    Hostile {
        resources,
        connections,
        recreated: recreate,
        peak_rss_mib,
        hostile_posts,
        answered,
        own_sent,
        alive,
    }
}

/// The row's lines for the table.
pub fn table(row: &Hostile) -> String {
    format!(
        "\n### One hostile namespace\n\n\
         {} resources and {} connections with {} KiB of annotations each, one connection recreated {} times with a new tenant:\n\n\
         | figure | value | ceiling | ratio |\n|---|---|---|---|\n\
         | peak RSS of `run` (MiB) | {:.1} | {:.0} (chart limit) | {:.2} |\n\
         | POSTs for the hostile namespace | {} | 0 | |\n\
         | hostile resources answered in status | {} | {} | |\n\
         | own namespace's resource sent | {} | yes | |\n\
         | `run` alive at the end | {} | yes | |\n",
        row.resources,
        row.connections,
        PAD_BYTES / 1024,
        row.recreated,
        row.peak_rss_mib,
        CHART_LIMIT_MIB,
        row.peak_rss_mib / CHART_LIMIT_MIB,
        row.hostile_posts,
        row.answered,
        row.resources,
        if row.own_sent { "yes" } else { "no" },
        if row.alive { "yes" } else { "no" },
    )
}
