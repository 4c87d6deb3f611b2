//! Throughput, polling cost and memory of the MDE client against the in-process
//! simulator under MDE's real limits (100/60s and 1500/3600s, sliding windows),
//! time-scaled so an hour passes in seconds. Prints figures; asserts no timings.
//! It exits non-zero only when correctness breaks: a 429, a duplicate offboard
//! or a failed call.
//!
//! `cargo bench --bench throughput [-- --time-scale 120 --offboards 1600]`

#[path = "../tests/it/common.rs"]
mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::{FAST_LIMITS, client_config, spawn_sim, windows_machines};
use defender_offboard::mde::client::IDS_PER_QUERY;
use defender_offboard::mde::limiter::{RateLimit, RateLimits};
use defender_offboard::mde::{ClientConfig, DefenderClient};
use defender_offboard::metrics::Metrics;
use defender_offboard::simulator::{SimConfig, SimHandle};
use futures::StreamExt;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Simulated seconds per wall-clock second (120: an hour in 30 s).
    #[arg(long, default_value_t = 120.0)]
    time_scale: f64,
    /// Offboards to send; more than one hour's budget (1500) shows the hourly limit.
    #[arg(long, default_value_t = 1600)]
    offboards: usize,
    /// Offboards sent at once; the client's budget decides when each goes.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// In-flight action counts to poll.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    poll: Vec<usize>,
    /// Actions created in the memory measurement (no rate limit there).
    #[arg(long, default_value_t = 10_000)]
    memory_actions: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limits = RateLimits::default();
    println!(
        "defender-offboard throughput benchmark: limits {limits} (sliding), time scale {} \
         (1 simulated hour = {:.1} s), {cores} cores",
        args.time_scale,
        3600.0 / args.time_scale
    );

    let throughput = offboard_throughput(&args, &limits).await;
    throughput.print(&limits);
    let polls = polling_cost(&throughput, &args.poll).await;
    print_polls(&polls);
    let peak_before_memory = status_kib("VmHWM");
    let memory = memory_per_action(args.memory_actions).await;
    print_memory(&memory, peak_before_memory);

    let polls_ok = polls
        .iter()
        .all(|p| p.calls == p.expected && p.found == p.k);
    if throughput.is_correct() && polls_ok {
        ExitCode::SUCCESS
    } else {
        println!("FAILED: see the rows marked \"must be\" above");
        ExitCode::FAILURE
    }
}

/// The client's budget for a simulator running `time_scale` times faster.
fn scaled(limits: &RateLimits, time_scale: f64) -> RateLimits {
    RateLimits(
        limits
            .0
            .iter()
            .map(|l| RateLimit {
                window: l.window.div_f64(time_scale),
                ..*l
            })
            .collect(),
    )
}

fn client(sim: &SimHandle, limits: RateLimits) -> DefenderClient {
    let config = ClientConfig {
        rate_limits: limits,
        ..client_config(sim, "sim-secret", FAST_LIMITS)
    };
    DefenderClient::new(config, Arc::new(Metrics::default())).expect("client")
}

struct Throughput {
    time_scale: f64,
    /// Wall-clock offsets from the first answer, sorted.
    answered: Vec<Duration>,
    wall: Duration,
    errors: usize,
    throttled: u64,
    duplicates: u64,
    action_ids: Vec<String>,
    /// Kept so polling reads the same actions.
    sim: SimHandle,
    client: DefenderClient,
}

async fn offboard_throughput(args: &Args, limits: &RateLimits) -> Throughput {
    let sim = spawn_sim(SimConfig {
        time_scale: args.time_scale,
        // Enough Windows machines (about 9 in 10 generated ones) for every offboard.
        machines: args.offboards * 5 / 4 + 100,
        // Actions stay in flight for the polling measurement.
        pending_for: Duration::from_secs(10 * 3600),
        ..SimConfig::default()
    })
    .await;
    let client = client(&sim, scaled(limits, args.time_scale));
    let machines = windows_machines(&client, args.offboards).await;

    let start = Instant::now();
    let mut results = futures::stream::iter(machines.iter())
        .map(|id| {
            let client = client.clone();
            async move {
                let result = client.offboard(id, "benchmark").await;
                (Instant::now(), result)
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let (mut answered, mut errors, mut action_ids) = (Vec::new(), 0, Vec::new());
    while let Some((at, result)) = results.next().await {
        match result {
            Ok(action) => {
                answered.push(at);
                action_ids.push(action.id);
            }
            Err(error) => {
                errors += 1;
                eprintln!("offboard failed: {error}");
            }
        }
    }
    let wall = start.elapsed();
    drop(results);
    answered.sort();
    let first = answered.first().copied().unwrap_or(start);
    let stats = sim.stats();
    Throughput {
        time_scale: args.time_scale,
        answered: answered.iter().map(|t| *t - first).collect(),
        wall,
        errors,
        throttled: stats.throttled,
        duplicates: stats.duplicate_offboards,
        action_ids,
        sim,
        client,
    }
}

impl Throughput {
    fn is_correct(&self) -> bool {
        self.throttled == 0 && self.duplicates == 0 && self.errors == 0
    }

    fn print(&self, limits: &RateLimits) {
        println!();
        println!(
            "Offboard throughput: {} offboards, answered in {:.1} s wall ({:.1} simulated min)",
            self.answered.len(),
            self.wall.as_secs_f64(),
            self.wall.as_secs_f64() * self.time_scale / 60.0
        );
        println!(
            "  {:<40} {:>10} {:>10} {:>8}",
            "metric", "achieved", "ceiling", "ratio"
        );
        let mut sorted = limits.0.clone();
        sorted.sort_by_key(|l| l.window);
        for (i, limit) in sorted.iter().enumerate() {
            let window = limit.window.div_f64(self.time_scale);
            let name = window_name(limit.window);
            // Calls this limit alone governs: before any longer limit binds.
            let usable = sorted[i + 1..]
                .iter()
                .map(|l| l.calls as usize)
                .fold(self.answered.len(), usize::min);
            match sustained_rate(&self.answered[..usable], limit.calls as usize, window) {
                Some(rate) => row(
                    &format!("calls per simulated {name} (sustained)"),
                    rate,
                    limit.calls,
                ),
                None => println!(
                    "  {:<40} needs more than {} calls",
                    format!("calls per simulated {name} (sustained)"),
                    limit.calls
                ),
            }
            row(
                &format!("peak calls in any simulated {name}"),
                peak_in_window(&self.answered, window) as f64,
                limit.calls,
            );
        }
        println!(
            "  {:<40} {:>10}   (must be 0)",
            "429 answers seen", self.throttled
        );
        println!(
            "  {:<40} {:>10}   (must be 0)",
            "duplicate offboards", self.duplicates
        );
        println!("  {:<40} {:>10}   (must be 0)", "failed calls", self.errors);
    }
}

fn window_name(window: Duration) -> String {
    match window.as_secs() {
        60 if window.subsec_nanos() == 0 => "minute".into(),
        3600 if window.subsec_nanos() == 0 => "hour".into(),
        _ => humantime::format_duration(window).to_string(),
    }
}

fn row(name: &str, achieved: f64, ceiling: u32) {
    println!(
        "  {name:<40} {achieved:>10.1} {ceiling:>10} {:>8.3}",
        achieved / f64::from(ceiling)
    );
}

/// Calls per window while the limit is the only constraint: whole rounds of
/// `calls` over the time from the first answer to the first of the next round.
fn sustained_rate(answered: &[Duration], calls: usize, window: Duration) -> Option<f64> {
    let rounds = answered.len().checked_sub(1)? / calls;
    if rounds == 0 {
        return None;
    }
    let span = answered[rounds * calls] - answered[0];
    Some((rounds * calls) as f64 * window.as_secs_f64() / span.as_secs_f64())
}

/// The most answers within any half-open span of length `window`.
fn peak_in_window(sorted: &[Duration], window: Duration) -> usize {
    let mut start = 0;
    let mut peak = 0;
    for (end, t) in sorted.iter().enumerate() {
        while sorted[start] + window <= *t {
            start += 1;
        }
        peak = peak.max(end + 1 - start);
    }
    peak
}

struct Poll {
    k: usize,
    calls: u64,
    expected: u64,
    found: usize,
    wall: Duration,
}

async fn polling_cost(throughput: &Throughput, counts: &[usize]) -> Vec<Poll> {
    let mut polls = Vec::new();
    for &k in counts {
        let Some(ids) = throughput.action_ids.get(..k) else {
            println!(
                "  (skipping K={k}: only {} actions exist)",
                throughput.action_ids.len()
            );
            continue;
        };
        let before = throughput.sim.stats().count("machineactions", "200");
        let start = Instant::now();
        let found = throughput
            .client
            .machine_actions_by_ids(ids)
            .await
            .map(|actions| actions.len())
            .unwrap_or_else(|error| {
                eprintln!("poll of {k} failed: {error}");
                0
            });
        let wall = start.elapsed();
        let calls = throughput.sim.stats().count("machineactions", "200") - before;
        polls.push(Poll {
            k,
            calls,
            expected: k.div_ceil(IDS_PER_QUERY) as u64,
            found,
            wall,
        });
    }
    polls
}

fn print_polls(polls: &[Poll]) {
    println!();
    println!("Polling cost: one machine_actions_by_ids over K in-flight actions");
    println!(
        "  {:>6} {:>10} {:>22} {:>8} {:>12}",
        "K",
        "API calls",
        format!("expected ceil(K/{IDS_PER_QUERY})"),
        "found",
        "wall time"
    );
    for p in polls {
        println!(
            "  {:>6} {:>10} {:>22} {:>8} {:>9.1} ms",
            p.k,
            p.calls,
            p.expected,
            p.found,
            p.wall.as_secs_f64() * 1000.0
        );
    }
}

struct Memory {
    actions: usize,
    growth_kib: i64,
    peak_kib: u64,
}

/// RSS growth while a simulator without limits takes `actions` offboards,
/// measured after a warm-up (connections, token, first allocations).
async fn memory_per_action(actions: usize) -> Memory {
    let sim = spawn_sim(SimConfig {
        machines: actions * 5 / 4 + 100,
        rate_limits: Vec::new(),
        pending_for: Duration::from_secs(10 * 3600),
        ..SimConfig::default()
    })
    .await;
    let unlimited = RateLimits(vec![RateLimit {
        calls: 10_000,
        window: Duration::from_millis(1),
    }]);
    let client = client(&sim, unlimited);
    let machines = windows_machines(&client, actions).await;
    let (warm_up, measured) = machines.split_at(actions / 10);
    offboard_all(&client, warm_up).await;
    let before = rss_kib();
    let created = offboard_all(&client, measured).await;
    let after = rss_kib();
    Memory {
        actions: created,
        growth_kib: after as i64 - before as i64,
        peak_kib: status_kib("VmHWM"),
    }
}

/// Offboards every machine, 32 at a time; returns how many succeeded.
async fn offboard_all(client: &DefenderClient, machines: &[String]) -> usize {
    futures::stream::iter(machines)
        .map(|id| async move { client.offboard(id, "benchmark").await.is_ok() })
        .buffer_unordered(32)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}

/// Resident memory once freed pages went back to the kernel: otherwise memory
/// the machine listing freed would be reused by new actions and hide their growth.
fn rss_kib() -> u64 {
    release_free_memory();
    status_kib("VmRSS")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: glibc's malloc_trim takes no pointers; it only returns free pages.
    unsafe extern "C" {
        safe fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    malloc_trim(0);
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

fn print_memory(memory: &Memory, peak_before_memory: u64) {
    println!();
    println!("Memory");
    println!(
        "  {:<44} {:>8.1} MiB",
        "peak RSS after throughput and polling",
        peak_before_memory as f64 / 1024.0
    );
    println!(
        "  {:<44} {:>8.1} MiB",
        "peak RSS of the whole run (VmHWM)",
        memory.peak_kib as f64 / 1024.0
    );
    let per_1000 = memory.growth_kib as f64 * 1000.0 / memory.actions.max(1) as f64;
    println!(
        "  {:<44} {:>8.1} KiB ({} actions: {:+} KiB)",
        "RSS growth per 1000 actions in the simulator", per_1000, memory.actions, memory.growth_kib
    );
}

/// A `kB` field of `/proc/self/status` (0 where there is none).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix(field)?.strip_prefix(':')?;
                value.trim().trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}
