//! The operator benchmark (`cargo bench --bench operator`) at a tiny size, so
//! it cannot rot. Asserts what it counts (one POST per resource, every
//! resource final, one poll call), never a time.

#[path = "../../benches/operator/fairness.rs"]
mod fairness;
#[path = "../../benches/operator/hostile.rs"]
mod hostile;
#[path = "../../benches/operator/in_flight.rs"]
mod in_flight;
#[path = "../../benches/operator/many_tenants.rs"]
mod many_tenants;
#[path = "../../benches/operator/suite.rs"]
mod suite;
#[path = "../../benches/operator/takeover.rs"]
mod takeover;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_benchmark_runs_at_a_tiny_size() {
    let config = suite::Config {
        bin: env!("CARGO_BIN_EXE_defender-offboard").into(),
        sizes: vec![4, 10],
        history: 6,
        time_scale: 100.0,
        tenant_time_scale: 100.0,
        latency_probes: 3,
        polls: vec![3, 60],
        shared: 4,
        run_args: Vec::new(),
        only: Vec::new(),
        hostile: (6, 3, 3),
        fairness: (20, 4),
        many_tenants: (3, 12),
        takeover: (250, std::time::Duration::from_secs(3)),
        in_flight: (40, std::time::Duration::from_secs(2)),
    };
    let report = suite::run(&config).await;
    let table = suite::table(&report, &config);
    println!("{table}");
    let rows = report.rows.iter().chain(&report.shared);
    for row in rows {
        assert_eq!(row.final_count, row.resources, "{row:?}");
        assert_eq!(row.posts, row.resources as u64, "one POST each: {row:?}");
        assert_eq!(row.duplicates, 0, "{row:?}");
    }
    assert_eq!(report.rows[1].history, 6);
    let (_, reads_at_start) = report.rows[1]
        .cold_start
        .expect("the first probe was recorded");
    assert!(
        reads_at_start > 0,
        "the machine check read MDE before the first send"
    );
    assert_eq!(report.polls, [(3, 1, 1), (60, 1, 2)], "one call per poll");
    let naive = report.naive.expect("the naive loop ran");
    assert_eq!(naive.posts, naive.resources as u64);
    assert!(table.contains("| 429 answers |"), "{table}");
    let hostile = report.hostile.expect("the hostile row ran");
    assert!(hostile.alive, "{hostile:?}");
    assert_eq!(hostile.hostile_posts, 0, "{hostile:?}");
    assert_eq!(hostile.answered, hostile.resources, "{hostile:?}");
    assert!(hostile.own_sent, "{hostile:?}");
    let fairness = report.fairness.expect("the fairness row ran");
    assert_eq!(fairness.max_posts_per_machine, 1, "{fairness:?}");
    for phase in [&fairness.alone, &fairness.loaded] {
        // Every probe was recorded (the first is left out) and the burst
        // reached B's MDE.
        assert!(phase.p99_ms.is_finite(), "{fairness:?}");
        assert_eq!(phase.burst_sent, phase.burst as u64, "{fairness:?}");
    }
    let takeover = report.takeover.expect("the takeover row ran");
    assert!(
        takeover.first_post.is_some(),
        "the standby sent: {takeover:?}"
    );
    assert_eq!(takeover.posts, 250, "every resource sent: {takeover:?}");
    assert_eq!(
        takeover.max_posts_per_machine, 1,
        "no second POST: {takeover:?}"
    );
    let many = report.many_tenants.expect("the many-tenants row ran");
    assert_eq!(many.posts, 36, "every tenant's resources sent: {many:?}");
    assert_eq!(many.max_posts_per_machine, 1, "{many:?}");
    assert!(many.min_ratio() > 0.0, "every tenant finished: {many:?}");
    let in_flight = report.in_flight.expect("the in-flight row ran");
    assert_eq!(
        in_flight.recorded, 40,
        "every action recorded: {in_flight:?}"
    );
    assert_eq!(in_flight.posts, 40, "{in_flight:?}");
    assert_eq!(in_flight.max_posts_per_machine, 1, "{in_flight:?}");
    assert_eq!(
        in_flight.ended_during_hold, 0,
        "all still in flight: {in_flight:?}"
    );
    assert!(suite::ceiling(101, &"100/60s".parse().unwrap()) == std::time::Duration::from_secs(60));
}
