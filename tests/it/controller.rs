//! The real reconcile, in process, against the in-memory Kubernetes API and
//! the MDE simulator (time-scaled ×60: MDE's 100/min is 100/s here).

use crate::common::*;
use defender_offboard::crd::{DeviceOffboard, Phase};
use defender_offboard::devcluster::ApiHandle;
use defender_offboard::metrics::Metrics;
use defender_offboard::playground::observed_controller;
use defender_offboard::simulator::{SimConfig, SimHandle};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct Env {
    pub(crate) _api: ApiHandle,
    pub(crate) sim: SimHandle,
    pub(crate) client: kube::Client,
    pub(crate) controller: tokio::task::JoinHandle<()>,
    /// What the controller counted.
    pub(crate) metrics: Arc<Metrics>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

pub(crate) async fn start(sim_config: SimConfig) -> Env {
    start_with(sim_config, fast_settings()).await
}

pub(crate) async fn start_with(
    sim_config: SimConfig,
    settings: defender_offboard::operator::offboard::decision::Settings,
) -> Env {
    start_limited(sim_config, settings, FAST_LIMITS).await
}

/// The controller with the operator's own `--rate-limit` (`limits`).
pub(crate) async fn start_limited(
    sim_config: SimConfig,
    settings: defender_offboard::operator::offboard::decision::Settings,
    limits: &str,
) -> Env {
    let sim = spawn_sim(sim_config).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let controller = observed_controller(
        client.clone(),
        &sim,
        limits.parse().unwrap(),
        settings,
        Duration::from_millis(300),
        metrics.clone(),
    )
    .unwrap();
    let controller = tokio::spawn(controller);
    Env {
        _api: api,
        sim,
        client,
        controller,
        metrics,
    }
}

pub(crate) async fn create(client: &kube::Client, name: &str, machine_id: &str) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    api.create(
        &PostParams::default(),
        &DeviceOffboard::new(name, retired(machine_id)),
    )
    .await
    .unwrap();
}

pub(crate) async fn phases(client: &kube::Client) -> Vec<(String, Phase, Option<String>)> {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| {
            let status = d.status.unwrap_or_default();
            (
                d.metadata.name.unwrap(),
                status.phase.unwrap_or_default(),
                status.machine_action_id,
            )
        })
        .collect()
}

async fn wait_all_final(
    client: &kube::Client,
    n: usize,
    seconds: u64,
) -> Vec<(String, Phase, Option<String>)> {
    with_timeout(seconds, async {
        loop {
            let now = phases(client).await;
            if now.len() == n && now.iter().all(|(_, p, _)| p.is_terminal()) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

async fn mde_client(env: &Env) -> defender_offboard::mde::DefenderClient {
    client(&env.sim, FAST_LIMITS)
}

/// 300 resources at once against MDE's (time-scaled) limits: every one final,
/// not one 429, no duplicate, and polling costs batched calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_300_resources_is_offboarded_without_429s_or_duplicates() {
    let env = start(SimConfig {
        machines: 420,
        ..fast_sim_config()
    })
    .await;
    let machines = windows_machines(&mde_client(&env).await, 300).await;
    let started = Instant::now();
    for (i, id) in machines.iter().enumerate() {
        create(&env.client, &format!("burst-{i:03}"), id).await;
    }
    let done = wait_all_final(&env.client, 300, 90).await;
    let stats = env.sim.stats();
    let succeeded = done
        .iter()
        .filter(|(_, p, _)| *p == Phase::Succeeded)
        .count();
    println!(
        "controller burst: 300 resources final in {:.1}s ({succeeded} Succeeded), offboards {}, 429s {}, duplicates {}, machine-action reads {}",
        started.elapsed().as_secs_f64(),
        stats.count("offboard", "201"),
        stats.throttled,
        stats.duplicate_offboards,
        stats
            .requests
            .get("machineactions")
            .map(|m| m.values().sum::<u64>())
            .unwrap_or(0),
    );
    assert!(
        done.iter().all(|(_, _, action)| action.is_some()),
        "every resource has its action id"
    );
    assert_eq!(
        stats.count("offboard", "201"),
        300,
        "one offboard per resource"
    );
    assert_eq!(stats.throttled, 0);
    assert_eq!(stats.duplicate_offboards, 0);
    assert_eq!(
        max_posts_per_key(&stats),
        1,
        "one POST per resource, counted at MDE"
    );
    env.controller.abort();
}

/// The check before each first send comes from one index of this operator's
/// recent offboards, not one read of each machine's actions: 60 first sends
/// cost far fewer than 60 per-machine lists at MDE, still one POST each, and a
/// machine this operator already offboarded (under another key) is adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sends_are_checked_against_one_index_not_one_read_each() {
    let settings = defender_offboard::operator::offboard::decision::Settings {
        lookup_delay: Duration::from_secs(5),
        ..fast_settings()
    };
    let env = start_with(
        SimConfig {
            machines: 120,
            ..fast_sim_config()
        },
        settings,
    )
    .await;
    let mde = mde_client(&env).await;
    let machines = windows_machines(&mde, 61).await;
    // An offboard this operator made earlier for the last machine (another key).
    let earlier = mde
        .offboard(
            &machines[60],
            &defender_offboard::mde::comment_with_marker("earlier", "other-request"),
        )
        .await
        .unwrap();
    for (i, id) in machines.iter().enumerate() {
        create(&env.client, &format!("indexed-{i:02}"), id).await;
    }
    let done = wait_all_final(&env.client, 61, 90).await;
    let stats = env.sim.stats();
    let adopted = done
        .iter()
        .find(|(name, _, _)| name == "indexed-60")
        .and_then(|(_, _, action)| action.clone());
    assert_eq!(adopted, Some(earlier.id), "the earlier offboard is adopted");
    assert_eq!(
        stats.count("offboard", "201"),
        61,
        "60 sent here, 1 earlier"
    );
    assert_eq!(
        max_posts_per_key(&stats),
        1,
        "one POST per key, counted at MDE"
    );
    assert_eq!(stats.offboard_requests_for_key("other-request"), 1);
    assert_eq!(
        stats.offboard_requests_by_key.values().sum::<u64>(),
        61,
        "the adopting resource sent nothing"
    );
    assert!(
        stats.machine_action_lists < 30,
        "60 first sends cost {} per-machine lists",
        stats.machine_action_lists
    );
    env.controller.abort();
}

/// Every offboard answer is lost (dropped connection or 504 after the action
/// was created): each resource ends with the action it created, adopted by
/// lookup, never a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_end_adopted_not_duplicated() {
    let env = start(fast_sim_config()).await;
    control(
        &env.sim,
        "faults",
        json!({"lost_response_rate": 1.0, "lost_response_mode": "mixed"}),
    )
    .await;
    let machines = windows_machines(&mde_client(&env).await, 10).await;
    for (i, id) in machines.iter().enumerate() {
        create(&env.client, &format!("lost-{i}"), id).await;
    }
    let done = wait_all_final(&env.client, 10, 60).await;
    let stats = env.sim.stats();
    println!(
        "lost responses: {} lost, {} created, {} duplicates",
        stats.lost_responses, stats.actions_created, stats.duplicate_offboards
    );
    assert_eq!(stats.lost_responses, 10);
    assert_eq!(stats.actions_created, 10);
    assert_eq!(stats.duplicate_offboards, 0);
    assert_eq!(
        max_posts_per_key(&stats),
        1,
        "lost answers adopted, never resent"
    );
    assert!(done.iter().all(|(_, _, action)| action.is_some()));
    // The adoption is visible to a person.
    let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");
    let one = api.get("lost-0").await.unwrap().status.unwrap();
    let submitted = one
        .conditions
        .iter()
        .find(|c| c.type_ == "Submitted")
        .unwrap();
    assert_eq!(submitted.reason, "Adopted");
    env.controller.abort();
}

/// Another client has spent the tenant's offboard budget: new resources wait
/// (Pending, nextRetryAt) until Retry-After, while in-flight ones keep being
/// polled and finish — nothing blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_run_waits_for_retry_after_without_blocking_others() {
    // Actions take about 2 s here, so the early ones are still running when the throttle starts.
    let slow_actions = SimConfig {
        pending_for: Duration::from_secs(60),
        in_progress_for: Duration::from_secs(60),
        ..fast_sim_config()
    };
    let env = start(slow_actions).await;
    let machines = windows_machines(&mde_client(&env).await, 10).await;
    for (i, id) in machines[..5].iter().enumerate() {
        create(&env.client, &format!("early-{i}"), id).await;
    }
    with_timeout(20, async {
        while phases(&env.client)
            .await
            .iter()
            .any(|(_, _, action)| action.is_none())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    control(
        &env.sim,
        "throttle",
        json!({"family": "offboard", "seconds": 6.0}),
    )
    .await;
    let throttled_at = Instant::now();
    for (i, id) in machines[5..].iter().enumerate() {
        create(&env.client, &format!("late-{i}"), id).await;
    }
    // The early ones finish while offboard calls are throttled.
    with_timeout(20, async {
        loop {
            let now = phases(&env.client).await;
            let early_done = now
                .iter()
                .filter(|(n, p, _)| n.starts_with("early") && p.is_terminal())
                .count();
            if early_done == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        throttled_at.elapsed() < Duration::from_secs(6),
        "in-flight actions finished during the throttle"
    );
    let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");
    let late = api.get("late-0").await.unwrap().status.unwrap_or_default();
    assert_eq!(late.phase, Some(Phase::Pending));
    assert!(
        late.next_retry_at.is_some(),
        "nextRetryAt shows when it tries again"
    );
    // Throttled by MDE's 429, or (looked at again before Retry-After) held
    // by the operator's own budget, which learned the throttle from it:
    // either way nothing is sent until then.
    let reason = late
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .reason
        .clone();
    assert!(
        reason == "Throttled" || reason == "WaitingForBudget",
        "{reason}"
    );

    let done = wait_all_final(&env.client, 10, 30).await;
    assert!(
        throttled_at.elapsed() >= Duration::from_millis(5900),
        "nothing was sent before Retry-After"
    );
    // Generated machines end as MDE decides (a few Failed or TimeOut); all were sent once.
    assert!(
        done.iter().all(|(_, _, action)| action.is_some()),
        "{done:?}"
    );
    let stats = env.sim.stats();
    println!(
        "throttled run: 429s {}, offboards {}, duplicates {}",
        stats.throttled,
        stats.count("offboard", "201"),
        stats.duplicate_offboards
    );
    // Calls already in flight when the first 429 parks the budget may each get
    // one; after that nothing is sent until Retry-After, so at most one per late
    // resource, never a retry loop.
    assert!(
        (1..=5).contains(&stats.throttled),
        "the parked budget does not hammer MDE: {} 429s",
        stats.throttled
    );
    assert_eq!(stats.count("offboard", "201"), 10);
    assert_eq!(stats.duplicate_offboards, 0);
    assert_eq!(
        max_posts_per_key(&stats),
        1,
        "a 429 refusal is not a POST that could create"
    );
    env.controller.abort();
}

/// The most offboard POSTs MDE received for one key (resource uid).
fn max_posts_per_key(stats: &defender_offboard::simulator::SimStats) -> u64 {
    stats
        .offboard_requests_by_key
        .values()
        .copied()
        .max()
        .unwrap_or(0)
}

/// With `--leader-elect`, work that ends by itself (a clean stop) must let the
/// elector release the lease and return: the finished task is never polled
/// again (that used to panic, so the lease was never released).
#[tokio::test]
async fn leader_work_that_ends_releases_the_lease() {
    use defender_offboard::operator::runtime::leader::{
        LEASE_NAME, LeaseClock, LeaseConfig, LeaseTiming, run_as_leader,
    };
    use defender_offboard::telemetry::Readiness;
    use k8s_openapi::api::coordination::v1::Lease;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let lease = LeaseConfig {
        namespace: "default".into(),
        identity: "replica-a".into(),
        timing: LeaseTiming {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(200),
        },
    };
    let outcome = with_timeout(
        20,
        run_as_leader(
            client.clone(),
            &lease,
            LeaseClock::candidate(),
            prometheus_client::metrics::gauge::Gauge::default(),
            Readiness::default(),
            std::future::pending(),
            |_stop| async {},
        ),
    )
    .await;
    assert!(outcome.is_ok(), "{outcome:?}");
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let held = leases.get(LEASE_NAME).await.unwrap().spec.unwrap();
    assert_eq!(held.holder_identity, None, "released for a standby");
}

/// The object's status as stored now.
async fn status_of(
    client: &kube::Client,
    name: &str,
) -> defender_offboard::crd::DeviceOffboardStatus {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    api.get(name).await.unwrap().status.unwrap_or_default()
}

/// Wait until `name`'s status satisfies `ready`.
async fn wait_status(
    client: &kube::Client,
    name: &str,
    ready: impl Fn(&defender_offboard::crd::DeviceOffboardStatus) -> bool,
) -> defender_offboard::crd::DeviceOffboardStatus {
    with_timeout(30, async {
        loop {
            let status = status_of(client, name).await;
            if ready(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn annotate_cancel(client: &kube::Client, name: &str, reason: &str) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let patch =
        json!({"metadata": {"annotations": {defender_offboard::crd::CANCEL_ANNOTATION: reason}}});
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
}

/// `kubectl annotate doff NAME defender.offboard.dev/cancel="wrong device"`:
/// while MDE holds the action `Pending`, exactly one cancel is sent (counted
/// at the simulator) with the reason as its comment, and the resource ends
/// `Failed`/`Cancelled`; once the action is `InProgress`, nothing is sent, an
/// Event says it is too late, and the offboard goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_annotation_cancels_a_pending_offboard_once() {
    let env = start(SimConfig {
        // 3 s Pending, then 10 s InProgress (wall clock at ×60).
        pending_for: Duration::from_secs(180),
        in_progress_for: Duration::from_secs(600),
        ..fast_sim_config()
    })
    .await;
    let machines = windows_machines(&mde_client(&env).await, 2).await;
    create(&env.client, "mistake", &machines[0]).await;
    create(&env.client, "late", &machines[1]).await;

    let pending = wait_status(&env.client, "mistake", |s| s.machine_action_id.is_some()).await;
    assert_eq!(pending.action_status.as_deref(), Some("Pending"));
    annotate_cancel(&env.client, "mistake", "wrong device").await;
    let cancelled = wait_status(&env.client, "mistake", |s| {
        s.phase.is_some_and(Phase::is_terminal)
    })
    .await;
    let action = cancelled.machine_action_id.clone().unwrap();
    assert_eq!(cancelled.phase, Some(Phase::Failed));
    assert_eq!(cancelled.action_status.as_deref(), Some("Cancelled"));
    let cancel = cancelled.cancel.clone().unwrap();
    assert_eq!(cancel.state, defender_offboard::crd::CancelState::Sent);
    assert_eq!(cancel.reason, "wrong device");
    let mde = mde_client(&env).await;
    let at_mde = mde.get_machine_action(&action).await.unwrap();
    assert_eq!(at_mde.status.as_str(), "Cancelled");
    assert!(
        at_mde
            .cancellation_comment
            .as_deref()
            .is_some_and(|c| c.ends_with("wrong device") && c.contains("[defender-offboard:")),
        "{at_mde:?}"
    );

    let running = wait_status(&env.client, "late", |s| {
        s.action_status.as_deref() == Some("InProgress")
    })
    .await;
    annotate_cancel(&env.client, "late", "changed my mind").await;
    let late = wait_status(&env.client, "late", |s| s.cancel.is_some()).await;
    assert_eq!(
        late.cancel.unwrap().state,
        defender_offboard::crd::CancelState::TooLate
    );
    assert_eq!(late.phase, Some(Phase::InProgress), "the offboard goes on");
    let stats = env.sim.stats();
    assert_eq!(
        stats.cancel_requests_by_action.get(&action),
        Some(&1),
        "{stats:?}"
    );
    let late_action = running.machine_action_id.unwrap();
    assert_eq!(stats.cancel_requests_by_action.get(&late_action), None);
    assert_eq!(stats.actions_cancelled, 1);
    // The too-late Event is there for a person to read.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), "default");
    let reasons: Vec<String> = with_timeout(10, async {
        loop {
            let reasons: Vec<String> = events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|e| e.reason)
                .collect();
            if reasons.iter().any(|r| r == "CancelTooLate") {
                return reasons;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        reasons.iter().any(|r| r == "OffboardCancelled"),
        "{reasons:?}"
    );
}

/// A GitOps prune and re-apply deletes a resource and creates it again under
/// the same name while the controller finishes the first one. The label
/// that takes a finished resource out of the watch goes by name, so it must
/// not land on the new object: that one would never be offboarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_label_never_lands_on_a_resource_applied_again_under_the_same_name() {
    use defender_offboard::operator::cache::final_label::{FINAL_LABEL, label};
    let api_server = spawn_api().await;
    let client = api_server.client().await.unwrap();
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let finish = |name: &'static str| {
        let api = api.clone();
        async move {
            let status = json!({"status": {"phase": "Succeeded"}});
            api.patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&status),
            )
            .await
            .unwrap()
        }
    };
    create(&client, "recreated", &"a".repeat(40)).await;
    let first = finish("recreated").await;
    api.delete("recreated", &Default::default()).await.unwrap();
    create(&client, "recreated", &"a".repeat(40)).await;

    let refused = label(&client, &first).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 409),
        "{refused:?}"
    );
    let second = api.get("recreated").await.unwrap();
    assert_ne!(second.metadata.uid, first.metadata.uid);
    assert_eq!(
        second.metadata.labels.unwrap_or_default().get(FINAL_LABEL),
        None
    );

    // The object that is final itself is labelled.
    let finished = finish("recreated").await;
    let labelled = label(&client, &finished).await.unwrap();
    assert_eq!(labelled.metadata.labels.unwrap()[FINAL_LABEL], "true");
}

/// Resources that wait long for budget leave the controller's cache (the
/// `parked_resources` gauge counts them) and come back in their turn: every
/// one is sent exactly once (POSTs counted at MDE per key), none meets a 429,
/// and a cancel asked for the last in the queue ends it while the ones ahead
/// of it still wait, not when its turn would have come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_budget_waits_are_spent_outside_the_cache_and_each_resource_is_sent_once() {
    // 10 offboards per 2 s: the last of 40 waits about 6 s, longer than a park.
    let env = start_limited(
        SimConfig {
            machines: 60,
            ..fast_sim_config()
        },
        fast_settings(),
        "10/2s",
    )
    .await;
    let machines = windows_machines(&mde_client(&env).await, 40).await;
    for (i, id) in machines.iter().enumerate() {
        create(&env.client, &format!("queued-{i:02}"), id).await;
    }
    let parked = with_timeout(20, async {
        loop {
            let parked = env.metrics.parked.get();
            if parked >= 10 {
                return parked;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The controller takes resources in no set order: the one to cancel is
    // one that is parked now, whichever it is.
    let (waiting, last) = with_timeout(20, async {
        loop {
            for i in (0..40).rev() {
                let name = format!("queued-{i:02}");
                let status = status_of(&env.client, &name).await;
                if status.next_retry_at.is_some() {
                    return (name, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(last.phase, Some(Phase::Pending), "{last:?}");
    assert!(
        last.next_retry_at.is_some(),
        "a long wait says when: {last:?}"
    );

    annotate_cancel(&env.client, &waiting, "not this one").await;
    let cancelled = wait_status(&env.client, &waiting, |s| {
        s.phase.is_some_and(Phase::is_terminal)
    })
    .await;
    let waiting_ahead = phases(&env.client)
        .await
        .iter()
        .filter(|(_, _, action)| action.is_none())
        .count();
    assert!(
        waiting_ahead > 1,
        "the cancel ended it while others still waited to be sent ({waiting_ahead} unsent)"
    );
    assert_eq!(cancelled.machine_action_id, None, "{cancelled:?}");

    let done = wait_all_final(&env.client, 40, 60).await;
    let stats = env.sim.stats();
    println!(
        "parking: {parked} parked at once; {} offboards, 429s {}, duplicates {}",
        stats.count("offboard", "201"),
        stats.throttled,
        stats.duplicate_offboards
    );
    assert_eq!(done.iter().filter(|(_, _, a)| a.is_some()).count(), 39);
    assert_eq!(
        stats.count("offboard", "201"),
        39,
        "one per resource but the cancelled one"
    );
    assert_eq!(stats.throttled, 0);
    assert_eq!(
        max_posts_per_key(&stats),
        1,
        "one POST per resource, counted at MDE"
    );
    let parked_after = with_timeout(5, async {
        loop {
            if env.metrics.parked.get() == 0 {
                return 0;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(parked_after, 0, "nothing stays parked");
}
