//! Takeover at full load: two `run --leader-elect` replicas, N resources
//! applied at once, the leader killed (SIGKILL) once 30 % of the POSTs are
//! at MDE. Figures from the simulator and the Lease: the time from the kill
//! to the standby's first POST and first MDE read, the MDE reads the standby
//! spends in its first simulated minute, POSTs per machine, and the ratio of
//! the whole run (every POST at MDE) to the ceiling.

use super::suite::{self, Config};
use defender_offboard::operator::runtime::leader::LEASE_NAME;
use defender_offboard::simulator::SimHandle;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::time::Instant;

/// The lease `run` takes by default (wall time, not scaled).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Default)]
pub struct Takeover {
    pub resources: usize,
    pub lease: Duration,
    /// POSTs at MDE when the leader was killed.
    pub posts_at_kill: u64,
    /// Kill → the first POST MDE saw after it.
    pub first_post: Option<Duration>,
    /// Kill → the earliest time a perfect client could make the next call
    /// (zero when the budget allowed one at once): no takeover sends sooner.
    pub budget_next: Duration,
    /// Kill → the first MDE read after it.
    pub first_read: Option<Duration>,
    /// MDE reads in the first simulated minute from the standby's first call.
    pub reads_first_minute: u64,
    /// Apply of the first resource → every POST at MDE.
    pub all_posted: Option<Duration>,
    pub ceiling: Duration,
    pub posts: u64,
    pub max_posts_per_machine: u64,
    pub throttled: u64,
}

impl Takeover {
    pub fn ratio(&self) -> f64 {
        self.all_posted
            .map_or(0.0, |t| self.ceiling.as_secs_f64() / t.as_secs_f64())
    }
}

fn posts(sim: &SimHandle) -> u64 {
    sim.stats().offboard_requests_by_machine.values().sum()
}

async fn holder(client: &kube::Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "default")
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// Wait until `done` holds, at most `limit`; how long it took.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

pub async fn takeover_row(config: &Config, n: usize, lease: Duration) -> Takeover {
    let stage = suite::stage(n * 5 / 4 + 200, config.time_scale).await;
    let limits = suite::scaled(&suite::mde_limits(), config.time_scale, 1.0);
    let helper = suite::mde_client(
        &stage.sim,
        limits.clone(),
        std::sync::Arc::new(suite::Throttled::default()),
    );
    let machines = suite::windows_machines(&helper, n).await;
    let replica = |identity: &str| {
        let mut replica = config.clone();
        replica.run_args.extend(
            [
                "--leader-elect",
                "--identity",
                identity,
                "--lease-namespace",
                "default",
            ]
            .map(String::from),
        );
        if lease != DEFAULT_LEASE {
            replica.run_args.extend([
                format!("--lease-duration={}ms", lease.as_millis()),
                format!("--lease-renew-deadline={}ms", (lease * 2 / 3).as_millis()),
                format!("--lease-retry-period={}ms", (lease / 6).as_millis()),
            ]);
        }
        suite::start_run_logged(&replica, &stage, &limits, identity)
    };
    let mut replicas = vec![
        ("replica-a", replica("replica-a")),
        ("replica-b", replica("replica-b")),
    ];
    let client = stage.client.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        if let Some(holder) = holder(&client).await {
            break holder;
        }
        assert!(Instant::now() < deadline, "no replica took the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let api: Api<defender_offboard::crd::DeviceOffboard> =
        Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    let apply = tokio::spawn({
        let machines = machines.clone();
        async move {
            futures::stream::iter(machines.into_iter().enumerate())
                .for_each_concurrent(64, |(i, machine)| {
                    let api = api.clone();
                    async move {
                        api.create(
                            &PostParams::default(),
                            &suite::resource(&format!("r-{i}"), &machine),
                        )
                        .await
                        .unwrap();
                    }
                })
                .await
        }
    });
    let ceiling = suite::ceiling(n, &limits);
    let long = (ceiling * 3).max(Duration::from_secs(120));
    let kill_at = (n as u64 * 3 / 10).max(1);
    until(long, || posts(&stage.sim) >= kill_at).await;
    let index = replicas
        .iter()
        .position(|(name, _)| *name == leader)
        .expect("the leader is a replica");
    let (_, mut killed) = replicas.remove(index);
    let _ = killed.child.start_kill();
    let killed_at = Instant::now();
    let _ = killed.child.wait().await;
    // What was on its way when the process died has landed by now.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let posts_at_kill = posts(&stage.sim);
    let budget_next = suite::ceiling(posts_at_kill as usize + 1, &limits)
        .saturating_sub(killed_at.duration_since(started));
    let reads_at_kill = suite::mde_reads(&stage.sim.stats());
    let (mut first_post, mut first_read) = (None, None);
    until(long, || {
        let stats = stage.sim.stats();
        if first_post.is_none()
            && stats.offboard_requests_by_machine.values().sum::<u64>() > posts_at_kill
        {
            first_post = Some(killed_at.elapsed());
        }
        if first_read.is_none() && suite::mde_reads(&stats) > reads_at_kill {
            first_read = Some(killed_at.elapsed());
        }
        first_post.is_some() && first_read.is_some()
    })
    .await;
    // The standby's first simulated minute, from its first call (every read
    // since the kill is the standby's).
    let minute = limits.0[0].window;
    let from_first = first_post
        .into_iter()
        .chain(first_read)
        .min()
        .unwrap_or_default();
    let minute_ends = killed_at + from_first + minute;
    tokio::time::sleep_until(minute_ends).await;
    let reads_first_minute = suite::mde_reads(&stage.sim.stats()) - reads_at_kill;
    let all_posted = until(long, || posts(&stage.sim) >= n as u64)
        .await
        .map(|_| started.elapsed());
    let _ = apply.await;
    let stats = stage.sim.stats();
    for (_, mut run) in replicas {
        let _ = run.child.start_kill();
        let _ = run.child.wait().await;
    }
    stage.api.shutdown().await;
    stage.sim.shutdown().await;
    Takeover {
        resources: n,
        lease,
        posts_at_kill,
        first_post,
        budget_next,
        first_read,
        reads_first_minute,
        all_posted,
        ceiling,
        posts: stats.offboard_requests_by_machine.values().sum(),
        max_posts_per_machine: suite::most_posts_for_one_machine(&stats),
        throttled: stats.throttled,
    }
}

/// The row's lines for the table.
pub fn table(row: &Takeover) -> String {
    let secs =
        |d: Option<Duration>| d.map_or("—".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    format!(
        "\n### Takeover at full load\n\n\
         Two replicas, {} resources applied at once, the leader killed (SIGKILL) at {} POSTs:\n\n\
         | figure | value | target | ratio |\n|---|---|---|---|\n\
         | kill → the standby's first POST | {} | ≤ {:.0} s (lease + 2 s) | {} |\n\
         | kill → the budget's next call (a perfect client's call {} under both windows) | {:.2} s | | |\n\
         | kill → the standby's first MDE read | {} | | |\n\
         | MDE reads in the standby's first simulated minute | {} | ≤ 100 (MDE's minute) | |\n\
         | every POST at MDE | {} | {:.1} s (ceiling) | {:.3} |\n\
         | POSTs / most for one machine / 429s | {} / {} / {} | {} / 1 / 0 | |\n",
        row.resources,
        row.posts_at_kill,
        secs(row.first_post),
        (row.lease + Duration::from_secs(2)).as_secs_f64(),
        row.first_post.map_or("—".to_string(), |d| format!(
            "{:.2}",
            d.as_secs_f64() / (row.lease + Duration::from_secs(2)).as_secs_f64()
        )),
        row.posts_at_kill + 1,
        row.budget_next.as_secs_f64(),
        secs(row.first_read),
        row.reads_first_minute,
        secs(row.all_posted),
        row.ceiling.as_secs_f64(),
        row.ratio(),
        row.posts,
        row.max_posts_per_machine,
        row.throttled,
        row.resources,
    )
}
