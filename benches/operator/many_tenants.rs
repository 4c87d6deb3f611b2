//! Many tenants from one operator, as an MSSP runs it: T simulated tenants,
//! each its own simulator and a `DefenderConnection` in a namespace of its
//! own, R resources each, all applied at once. MDE's limits are divided by
//! ten for every tenant (10 a minute, 150 an hour) so that R = 50 spans
//! minutes of each tenant's budget and each tenant's ratio to its own
//! ceiling means something. Figures: each tenant's ratio (the time until its
//! simulator had all R POSTs against the earliest a perfect client could make
//! R calls), min and median; `run`'s peak RSS and CPU per POST; POSTs per
//! machine counted at each simulator.

use super::suite::{self, Config};
use defender_offboard::mde::limiter::RateLimit;
use defender_offboard::playground::{create_connection, sim_host};
use defender_offboard::simulator::{self, SimConfig, SimHandle};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct ManyTenants {
    pub tenants: usize,
    pub per_tenant: usize,
    /// Each tenant's ratio to its own ceiling, sorted.
    pub ratios: Vec<f64>,
    pub ceiling: Duration,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
    pub posts: u64,
    pub max_posts_per_machine: u64,
    pub throttled: u64,
    pub applied: Duration,
}

impl ManyTenants {
    pub fn min_ratio(&self) -> f64 {
        self.ratios.first().copied().unwrap_or(0.0)
    }
    pub fn median_ratio(&self) -> f64 {
        self.ratios
            .get(self.ratios.len() / 2)
            .copied()
            .unwrap_or(0.0)
    }
    /// The target: 40 MiB and 0.1 MiB a tenant.
    pub fn rss_target_mib(&self) -> f64 {
        40.0 + 0.1 * self.tenants as f64
    }
}

/// MDE's limits divided by ten.
fn tenant_limits() -> Vec<RateLimit> {
    suite::mde_limits()
        .into_iter()
        .map(|l| RateLimit {
            calls: l.calls / 10,
            window: l.window,
        })
        .collect()
}

fn posts(sim: &SimHandle) -> u64 {
    sim.stats().offboard_requests_by_machine.values().sum()
}

pub async fn many_tenants_row(config: &Config, tenants: usize, per_tenant: usize) -> ManyTenants {
    let scale = config.time_scale;
    let limits = suite::scaled(&tenant_limits(), scale, 1.0);
    let sim_limits: Vec<simulator::RateLimit> = tenant_limits()
        .iter()
        .map(|l| simulator::RateLimit {
            calls: l.calls,
            window: l.window,
        })
        .collect();
    let stage = suite::stage(100, scale).await;
    let client = stage.client.clone();
    let mut sims = Vec::with_capacity(tenants);
    let mut machines = Vec::with_capacity(tenants);
    for t in 0..tenants {
        let sim = simulator::spawn(
            SimConfig {
                tenant_id: format!("tenant-{t}"),
                client_id: format!("app-{t}"),
                client_secret: format!("secret-{t}"),
                rate_limits: sim_limits.clone(),
                ..suite::sim_config(per_tenant * 5 / 4 + 100, scale)
            },
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .await
        .unwrap();
        // Listed with a generous client (the listing is not measured).
        let helper = suite::mde_client_as(
            &sim,
            suite::scaled(&suite::mde_limits(), scale, 1.0),
            std::sync::Arc::new(suite::Throttled::default()),
        );
        machines.push(suite::windows_machines(&helper, per_tenant).await);
        let namespace = format!("tenant-{t}");
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        create_connection(&client, &namespace, "mde", &sim)
            .await
            .unwrap();
        sims.push(sim);
    }
    let hosts: Vec<String> = sims.iter().map(sim_host).collect();
    let mut run_config = config.clone();
    run_config.run_args.extend([
        "--connections".into(),
        format!("--connection-allowed-hosts={}", hosts.join(",")),
    ]);
    let mut run = suite::start_run(&run_config, &stage, &limits);
    // Every connection signed in before the clock starts: sign-in is not
    // what this row measures.
    let connections: Api<defender_offboard::operator::tenants::resource::DefenderConnection> =
        Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let listed = connections.list(&Default::default()).await.unwrap();
        let ready = listed
            .items
            .iter()
            .filter(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == tenants {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    // Tenant after tenant, each tenant's resources at once; each tenant's
    // ceiling counts from its first apply, and its POSTs are watched while
    // the others are applied.
    let first_applied = std::sync::Mutex::new(vec![None::<Instant>; tenants]);
    let work: Vec<(usize, usize)> = (0..tenants)
        .flat_map(|t| (0..per_tenant).map(move |i| (t, i)))
        .collect();
    let apply = async {
        futures::stream::iter(work)
            .for_each_concurrent(64, |(t, i)| {
                let client = client.clone();
                let machine = machines[t][i].clone();
                let first_applied = &first_applied;
                async move {
                    first_applied.lock().unwrap()[t].get_or_insert_with(Instant::now);
                    let mut obj = suite::resource(&format!("r-{i}"), &machine);
                    obj.metadata.namespace = Some(format!("tenant-{t}"));
                    obj.spec.connection_ref =
                        Some(defender_offboard::crd::ConnectionRef { name: "mde".into() });
                    Api::<defender_offboard::crd::DeviceOffboard>::namespaced(
                        client,
                        &format!("tenant-{t}"),
                    )
                    .create(&PostParams::default(), &obj)
                    .await
                    .unwrap();
                }
            })
            .await;
        started.elapsed()
    };
    let ceiling = suite::ceiling(per_tenant, &limits);
    let watch = async {
        let deadline = Instant::now() + (ceiling * 4).max(Duration::from_secs(120)) * 2;
        let mut done: Vec<Option<Duration>> = vec![None; tenants];
        while done.iter().any(Option::is_none) && Instant::now() < deadline {
            for (t, sim) in sims.iter().enumerate() {
                let first = first_applied.lock().unwrap()[t];
                if done[t].is_none()
                    && let Some(first) = first
                    && posts(sim) >= per_tenant as u64
                {
                    done[t] = Some(first.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done
    };
    let (applied, done) = tokio::join!(apply, watch);
    let (peak_rss_mib, cpu_seconds) = suite::usage(run.pid);
    let mut ratios: Vec<f64> = done
        .iter()
        .map(|d| d.map_or(0.0, |d| ceiling.as_secs_f64() / d.as_secs_f64()))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let stats: Vec<_> = sims.iter().map(SimHandle::stats).collect();
    let _ = run.child.start_kill();
    let _ = run.child.wait().await;
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    for sim in sims {
        sim.shutdown().await;
    }
    ManyTenants {
        tenants,
        per_tenant,
        ratios,
        ceiling,
        peak_rss_mib,
        cpu_seconds,
        posts: stats
            .iter()
            .flat_map(|s| s.offboard_requests_by_machine.values())
            .sum(),
        max_posts_per_machine: stats
            .iter()
            .map(suite::most_posts_for_one_machine)
            .max()
            .unwrap_or(0),
        throttled: stats.iter().map(|s| s.throttled).sum(),
        applied,
    }
}

/// The row's lines for the table.
pub fn table(row: &ManyTenants) -> String {
    format!(
        "\n### Many tenants\n\n\
         {} tenants (a simulator and a `DefenderConnection` each, MDE's limits divided by ten: 10/min, 150/h), {} resources each, applied at once (in {:.1} s):\n\n\
         | figure | value | target | ratio |\n|---|---|---|---|\n\
         | each tenant's ratio to its own ceiling ({:.1} s), min / median | {:.3} / {:.3} | ≥ 0.95 (worst) | |\n\
         | `run` peak RSS | {:.1} MiB | ≤ {:.1} MiB | {:.2} |\n\
         | `run` CPU per POST | {:.2} ms | | |\n\
         | POSTs / most for one machine / 429s | {} / {} / {} | {} / 1 / 0 | |\n",
        row.tenants,
        row.per_tenant,
        row.applied.as_secs_f64(),
        row.ceiling.as_secs_f64(),
        row.min_ratio(),
        row.median_ratio(),
        row.peak_rss_mib,
        row.rss_target_mib(),
        row.peak_rss_mib / row.rss_target_mib(),
        row.cpu_seconds * 1000.0 / row.posts.max(1) as f64,
        row.posts,
        row.max_posts_per_machine,
        row.throttled,
        row.tenants * row.per_tenant,
    )
}
