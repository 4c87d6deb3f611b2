//! The whole operator, end to end, beside the naive way: the in-memory
//! Kubernetes API and the MDE simulator (MDE's limits, time-scaled) run in
//! this process, `defender-offboard run` runs as a separate process, and the
//! figures come from what the API, the simulator and `/proc` show. No timing
//! is asserted anywhere; `cargo test` runs it with tiny sizes so it cannot rot.

use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use defender_offboard::devcluster::{self, ApiHandle, ApiServerConfig};
use defender_offboard::mde::client::{CallObserver, MAX_TOP};
use defender_offboard::mde::limiter::{ApiFamily, RateLimit, RateLimits};
use defender_offboard::mde::{
    BudgetWait, ClientConfig, ClientIdentity, Cloud, DefenderClient, Endpoints,
};
use defender_offboard::operator::cache::final_label::{FINAL_HOUR_LABEL, FINAL_LABEL, final_hour};
use defender_offboard::operator::offboard::poll_plan::{self, Density, InFlight};
use defender_offboard::simulator::{self, SimConfig, SimHandle};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{CustomResourceExt, ResourceExt};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const TENANT: &str = "sim-tenant";
const CLIENT: &str = "sim-client";
const SECRET: &str = "sim-secret";
pub const NAMESPACE: &str = "default";

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `defender-offboard` binary whose `run` is measured.
    pub bin: PathBuf,
    /// Resource counts of the rows (each a fresh API, simulator and `run`).
    pub sizes: Vec<usize>,
    /// Of the last row, how many resources are already final when `run`
    /// starts (the history a long-lived cluster keeps).
    pub history: usize,
    /// Simulated seconds per wall-clock second (MDE's windows divided by it).
    pub time_scale: f64,
    /// The time scale of the fairness and many-tenants rows: slower, so
    /// that applying a tenant's burst is not most of its minute.
    pub tenant_time_scale: f64,
    /// Resources applied one at a time, with the budget free, for the latency.
    pub latency_probes: usize,
    /// In-flight counts for the polling cost.
    pub polls: Vec<usize>,
    /// Resources of the run that shares the tenant with a second client.
    pub shared: usize,
    /// Extra arguments for `run` (e.g. `--adopt-window=0` to compare).
    pub run_args: Vec<String>,
    /// Which parts to run (all when empty): `polls`, `rows`, `naive`, `shared`, `hostile`.
    pub only: Vec<String>,
    /// The hostile namespace's resources, connections and recreations
    /// (no row when resources is 0).
    pub hostile: (usize, usize, usize),
    /// The fairness row's resources of tenant A and of tenant B (no row
    /// when A's is 0).
    pub fairness: (usize, usize),
    /// The many-tenants row: tenants and resources each (no row when 0).
    pub many_tenants: (usize, usize),
    /// The takeover row's resources (no row when 0) and lease.
    pub takeover: (usize, Duration),
    /// The in-flight row's resources (no row when 0) and how long all are
    /// held in flight together.
    pub in_flight: (usize, Duration),
}

impl Config {
    pub fn at_tenant_scale(&self) -> Config {
        Config {
            time_scale: self.tenant_time_scale,
            ..self.clone()
        }
    }

    pub fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// MDE's limits on every family: 100 a minute, 1500 an hour.
pub fn mde_limits() -> Vec<RateLimit> {
    vec![
        RateLimit {
            calls: 100,
            window: Duration::from_secs(60),
        },
        RateLimit {
            calls: 1500,
            window: Duration::from_secs(3600),
        },
    ]
}

pub fn scaled(limits: &[RateLimit], time_scale: f64, share: f64) -> RateLimits {
    RateLimits(
        limits
            .iter()
            .map(|l| RateLimit {
                calls: ((l.calls as f64 * share) as u32).max(1),
                window: l.window.div_f64(time_scale),
            })
            .collect(),
    )
}

/// `--rate-limit` text for `run`.
fn limits_flag(limits: &RateLimits) -> String {
    limits
        .0
        .iter()
        .map(|l| format!("{}/{}ms", l.calls, l.window.as_millis().max(1)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The earliest time the `n`-th call can go under sliding-window `limits`
/// (every call as early as allowed): the ceiling a perfect client reaches.
pub fn ceiling(n: usize, limits: &RateLimits) -> Duration {
    ceiling_from(&vec![Duration::ZERO; n], limits)
}

/// [`ceiling`] for calls that cannot go before their resource exists:
/// `arrivals[k]` is when the k-th resource was created (in order).
pub fn ceiling_from(arrivals: &[Duration], limits: &RateLimits) -> Duration {
    let n = arrivals.len();
    let mut times: Vec<Duration> = Vec::with_capacity(n);
    for k in 0..n {
        let mut t = times.last().copied().unwrap_or_default().max(arrivals[k]);
        for l in &limits.0 {
            let calls = l.calls as usize;
            if k >= calls {
                t = t.max(times[k - calls] + l.window);
            }
        }
        times.push(t);
    }
    times.last().copied().unwrap_or_default()
}

pub struct Stage {
    pub api: ApiHandle,
    pub sim: SimHandle,
    pub dir: tempfile::TempDir,
    pub client: kube::Client,
}

pub async fn stage(machines: usize, time_scale: f64) -> Stage {
    stage_with(sim_config(machines, time_scale)).await
}

/// A simulated tenant with `machines` and MDE's own limits (the simulator
/// divides its windows by the time scale).
pub fn sim_config(machines: usize, time_scale: f64) -> SimConfig {
    SimConfig {
        machines,
        time_scale,
        rate_limits: simulator::RateLimits::mde().0,
        ..SimConfig::default()
    }
}

/// [`stage`] with the operator's own tenant simulated as `sim` says (its
/// tenant, app and secret are `run`'s).
pub async fn stage_with(sim: SimConfig) -> Stage {
    let sim = simulator::spawn(
        SimConfig {
            tenant_id: TENANT.into(),
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            ..sim
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let api = devcluster::spawn_api(
        ApiServerConfig {
            crds: vec![
                DeviceOffboard::crd(),
                defender_offboard::operator::tenants::resource::DefenderConnection::crd(),
            ],
            ..ApiServerConfig::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let client = api.client().await.unwrap();
    Stage {
        api,
        sim,
        dir: tempfile::tempdir().unwrap(),
        client,
    }
}

pub fn mde_client(
    sim: &SimHandle,
    limits: RateLimits,
    observer: Arc<dyn CallObserver>,
) -> DefenderClient {
    mde_client_as(sim, limits, observer)
}

/// A client of `sim` signing in with the simulator's own tenant, app and secret.
pub fn mde_client_as(
    sim: &SimHandle,
    limits: RateLimits,
    observer: Arc<dyn CallObserver>,
) -> DefenderClient {
    let url = sim.base_url();
    let identity = sim.config();
    DefenderClient::new(
        ClientConfig {
            endpoints: Endpoints::new(Cloud::Commercial, Some(&url), Some(&url)).unwrap(),
            identity: ClientIdentity::from_parts(
                Some(identity.tenant_id),
                Some(identity.client_id),
                Some(identity.client_secret),
                None,
                None,
            )
            .unwrap(),
            rate_limits: limits,
            request_timeout: Duration::from_secs(10),
            budget_wait: BudgetWait::Wait,
        },
        observer,
    )
    .unwrap()
}

/// Counts 429 answers per family.
#[derive(Default)]
pub struct Throttled(pub AtomicU64);

impl CallObserver for Throttled {
    fn request_finished(&self, _family: ApiFamily, status: u16) {
        if status == 429 {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

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
    assert!(ids.len() >= n, "{} Windows machines, {n} wanted", ids.len());
    ids.truncate(n);
    ids
}

pub fn resource(name: &str, machine: &str) -> DeviceOffboard {
    let mut obj = DeviceOffboard::new(
        name,
        DeviceOffboardSpec {
            machine_id: Some(machine.into()),
            device_name: None,
            comment: "decommissioned (benchmark)".into(),
            ttl_seconds_after_finished: None,
            connection_ref: None,
            node: None,
        },
    );
    obj.metadata.namespace = Some(NAMESPACE.into());
    obj
}

/// When each resource got its action id and its final phase, seen from a watch.
#[derive(Default)]
pub struct Seen {
    pub recorded: HashMap<String, Instant>,
    pub finished: HashMap<String, Instant>,
}

async fn watch_all(client: &kube::Client, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    watch_namespace(client, NAMESPACE, seen).await
}

/// Record into `seen` when each resource of `namespace` got its action id
/// and its final phase. Returns once the watch's first list is read: a
/// watch still listing a long history would see the first new resource
/// seconds after `run` wrote it, and count its own lag as the operator's.
pub async fn watch_namespace(
    client: &kube::Client,
    namespace: &str,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), namespace);
    let (synced, listed) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default());
        futures::pin_mut!(stream);
        let mut synced = Some(synced);
        while let Ok(Some(event)) = stream.try_next().await {
            let obj = match event {
                watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => obj,
                watcher::Event::InitDone => {
                    if let Some(synced) = synced.take() {
                        let _ = synced.send(());
                    }
                    continue;
                }
                _ => continue,
            };
            let status = obj.status.clone().unwrap_or_default();
            let mut seen = seen.lock().unwrap();
            let now = Instant::now();
            if status.machine_action_id.is_some() {
                seen.recorded.entry(obj.name_any()).or_insert(now);
            }
            if status.phase.is_some_and(Phase::is_terminal) {
                seen.finished.entry(obj.name_any()).or_insert(now);
            }
        }
    });
    // Bounded: a watch that cannot list ends the wait, not the benchmark.
    let _ = tokio::time::timeout(Duration::from_secs(300), listed).await;
    task
}

/// `run` as its own process against the stage.
pub struct Run {
    pub child: tokio::process::Child,
    pub pid: u32,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18_080)
}

pub fn start_run(config: &Config, stage: &Stage, limits: &RateLimits) -> Run {
    start_run_logged(config, stage, limits, "run")
}

/// [`start_run`], its stderr in `<name>.log` (several `run`s on one stage).
pub fn start_run_logged(config: &Config, stage: &Stage, limits: &RateLimits, name: &str) -> Run {
    let kubeconfig = stage.dir.path().join("kubeconfig");
    stage.api.write_kubeconfig(&kubeconfig).unwrap();
    let secret = stage.dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    // The stage's directory goes with it; `BENCH_KEEP_LOG=PREFIX` writes
    // `run`'s log to `PREFIX-<name>.log` instead, to be read afterwards.
    let log_path = match std::env::var("BENCH_KEEP_LOG") {
        Ok(prefix) => PathBuf::from(format!("{prefix}-{name}.log")),
        Err(_) => stage.dir.path().join(format!("{name}.log")),
    };
    let log = std::fs::File::create(log_path).unwrap();
    let scale = |secs: f64| format!("{}ms", ((secs * 1000.0 / config.time_scale) as u64).max(1));
    let child = tokio::process::Command::new(&config.bin)
        .arg("run")
        .args(["--rate-limit", &limits_flag(limits)])
        // The breaker's hour is wall time, not scaled: off, as it would hold
        // every row past its first 100 sends.
        .arg("--max-offboards-per-hour=0")
        // MDE's offboards take minutes; a poll a minute keeps the reads for the
        // machine checks that precede each send.
        .args(["--poll-interval", &scale(60.0)])
        .args(["--lookup-delay", &scale(35.0)])
        // The poll's margin for MDE's clock, scaled like every other time:
        // unscaled, each window would reach back over the whole run.
        .args(["--clock-skew", &scale(300.0)])
        .args(["--retry-backoff", &scale(10.0)])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(&config.run_args)
        .env("KUBECONFIG", &kubeconfig)
        .env("AZURE_TENANT_ID", TENANT)
        .env("AZURE_CLIENT_ID", CLIENT)
        .env("AZURE_CLIENT_SECRET_FILE", &secret)
        .env("DEFENDER_API_URL", stage.sim.base_url())
        .env("AZURE_AUTHORITY_HOST", stage.sim.base_url())
        // `BENCH_RUN_LOG=info` for `run`'s start-up steps (see benchmarks.md).
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUN_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("defender-offboard run starts");
    let pid = child.id().unwrap_or_default();
    Run { child, pid }
}

/// A `/proc/<pid>/status` figure in KiB (`VmHWM`, `VmRSS`; Linux, zero elsewhere).
pub fn proc_status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The most POSTs the simulator counted for one machine (1: exactly once).
pub fn most_posts_for_one_machine(stats: &simulator::SimStats) -> u64 {
    stats
        .offboard_requests_by_machine
        .values()
        .copied()
        .max()
        .unwrap_or(0)
}

/// Peak RSS (`VmHWM`, KiB) and CPU seconds (user + system) of a live process,
/// read from `/proc` (Linux; zero elsewhere).
pub fn usage(pid: u32) -> (f64, f64) {
    let hwm_kib = proc_status_kib(pid, "VmHWM");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `state`;
    // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    (hwm_kib / 1024.0, ticks / 100.0)
}

/// One row: `n` resources applied at once (after the latency probes), with
/// `history` final ones already in the cluster.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub resources: usize,
    pub history: usize,
    pub latency_ms: Vec<f64>,
    pub elapsed: Duration,
    pub ceiling: Duration,
    pub posts: u64,
    pub throttled: u64,
    pub duplicates: u64,
    pub final_count: usize,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
    pub second_client_posts: u64,
    /// Machine-action reads (`GET /api/machineactions...`) answered during the burst.
    pub reads: u64,
    /// When the simulator had seen every POST (sampled every 250 ms).
    pub all_posted: Option<Duration>,
    /// Of those, lists of one machine's actions (the exact machine checks).
    pub machine_lists: u64,
    /// Simulated minutes the burst took (for reads per minute).
    pub simulated_minutes: f64,
    /// How long applying the burst's resources took (the operator sends meanwhile).
    pub applied: Duration,
    /// How far the k-th POST of the burst came after the ceiling's k-th call
    /// (simulated seconds, from MDE's action times), at the last call of
    /// each hour's budget.
    pub slips: Vec<(usize, f64)>,
    /// `run` started → its first resource's action recorded (the first
    /// probe, applied as `run` starts), and the MDE reads (machines and
    /// machine actions) spent meanwhile.
    pub cold_start: Option<(Duration, u64)>,
}

/// MDE reads the simulator answered: machines and machine actions, any status.
pub fn mde_reads(stats: &simulator::SimStats) -> u64 {
    ["machines", "machineactions"]
        .iter()
        .filter_map(|family| stats.requests.get(*family))
        .flat_map(|by_status| by_status.values())
        .sum()
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.ceiling.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn posts_per_resource(&self) -> f64 {
        self.posts as f64 / self.resources.max(1) as f64
    }
}

/// Seed `count` final, labelled resources straight into the API.
async fn seed_history(client: &kube::Client, count: usize) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..count)
        .for_each_concurrent(64, |i| {
            let api = api.clone();
            async move {
                let name = format!("history-{i}");
                let mut obj = resource(&name, &format!("{:040x}", i));
                obj.labels_mut().insert(FINAL_LABEL.into(), "true".into());
                // Labelled as the operator labels a resource that finished a day ago.
                obj.labels_mut().insert(
                    FINAL_HOUR_LABEL.into(),
                    final_hour(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24)),
                );
                api.create(&PostParams::default(), &obj).await.unwrap();
                let status = DeviceOffboardStatus {
                    phase: Some(Phase::Succeeded),
                    action_status: Some("Succeeded".into()),
                    machine_action_id: Some(uuid::Uuid::new_v4().to_string()),
                    ..Default::default()
                };
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status })),
                )
                .await
                .unwrap();
            }
        })
        .await;
}

/// Apply `n` resources (plus latency probes first), run until all are final.
pub async fn operator_row(config: &Config, n: usize, history: usize, share: f64) -> Row {
    let probes = config.latency_probes;
    let stage = stage((2 * n + probes) * 5 / 4 + 200, config.time_scale).await;
    let ours = scaled(&mde_limits(), config.time_scale, 1.0 - share);
    let full = scaled(&mde_limits(), config.time_scale, 1.0);
    let helper = mde_client(&stage.sim, full.clone(), Arc::new(Throttled::default()));
    let machines = windows_machines(&helper, n + probes + if share > 0.0 { n } else { 0 }).await;
    seed_history(&stage.client, history).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = watch_all(&stage.client, seen.clone()).await;
    let reads_before = mde_reads(&stage.sim.stats());
    let run_started = Instant::now();
    let mut run = start_run(config, &stage, &ours);
    let api: Api<DeviceOffboard> = Api::namespaced(stage.client.clone(), NAMESPACE);
    // Wait until `run` answers (its first watch is up) with one resource.
    let mut latency_ms = Vec::new();
    let mut cold_start = None;
    for (i, machine) in machines.iter().take(probes).enumerate() {
        let name = format!("probe-{i}");
        let applied = Instant::now();
        api.create(&PostParams::default(), &resource(&name, machine))
            .await
            .unwrap();
        let deadline = applied + Duration::from_secs(120);
        loop {
            if let Some(at) = seen.lock().unwrap().recorded.get(&name) {
                latency_ms.push(at.duration_since(applied).as_secs_f64() * 1000.0);
                if i == 0 {
                    let reads = mde_reads(&stage.sim.stats()) - reads_before;
                    cold_start = Some((at.duration_since(run_started), reads));
                }
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The first probe includes `run`'s start-up; it is not a latency.
    if latency_ms.len() > 1 {
        latency_ms.remove(0);
    }
    // Let the probes' budget leave every window the burst would fill: the
    // ceiling is that of a fresh budget (with the probes' slots still in the
    // hour, the burst's 1500th call would wait for them, an hour late).
    let clear = ours
        .0
        .iter()
        .filter(|l| probes + n > l.calls as usize)
        .map(|l| l.window)
        .max()
        .unwrap_or_default();
    tokio::time::sleep(clear).await;
    let second_posts = Arc::new(AtomicU64::new(0));
    let second_throttled = Arc::new(Throttled::default());
    let second = (share > 0.0).then(|| {
        let client = mde_client(
            &stage.sim,
            scaled(&mde_limits(), config.time_scale, share),
            second_throttled.clone(),
        );
        let theirs: Vec<String> = machines[probes + n..].to_vec();
        let counter = second_posts.clone();
        tokio::spawn(async move {
            for machine in theirs {
                if client.offboard(&machine, "another tool").await.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    });
    let before = stage.sim.stats();
    let posts_of = |stats: &simulator::SimStats| -> u64 {
        stats
            .offboard_requests_by_key
            .iter()
            .filter(|(key, _)| !key.is_empty())
            .map(|(_, count)| *count)
            .sum()
    };
    let started = Instant::now();
    futures::stream::iter(machines[probes..probes + n].iter().enumerate())
        .for_each_concurrent(16, |(i, machine)| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &resource(&format!("r-{i}"), machine),
                )
                .await
                .unwrap();
            }
        })
        .await;
    let applied = started.elapsed();
    let deadline =
        started + Duration::from_secs_f64((ceiling(n, &ours).as_secs_f64() * 3.0).max(60.0));
    let posted_before = posts_of(&before);
    let mut all_posted: Option<Duration> = None;
    let mut sampled = Instant::now();
    let final_count = loop {
        if all_posted.is_none() && sampled.elapsed() >= Duration::from_millis(250) {
            sampled = Instant::now();
            if posts_of(&stage.sim.stats()) - posted_before >= n as u64 {
                all_posted = Some(started.elapsed());
            }
        }
        let done = (0..n)
            .filter(|i| {
                seen.lock()
                    .unwrap()
                    .finished
                    .contains_key(&format!("r-{i}"))
            })
            .count();
        if done == n || Instant::now() > deadline {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let (peak_rss_mib, cpu_seconds) = usage(run.pid);
    if let Some(task) = second {
        task.abort();
    }
    let _ = run.child.start_kill();
    let _ = run.child.wait().await;
    watch.abort();
    let after = stage.sim.stats();
    let ours_keys: u64 = posts_of(&after) - posts_of(&before);
    let row = Row {
        resources: n,
        history,
        latency_ms,
        elapsed,
        ceiling: ceiling(n, &ours),
        posts: ours_keys,
        // The operator's 429s: every offboard refusal the simulator served
        // minus the second client's.
        throttled: (after.count("offboard", "429") - before.count("offboard", "429"))
            .saturating_sub(second_throttled.0.load(Ordering::Relaxed)),
        duplicates: after
            .offboard_requests_by_key
            .iter()
            .filter(|(key, count)| !key.is_empty() && **count > 1)
            .count() as u64,
        final_count,
        peak_rss_mib,
        cpu_seconds,
        second_client_posts: second_posts.load(Ordering::Relaxed),
        reads: family_calls(&after, "machineactions") - family_calls(&before, "machineactions"),
        all_posted,
        machine_lists: after.machine_action_lists - before.machine_action_lists,
        simulated_minutes: elapsed.as_secs_f64() * config.time_scale / 60.0,
        slips: slips(&helper, n, share, &full).await,
        cold_start,
        applied,
    };
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    row
}

/// The burst's POSTs at MDE against the ceiling's schedule: the creation
/// times of the last `n` offboard actions (the simulator stamps wall-clock
/// time), each minus the earliest time a perfect client under `limits` could
/// make that call, at the end of each hour's budget. Empty when a second
/// client shares the tenant.
async fn slips(
    helper: &DefenderClient,
    n: usize,
    share: f64,
    limits: &RateLimits,
) -> Vec<(usize, f64)> {
    if share > 0.0 || n == 0 {
        return Vec::new();
    }
    let since = jiff::Timestamp::UNIX_EPOCH;
    let Ok(actions) = helper.offboard_actions_since(since, MAX_TOP, &[]).await else {
        return Vec::new();
    };
    let mut times: Vec<jiff::Timestamp> = actions
        .iter()
        .filter_map(|a| a.creation_date_time_utc.as_deref()?.parse().ok())
        .collect();
    times.sort();
    let burst = &times[times.len().saturating_sub(n)..];
    let Some(first) = burst.first().copied() else {
        return Vec::new();
    };
    let hour = mde_limits()[1].calls as usize;
    let first_hour = [100, 500, 1000].into_iter().filter(|k| *k < n.min(hour));
    first_hour
        .chain((1..=n.div_ceil(hour)).map(|h| (h * hour).min(n)))
        // The read may hold fewer than `n` (a lost page): only calls it saw.
        .filter_map(|k| {
            let at = burst.get(k - 1)?.duration_since(first).as_secs_f64();
            Some((k, at - ceiling(k, limits).as_secs_f64()))
        })
        .collect()
}

/// Every answer the simulator served in `family`, whatever its status.
fn family_calls(stats: &simulator::SimStats, family: &str) -> u64 {
    stats
        .requests
        .get(family)
        .map_or(0, |by_status| by_status.values().sum())
}

/// The way people offboard today: a loop that POSTs, sleeps 0.5 s and never
/// reads `Retry-After` (a 429 is a device left onboarded).
#[derive(Clone, Debug, Default)]
pub struct Naive {
    pub resources: usize,
    pub elapsed: Duration,
    pub throttled: u64,
    pub lost: u64,
    pub posts: u64,
}

pub async fn naive_row(config: &Config, n: usize) -> Naive {
    let stage = stage(n * 5 / 4 + 200, config.time_scale).await;
    let helper = mde_client(
        &stage.sim,
        scaled(&mde_limits(), config.time_scale, 1.0),
        Arc::new(Throttled::default()),
    );
    let machines = windows_machines(&helper, n).await;
    let http = reqwest::Client::new();
    let token: serde_json::Value = http
        .post(stage.sim.token_url(TENANT))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("scope", "https://api.securitycenter.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pause = Duration::from_secs_f64(0.5 / config.time_scale);
    let started = Instant::now();
    let (mut throttled, mut lost, mut posts) = (0, 0, 0);
    for machine in &machines {
        posts += 1;
        let answer = http
            .post(format!(
                "{}/api/machines/{machine}/offboard",
                stage.sim.base_url()
            ))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "Comment": "decommissioned (loop)" }))
            .send()
            .await;
        match answer.map(|r| r.status().as_u16()) {
            Ok(429) => {
                throttled += 1;
                lost += 1;
            }
            Ok(s) if (200..300).contains(&s) => {}
            _ => lost += 1,
        }
        tokio::time::sleep(pause).await;
    }
    let elapsed = started.elapsed();
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    Naive {
        resources: n,
        elapsed,
        throttled,
        lost,
        posts,
    }
}

/// MDE read calls one poll costs with `k` actions in flight, with the
/// poller's own plan, against a simulator without limits.
pub async fn poll_cost(k: usize) -> (usize, usize) {
    let sim = simulator::spawn(
        SimConfig {
            machines: k * 5 / 4 + 100,
            rate_limits: Vec::new(),
            pending_for: Duration::from_secs(86_400),
            ..SimConfig::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let client = mde_client(&sim, RateLimits(Vec::new()), Arc::new(Throttled::default()));
    let machines = windows_machines(&client, k).await;
    let since = jiff::Timestamp::now();
    let ids: Vec<String> = futures::stream::iter(&machines)
        .map(|m| {
            let client = client.clone();
            async move { client.offboard(m, "in flight").await.unwrap().id }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let in_flight: Vec<InFlight> = ids
        .iter()
        .map(|id| InFlight {
            id: id.clone(),
            since: Some(since),
        })
        .collect();
    let now = jiff::Timestamp::now();
    let plan = poll_plan::plan(&in_flight, now, Density::default());
    let before = sim.stats().count("machineactions", "200");
    let mut found = 0;
    if let Some(window) = plan.window_since {
        found += client
            .offboard_actions_since(window, MAX_TOP, &ids)
            .await
            .unwrap()
            .iter()
            .filter(|a| ids.contains(&a.id))
            .count();
    }
    if !plan.by_ids.is_empty() {
        found += client
            .machine_actions_by_ids(&plan.by_ids)
            .await
            .unwrap()
            .len();
    }
    let calls = (sim.stats().count("machineactions", "200") - before) as usize;
    assert_eq!(found, k, "the poll found every action in flight");
    sim.shutdown().await;
    (
        calls,
        k.div_ceil(defender_offboard::mde::client::IDS_PER_QUERY),
    )
}

/// Every figure of the table.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub shared: Option<Row>,
    pub naive: Option<Naive>,
    pub polls: Vec<(usize, usize, usize)>,
    pub hostile: Option<super::hostile::Hostile>,
    pub fairness: Option<super::fairness::Fairness>,
    pub takeover: Option<super::takeover::Takeover>,
    pub many_tenants: Option<super::many_tenants::ManyTenants>,
    pub in_flight: Option<super::in_flight::InFlight>,
    pub wall: Duration,
}

pub async fn run(config: &Config) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    for &k in config.polls.iter().filter(|_| config.runs("polls")) {
        let (calls, old) = poll_cost(k).await;
        eprintln!("poll of {k} in flight: {calls} calls");
        report.polls.push((k, calls, old));
    }
    let last = config.sizes.len().saturating_sub(1);
    for (i, &size) in config
        .sizes
        .iter()
        .enumerate()
        .filter(|_| config.runs("rows"))
    {
        let history = if i == last && config.history > 0 {
            config.history.min(size)
        } else {
            0
        };
        let row = operator_row(config, size - history, history, 0.0).await;
        eprintln!("{row:?}");
        report.rows.push(row);
    }
    // The loop gets as many resources as the largest fresh row.
    if let Some(&biggest) = config.sizes.iter().max().filter(|_| config.runs("naive")) {
        let naive = naive_row(config, biggest.saturating_sub(config.history).max(1)).await;
        eprintln!("{naive:?}");
        report.naive = Some(naive);
    }
    if config.shared > 0 && config.runs("shared") {
        report.shared = Some(operator_row(config, config.shared, 0, 0.5).await);
    }
    let (resources, connections, recreate) = config.hostile;
    if resources > 0 && config.runs("hostile") {
        let row = super::hostile::hostile_row(config, resources, connections, recreate).await;
        eprintln!("{row:?}");
        report.hostile = Some(row);
    }
    let (a, b) = config.fairness;
    if a > 0 && config.runs("fairness") {
        let slower = config.at_tenant_scale();
        let row = super::fairness::fairness_row(&slower, a, b).await;
        eprintln!("{row:?}");
        report.fairness = Some(row);
    }
    let (n, lease) = config.takeover;
    if n > 0 && config.runs("takeover") {
        let row = super::takeover::takeover_row(config, n, lease).await;
        eprintln!("{row:?}");
        report.takeover = Some(row);
    }
    let (tenants, each) = config.many_tenants;
    if tenants > 0 && config.runs("tenants") {
        let slower = config.at_tenant_scale();
        let row = super::many_tenants::many_tenants_row(&slower, tenants, each).await;
        eprintln!("{row:?}");
        report.many_tenants = Some(row);
    }
    let (n, hold) = config.in_flight;
    if n > 0 && config.runs("inflight") {
        let row = super::in_flight::in_flight_row(config, n, hold).await;
        eprintln!("{row:?}");
        report.in_flight = Some(row);
    }
    report.wall = started.elapsed();
    report
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The table, as Markdown.
pub fn table(report: &Report, config: &Config) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "MDE limits 100/60s and 1500/3600s per family, time scale x{} (an hour in {:.1} s; the fairness and many-tenants rows x{})",
        config.time_scale,
        3600.0 / config.time_scale,
        config.tenant_time_scale
    ));
    line(String::new());
    line(
        "| measure | defender-offboard | naive loop (0.5 s sleep, no Retry-After) | target |"
            .into(),
    );
    line("|---|---|---|---|".into());
    let main = report
        .rows
        .iter()
        .filter(|r| r.history == 0)
        .max_by_key(|r| r.resources);
    if let Some(r) = main {
        line(format!(
            "| apply → action recorded, budget free (p50 / p99, {} probes) | {:.1} ms / {:.1} ms | — | ≤ 50 ms / ≤ 250 ms |",
            r.latency_ms.len(),
            percentile(&r.latency_ms, 50.0),
            percentile(&r.latency_ms, 99.0)
        ));
        let naive = report.naive.clone().unwrap_or_default();
        let naive_done = naive.posts.saturating_sub(naive.lost);
        line(format!(
            "| {} resources: {} final in | {:.1} s ({:.2} simulated h; applying them took {:.1} s) | {:.1} s, {} of {} offboarded | |",
            r.resources,
            r.final_count,
            r.elapsed.as_secs_f64(),
            r.elapsed.as_secs_f64() * config.time_scale / 3600.0,
            r.applied.as_secs_f64(),
            naive.elapsed.as_secs_f64(),
            naive_done,
            naive.resources
        ));
        line(format!(
            "| ceiling N / rate (earliest N-th call under both windows) | {:.1} s → ratio {:.3} (every POST at MDE by {}) | — | ratio ≥ 0.95 |",
            r.ceiling.as_secs_f64(),
            r.ratio(),
            r.all_posted
                .map_or("—".to_string(), |t| format!("{:.1} s", t.as_secs_f64()))
        ));
        if !r.slips.is_empty() {
            let slips: Vec<String> = r
                .slips
                .iter()
                .map(|(k, slip)| format!("{k}: {slip:.2} s"))
                .collect();
            line(format!(
                "| k-th POST at MDE behind the ceiling's k-th call | {} | — | |",
                slips.join(", ")
            ));
        }
        line(format!(
            "| POSTs per resource | {:.3} ({} POSTs, {} keys with more than one) | {:.3} (lost requests: {}) | exactly 1 |",
            r.posts_per_resource(),
            r.posts,
            r.duplicates,
            naive.posts as f64 / naive.resources.max(1) as f64,
            naive.lost
        ));
        line(format!(
            "| 429 answers | {} | {} | 0 |",
            r.throttled, naive.throttled
        ));
        line(format!(
            "| MDE machine-action reads during the burst | {} ({} of one machine's actions; {:.2} per resource, {:.1} per simulated minute) | — | |",
            r.reads,
            r.machine_lists,
            r.reads as f64 / r.resources.max(1) as f64,
            r.reads as f64 / r.simulated_minutes.max(1e-9)
        ));
    }
    for (k, calls, old) in &report.polls {
        line(format!(
            "| MDE read calls per poll interval, {k} in flight | {calls} | — (one GET per action: {k}; before this change: {old}) | ≤ 1 at 1,000 |"
        ));
    }
    for r in &report.rows {
        line(format!(
            "| `run` peak RSS / CPU, {} resources ({} already final) | {:.1} MiB / {:.1} s | — | ≤ 40 MiB at 10,000 |",
            r.resources + r.history,
            r.history,
            r.peak_rss_mib,
            r.cpu_seconds
        ));
    }
    for r in report.rows.iter().filter(|r| r.history > 0) {
        if let Some((took, reads)) = r.cold_start {
            line(format!(
                "| cold start beside {} final: `run` started → a new resource's action recorded (applied as `run` starts, the process start included) | {:.2} s, {} MDE reads meanwhile | — | ≤ 2 s |",
                r.history,
                took.as_secs_f64(),
                reads
            ));
        }
    }
    if let Some(s) = &report.shared {
        line(format!(
            "| second client eating half the budget: {} resources final in | {:.1} s, ratio {:.3} of the remaining budget's ceiling ({:.1} s); {} × 429; {:.3} POSTs per resource; other client sent {} | — | |",
            s.resources,
            s.elapsed.as_secs_f64(),
            s.ratio(),
            s.ceiling.as_secs_f64(),
            s.throttled,
            s.posts_per_resource(),
            s.second_client_posts
        ));
    }
    if let Some(hostile) = &report.hostile {
        line(super::hostile::table(hostile));
    }
    if let Some(fairness) = &report.fairness {
        line(super::fairness::table(fairness));
    }
    if let Some(takeover) = &report.takeover {
        line(super::takeover::table(takeover));
    }
    if let Some(many) = &report.many_tenants {
        line(super::many_tenants::table(many));
    }
    if let Some(in_flight) = &report.in_flight {
        line(super::in_flight::table(in_flight));
    }
    line(String::new());
    line(format!(
        "Whole benchmark: {:.0} s wall.",
        report.wall.as_secs_f64()
    ));
    out
}
