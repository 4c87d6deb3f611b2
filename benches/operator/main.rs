//! The operator end to end, beside the naive way, in one table:
//! `cargo bench --bench operator -- --resources 10000`.
//! See `suite.rs`; it prints figures and asserts no timing.

mod fairness;
mod hostile;
mod in_flight;
mod many_tenants;
mod suite;
mod takeover;

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
struct Args {
    /// Resources of the main row (rows at 1,000 and at this size run too).
    #[arg(long, default_value_t = 10_000)]
    resources: usize,
    /// Resources of the history row (most already final when `run` starts).
    #[arg(long, default_value_t = 50_000)]
    history_resources: usize,
    /// Simulated seconds per wall-clock second. At ×100 MDE's minute is 0.6 s
    /// and its first hour's 1500 calls 9 s; much faster and the figures
    /// measure how fast two shared cores create and write objects, not the
    /// operator's pacing (the "behind the ceiling" line shows where).
    #[arg(long, default_value_t = 100.0)]
    time_scale: f64,
    /// The time scale of the fairness and many-tenants rows (×10: MDE's
    /// minute is 6 s, so applying a tenant's burst is not most of it).
    #[arg(long, default_value_t = 10.0)]
    tenant_time_scale: f64,
    /// Resources of the run that shares the tenant with a second client.
    #[arg(long, default_value_t = 2_000)]
    shared: usize,
    /// An extra argument for `run` (repeatable), e.g. `--run-arg=--adopt-window=0`.
    #[arg(long = "run-arg", allow_hyphen_values = true)]
    run_args: Vec<String>,
    /// The row sizes instead of 1,000, --resources and --history-resources
    /// (comma-separated; the last holds the history).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Run only these parts (comma-separated: polls, rows, naive, shared,
    /// hostile, fairness, takeover, tenants, inflight).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The binary whose `run` is measured (default: the one built with the
    /// benchmark). Give the production build to measure what ships:
    /// `cargo build --release --no-default-features`.
    #[arg(long)]
    run_bin: Option<PathBuf>,
    /// The hostile namespace row: resources, connections, recreations of
    /// one connection (each object with 255 KiB of annotations).
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 300, 200])]
    hostile: Vec<usize>,
    /// The fairness row: resources of tenant A (each MDE call 2 s) and of
    /// tenant B (a connection of its own).
    #[arg(long, value_delimiter = ',', default_values_t = [10000, 200])]
    fairness: Vec<usize>,
    /// The takeover row's resources (two replicas, the leader killed at 30 %
    /// of the POSTs; `run`'s default 15 s lease).
    #[arg(long, default_value_t = 10_000)]
    takeover: usize,
    /// The many-tenants row: tenants (a simulator and a connection each)
    /// and resources of each.
    #[arg(long, value_delimiter = ',', default_values_t = [200, 50])]
    many_tenants: Vec<usize>,
    /// The in-flight row: resources sent at once and left `Pending`, and
    /// the seconds all are held in flight together.
    #[arg(long, value_delimiter = ',', default_values_t = [10000, 20])]
    in_flight: Vec<usize>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let fresh = args.resources;
    let config = suite::Config {
        bin: args
            .run_bin
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_defender-offboard"))),
        sizes: if args.sizes.is_empty() {
            vec![fresh.min(1_000), fresh, args.history_resources.max(fresh)]
        } else {
            args.sizes.clone()
        },
        history: args.history_resources.saturating_sub(fresh),
        time_scale: args.time_scale,
        tenant_time_scale: args.tenant_time_scale,
        latency_probes: 41,
        polls: vec![10, 100, 1_000, 10_000],
        shared: args.shared,
        run_args: args.run_args,
        only: args.only,
        many_tenants: (
            args.many_tenants.first().copied().unwrap_or(0),
            args.many_tenants.get(1).copied().unwrap_or(0),
        ),
        takeover: (args.takeover, takeover::DEFAULT_LEASE),
        in_flight: (
            args.in_flight.first().copied().unwrap_or(0),
            std::time::Duration::from_secs(args.in_flight.get(1).copied().unwrap_or(20) as u64),
        ),
        fairness: (
            args.fairness.first().copied().unwrap_or(0),
            args.fairness.get(1).copied().unwrap_or(0),
        ),
        hostile: (
            args.hostile.first().copied().unwrap_or(0),
            args.hostile.get(1).copied().unwrap_or(0),
            args.hostile.get(2).copied().unwrap_or(0),
        ),
    };
    let report = suite::run(&config).await;
    print!("{}", suite::table(&report, &config));
}
