//! Offboards truly in flight: N resources sent at once and all left
//! `Pending` at MDE together, as a decommission of offline devices leaves
//! them (MDE keeps an action pending until its device checks in or the
//! action times out). The simulator's limits are off and `run`'s budget is
//! far above N, so every resource is sent within seconds and none waits
//! parked behind the budget; then they stay in flight while `run` polls.
//! Figures: the time until every action is recorded, `run`'s peak RSS and
//! its RSS after the hold, the MDE reads per poll interval while all are in
//! flight, and POSTs per machine counted at the simulator.

use super::suite::{self, Config};
use futures::StreamExt;
use kube::api::{Api, PostParams};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct InFlight {
    pub resources: usize,
    /// First create → every resource's action recorded (seen by a watch).
    pub all_recorded: Option<Duration>,
    pub recorded: usize,
    /// MDE reads (machines and machine actions) from the first create until
    /// every action was recorded.
    pub reads_while_sending: u64,
    /// How long all stayed in flight together while `run` was watched.
    pub held: Duration,
    pub peak_rss_mib: f64,
    pub rss_after_hold_mib: f64,
    /// MDE reads during the hold, per poll interval.
    pub reads_per_interval: f64,
    pub posts: u64,
    pub max_posts_per_machine: u64,
    /// Actions not `Pending`/`InProgress` at the end of the hold (0: all in flight).
    pub ended_during_hold: usize,
}

pub async fn in_flight_row(config: &Config, n: usize, hold: Duration) -> InFlight {
    let mut sim = suite::sim_config(n * 5 / 4 + 200, config.time_scale);
    sim.rate_limits = Vec::new();
    // A week: longer than any run of this row, so nothing ends meanwhile.
    sim.pending_for = Duration::from_secs(7 * 24 * 3600);
    let stage = suite::stage_with(sim).await;
    // The operator's budget far above N: nothing is parked waiting for it.
    let limits: mde_client::RateLimits = format!("{}/1s", n.max(1) * 10)
        .parse()
        .expect("a valid limit");
    let helper = suite::mde_client(
        &stage.sim,
        limits.clone(),
        Arc::new(suite::Throttled::default()),
    );
    let machines = suite::windows_machines(&helper, n).await;
    let seen = Arc::new(Mutex::new(suite::Seen::default()));
    let watch = suite::watch_namespace(&stage.client, suite::NAMESPACE, seen.clone()).await;
    let mut run = suite::start_run(config, &stage, &limits);
    let api: Api<defender_offboard::crd::DeviceOffboard> =
        Api::namespaced(stage.client.clone(), suite::NAMESPACE);
    let reads_at_start = suite::mde_reads(&stage.sim.stats());
    let started = Instant::now();
    futures::stream::iter(machines.iter().enumerate())
        .for_each_concurrent(16, |(i, machine)| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &suite::resource(&format!("r-{i}"), machine),
                )
                .await
                .unwrap();
            }
        })
        .await;
    let deadline = started + Duration::from_secs(600);
    let all_recorded = loop {
        let recorded = seen.lock().unwrap().recorded.len();
        if recorded >= n {
            break Some(started.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reads_before = suite::mde_reads(&stage.sim.stats());
    let reads_while_sending = reads_before - reads_at_start;
    let hold_started = Instant::now();
    tokio::time::sleep(hold).await;
    let held = hold_started.elapsed();
    let reads = suite::mde_reads(&stage.sim.stats()) - reads_before;
    let (peak_rss_mib, _) = suite::usage(run.pid);
    let rss_after_hold_mib = suite::proc_status_kib(run.pid, "VmRSS") / 1024.0;
    let _ = run.child.start_kill();
    let _ = run.child.wait().await;
    watch.abort();
    let stats = stage.sim.stats();
    let recorded = seen.lock().unwrap().recorded.len();
    let ended_during_hold = seen.lock().unwrap().finished.len();
    // `run`'s poll interval is a scaled minute.
    let interval = 60.0 / config.time_scale;
    let row = InFlight {
        resources: n,
        all_recorded,
        recorded,
        reads_while_sending,
        held,
        peak_rss_mib,
        rss_after_hold_mib,
        reads_per_interval: reads as f64 / (held.as_secs_f64() / interval).max(1e-9),
        posts: stats.offboard_requests_by_machine.values().sum(),
        max_posts_per_machine: suite::most_posts_for_one_machine(&stats),
        ended_during_hold,
    };
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    row
}

pub fn table(row: &InFlight) -> String {
    const CEILING_MIB: f64 = 40.0;
    format!(
        "\n{} offboards in flight at once (simulator limits off, every action `Pending` for a simulated week), held {:.0} s:\n\n\
         | figure | value | target | ratio |\n|---|---|---|---|\n\
         | first create → every action recorded | {} ({} of {}; {} MDE reads meanwhile) | | |\n\
         | `run` peak RSS | {:.1} MiB | ≤ {CEILING_MIB} MiB (production build) | {:.2} |\n\
         | `run` RSS after the hold | {:.1} MiB | | |\n\
         | MDE reads per poll interval, all in flight | {:.1} | | |\n\
         | POSTs / most for one machine / ended during the hold | {} / {} / {} | {} / 1 / 0 | |\n",
        row.resources,
        row.held.as_secs_f64(),
        row.all_recorded
            .map_or("not all".into(), |t| format!("{:.1} s", t.as_secs_f64())),
        row.recorded,
        row.resources,
        row.reads_while_sending,
        row.peak_rss_mib,
        row.peak_rss_mib / CEILING_MIB,
        row.rss_after_hold_mib,
        row.reads_per_interval,
        row.posts,
        row.max_posts_per_machine,
        row.ended_during_hold,
        row.resources,
    )
}
