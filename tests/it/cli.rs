//! The `offboard` command as people and pipelines use it: the built binary
//! against the simulator.

use crate::common::*;
use defender_offboard::mde::DefenderClient;
use defender_offboard::simulator::SimConfig;
use std::process::Output;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_defender-offboard");
const FINANCE_LAPTOP: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const SECRET: &str = "sim-secret";

async fn offboard(sim_url: &str, secret: &str, args: &[&str]) -> Output {
    offboard_within(30, sim_url, secret, args).await
}

async fn offboard_within(seconds: u64, sim_url: &str, secret: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("offboard")
        .args(args)
        .env("AZURE_TENANT_ID", "sim-tenant")
        .env("AZURE_CLIENT_ID", "sim-client")
        .env("AZURE_CLIENT_SECRET", secret)
        .env("DEFENDER_API_URL", sim_url)
        .env("AZURE_AUTHORITY_HOST", sim_url)
        .env("RUST_LOG", "debug")
        .kill_on_drop(true);
    with_timeout(seconds, command.output()).await.unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn offboard_and_wait_prints_the_final_action() {
    let sim = spawn_sim(fast_sim_config()).await;
    let output = offboard(
        &sim.base_url(),
        SECRET,
        &[
            "--device-name",
            "finance-laptop-07.contoso.com",
            "--comment",
            "returned",
            "--wait",
            "--poll-interval",
            "100ms",
        ],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let action: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(action["status"], "Succeeded");
    assert_eq!(action["machineId"], FINANCE_LAPTOP);
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
}

#[tokio::test]
async fn a_failed_action_exits_non_zero() {
    let sim = spawn_sim(fast_sim_config()).await;
    let lab_pc = "60718293a4b5c6d7e8f9012345678ab1c2d3e4f5";
    let output = offboard(
        &sim.base_url(),
        SECRET,
        &[
            "--machine-id",
            lab_pc,
            "--comment",
            "x",
            "--wait",
            "--poll-interval",
            "100ms",
        ],
    )
    .await;
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.lines().last().unwrap().contains("ended Failed"),
        "{stderr}"
    );
}

/// A rerun with the same key adopts the first run's action instead of sending again.
#[tokio::test]
async fn an_idempotency_key_makes_reruns_adopt() {
    let sim = spawn_sim(fast_sim_config()).await;
    let args = [
        "--machine-id",
        FINANCE_LAPTOP,
        "--comment",
        "returned",
        "--idempotency-key",
        "ticket-1042",
        // A keyed run finding nothing waits this long before it sends.
        "--lookup-delay",
        "300ms",
    ];
    let first = offboard(&sim.base_url(), SECRET, &args).await;
    assert!(first.status.success(), "{}", text(&first).1);
    // Even after the first action is final, the rerun finds it by its key.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let second = offboard(&sim.base_url(), SECRET, &args).await;
    assert!(second.status.success(), "{}", text(&second).1);
    let id =
        |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["id"].clone();
    assert_eq!(id(&first), id(&second));
    assert_eq!(
        sim.stats().offboard_actions_by_machine.get(FINANCE_LAPTOP),
        Some(&1)
    );
}

/// Bad input ends with one clear line naming the problem, a non-zero exit,
/// no panic, and never the secret.
#[tokio::test]
async fn bad_input_ends_with_one_clear_line() {
    let sim = spawn_sim(fast_sim_config()).await;
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let cases: Vec<(&str, String, &str, Vec<&str>, &str)> = vec![
        (
            "malformed id",
            sim.base_url(),
            SECRET,
            vec!["--machine-id", "ABC123", "--comment", "x"],
            "--machine-id",
        ),
        (
            "empty comment",
            sim.base_url(),
            SECRET,
            vec!["--machine-id", FINANCE_LAPTOP, "--comment", " "],
            "--comment",
        ),
        (
            "unreachable host",
            unreachable,
            SECRET,
            vec!["--machine-id", FINANCE_LAPTOP, "--comment", "x"],
            "cannot reach the login host",
        ),
        (
            "wrong secret",
            sim.base_url(),
            "wrong-secret-value",
            vec!["--machine-id", FINANCE_LAPTOP, "--comment", "x"],
            "AADSTS7000215",
        ),
        (
            "unknown device",
            sim.base_url(),
            SECRET,
            vec!["--device-name", "nope.contoso.com", "--comment", "x"],
            "no MDE machine",
        ),
        (
            "ambiguous device",
            sim.base_url(),
            SECRET,
            vec![
                "--device-name",
                "shared-kiosk-02.contoso.com",
                "--comment",
                "x",
            ],
            "--machine-id",
        ),
    ];
    for (name, url, secret, args, expected) in cases {
        let output = offboard(&url, secret, &args).await;
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(expected),
            "{name}: {last}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{name}: {stderr}"
        );
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{name}: the secret leaked"
        );
        assert!(!stderr.contains("Bearer "), "{name}: a token leaked");
    }
    assert_eq!(sim.stats().actions_created, 0);
}

/// Every answer is lost after MDE created the action: the command looks it up
/// by its marker and prints it, having sent exactly once.
#[tokio::test]
async fn a_lost_answer_is_adopted_not_resent() {
    let sim = spawn_sim(fast_sim_config()).await;
    control(
        &sim,
        "faults",
        serde_json::json!({"lost_response_rate": 1.0, "lost_response_mode": "mixed"}),
    )
    .await;
    let output = offboard(
        &sim.base_url(),
        SECRET,
        &[
            "--machine-id",
            FINANCE_LAPTOP,
            "--comment",
            "returned",
            "--lookup-delay",
            "200ms",
        ],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("outcome unknown"), "{stderr}");
    let action: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(action["machineId"], FINANCE_LAPTOP);
    let stats = sim.stats();
    assert_eq!(
        (
            stats.actions_created,
            stats.lost_responses,
            stats.duplicate_offboards
        ),
        (1, 1, 0)
    );
    assert_eq!(
        stats.offboard_requests_by_machine.get(FINANCE_LAPTOP),
        Some(&1),
        "one POST: the lost answer was looked up, not resent"
    );
}

/// A batch script's way: 24 `offboard --wait` processes at once against one
/// tenant whose MDE is stricter than our default budget (each process has its
/// own budget, so together they overrun it). MDE answers 429s; every process
/// waits out `Retry-After` and exits 0, with one POST per machine. (MDE ends
/// every offboard here `Succeeded`: an action MDE fails is another test's.)
#[tokio::test]
async fn parallel_runs_wait_out_429s_and_each_send_once() {
    let sim = spawn_sim(SimConfig {
        rate_limits: "20/1s"
            .parse::<defender_offboard::simulator::RateLimits>()
            .unwrap()
            .0,
        unsuccessful_share: 0.0,
        ..fast_sim_config()
    })
    .await;
    let client = DefenderClient::new(
        client_config(&sim, SECRET, FAST_LIMITS),
        Arc::new(defender_offboard::mde::NoObserver),
    )
    .unwrap();
    // Generated machines only: one example machine's offboard always fails.
    let examples: Vec<&str> = defender_offboard::simulator::EXAMPLE_MACHINES
        .iter()
        .map(|e| e.id)
        .collect();
    let machines: Vec<String> = windows_machines(&client, 40)
        .await
        .into_iter()
        .filter(|m| !examples.contains(&m.as_str()))
        .take(24)
        .collect();
    assert_eq!(machines.len(), 24);
    // Another client of the tenant has just spent the budget: every first
    // call of every run meets a 429 with Retry-After.
    for family in ["machineactions", "offboard"] {
        control(
            &sim,
            "throttle",
            serde_json::json!({"family": family, "seconds": 2.0}),
        )
        .await;
    }
    let runs = machines.iter().map(|machine| {
        let url = sim.base_url();
        async move {
            let args = [
                "--machine-id",
                machine.as_str(),
                "--comment",
                "batch retirement",
                "--wait",
                "--poll-interval",
                "1s",
                "--timeout",
                "80s",
            ];
            (
                machine.clone(),
                offboard_within(95, &url, SECRET, &args).await,
            )
        }
    });
    let outputs = with_timeout(100, futures::future::join_all(runs)).await;
    let stats = sim.stats();
    assert!(
        stats.throttled > 0,
        "the test must make MDE answer 429s: {stats:?}"
    );
    let mut throttled_lines = 0;
    for (machine, output) in &outputs {
        let (_, stderr) = text(output);
        assert_eq!(output.status.code(), Some(0), "{machine}: {stderr}");
        assert!(!stderr.contains("panicked"), "{machine}: {stderr}");
        throttled_lines += stderr
            .lines()
            .filter(|l| l.starts_with("Throttled: "))
            .count();
        assert_eq!(
            stats.offboard_requests_by_machine.get(machine.as_str()),
            Some(&1),
            "{machine}: POSTs"
        );
    }
    let succeeded = outputs.iter().filter(|(_, o)| o.status.success()).count();
    println!(
        "24 parallel offboard --wait: {succeeded} exit 0, 429s {}, \
         lines saying until when {throttled_lines}, POSTs {}",
        stats.throttled,
        stats.offboard_requests_by_machine.values().sum::<u64>()
    );
}

/// A list whose `@odata.nextLink` never advances: the command stops with a
/// clear error after a bounded number of requests, instead of burning the
/// read budget.
#[tokio::test]
async fn a_next_link_that_never_advances_ends_the_command() {
    let sim = spawn_sim(SimConfig {
        page_size: 1,
        ..fast_sim_config()
    })
    .await;
    // Two earlier offboards of the machine, so its action list has two pages.
    let client = DefenderClient::new(
        client_config(&sim, SECRET, FAST_LIMITS),
        Arc::new(defender_offboard::mde::NoObserver),
    )
    .unwrap();
    for _ in 0..2 {
        client.offboard(FINANCE_LAPTOP, "earlier").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    control(&sim, "faults", serde_json::json!({"next_link": "repeat"})).await;
    let before = sim
        .stats()
        .requests
        .get("machineactions")
        .map_or(0, |m| m.values().sum::<u64>());
    let output = offboard(
        &sim.base_url(),
        SECRET,
        &["--machine-id", FINANCE_LAPTOP, "--comment", "again"],
    )
    .await;
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("nextLink"),
        "{last}"
    );
    let after = sim
        .stats()
        .requests
        .get("machineactions")
        .map_or(0, |m| m.values().sum::<u64>());
    assert!(after - before <= 3, "{} list requests", after - before);
    assert_eq!(
        sim.stats().offboard_requests_for_key(""),
        2,
        "nothing sent by the command"
    );
}

/// `--timeout` bounds the whole run, waits inside a call included: a poll
/// that meets a long `Retry-After` does not hold the command past it.
#[tokio::test]
async fn the_timeout_bounds_waits_for_a_parked_budget() {
    let sim = spawn_sim(SimConfig {
        // Long enough that `--wait` is still polling when the budget parks.
        pending_for: std::time::Duration::from_secs(3600),
        ..fast_sim_config()
    })
    .await;
    let started = std::time::Instant::now();
    let url = sim.base_url();
    let run = tokio::spawn(async move {
        let args = [
            "--machine-id",
            FINANCE_LAPTOP,
            "--comment",
            "returned",
            "--wait",
            "--poll-interval",
            "200ms",
            "--timeout",
            "3s",
        ];
        offboard_within(30, &url, SECRET, &args).await
    });
    with_timeout(10, async {
        while sim.stats().count("offboard", "201") == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    control(
        &sim,
        "throttle",
        serde_json::json!({"family": "machineactions", "seconds": 60.0}),
    )
    .await;
    let output = run.await.unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("--timeout"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}
