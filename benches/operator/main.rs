//! The operator end to end, beside the naive way, in one table:
//! `cargo bench --bench operator -- --resources 10000`.
//! See `suite.rs`; it prints figures and asserts no timing.

mod suite;

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
    /// Simulated seconds per wall-clock second.
    #[arg(long, default_value_t = 200.0)]
    time_scale: f64,
    /// Resources of the run that shares the tenant with a second client.
    #[arg(long, default_value_t = 2_000)]
    shared: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let fresh = args.resources;
    let config = suite::Config {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_defender-offboard")),
        sizes: vec![fresh.min(1_000), fresh, args.history_resources.max(fresh)],
        history: args.history_resources.saturating_sub(fresh),
        time_scale: args.time_scale,
        latency_probes: 41,
        polls: vec![10, 100, 1_000, 10_000],
        shared: args.shared,
    };
    let report = suite::run(&config).await;
    print!("{}", suite::table(&report, &config));
}
