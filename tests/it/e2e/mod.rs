//! End-to-end tests: the built `defender-offboard` binary, real `kubectl`, and
//! separate processes, as a user runs them.
//!
//! By default each test starts its own `defender-offboard dev --without-controller`
//! (in-memory Kubernetes API and MDE simulator on loopback, files in a temp dir)
//! and runs the controller as separate `defender-offboard run` processes.
//!
//! Against a real cluster instead, set:
//! - `DEFENDER_OFFBOARD_E2E_KUBECONFIG`: kubeconfig of a cluster that has the
//!   CRD installed and the operator deployed, talking to an MDE simulator
//!   (`defender-offboard simulate`, started fresh for the run) — never a real tenant;
//! - `DEFENDER_OFFBOARD_E2E_SIMULATOR_URL`: that simulator's URL as reachable
//!   from the test machine (for its `/_sim/stats`);
//! - `DEFENDER_OFFBOARD_E2E_NAMESPACE`: the namespace to create resources in
//!   (default `default`).
//!
//! Then `examples_reach_their_final_phases` and
//! `bad_manifests_are_rejected_naming_the_field` run against that cluster (the
//! examples test deletes and re-creates the `examples/` resources), while the
//! crash and failover tests, which start and kill controllers themselves, print
//! a notice and skip. Steps that need `kubectl` are skipped with a notice when it
//! is not on PATH (resources are then created with kube-rs).

mod final_label;
mod relist;
mod support;

use defender_offboard::crd::DeviceOffboard;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// `kubectl apply -f -` of `yaml`, or (without kubectl) create-or-patch with
/// kube-rs. `Err` carries the error text the user would see.
async fn apply(cluster: &Cluster, kubectl: bool, yaml: &str) -> Result<String, String> {
    if kubectl {
        let out = cluster.kubectl(&["apply", "-f", "-"], Some(yaml)).await;
        return if out.success {
            Ok(out.stdout)
        } else {
            Err(out.stderr)
        };
    }
    let resource = ApiResource::erase::<DeviceOffboard>(&());
    let api: Api<DynamicObject> =
        Api::namespaced_with(cluster.client.clone(), &cluster.namespace, &resource);
    let mut created = String::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value.clone()).unwrap();
        let name = object.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => created.push_str(&format!("{name} created\n")),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let patch = serde_json::json!({ "spec": value["spec"] });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| e.to_string())?;
                created.push_str(&format!("{name} configured\n"));
            }
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(created)
}

fn read_examples() -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn ready(d: &DeviceOffboard) -> (String, String, String) {
    d.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_reach_their_final_phases() {
    bounded(150, async {
        let cluster = Cluster::start(&[]).await;
        let kubectl = have_kubectl().await;
        let examples = examples_dir();
        let examples = examples.to_str().unwrap();
        let _controller = (!cluster.is_real()).then(|| cluster.spawn_run("run", &[]));
        if cluster.is_real() && kubectl {
            // A previous run's resources would be final already: start afresh.
            cluster
                .kubectl_ok(
                    &["delete", "-f", examples, "--ignore-not-found", "--wait"],
                    None,
                )
                .await;
        }
        if kubectl {
            let out = cluster.kubectl_ok(&["apply", "-f", examples], None).await;
            assert!(
                out.contains("deviceoffboard.defender.offboard.dev/finance-laptop-07 created"),
                "{out}"
            );
        } else {
            apply(&cluster, false, &read_examples()).await.unwrap();
        }

        let names: Vec<String> = [
            "finance-laptop-07",
            "hr-desktop-12",
            "ws2019-file-01",
            "kiosk-lobby-01-current",
            // Through the second tenant's DefenderConnection `fabrikam`.
            "fabrikam-finance-laptop-07",
            "build-agent-03",
            "shared-kiosk-02",
            "lab-pc-09",
            // Protected: the playground's env file sets DEFENDER_PROTECTED_TAGS.
            "dc-01",
        ]
        .map(String::from)
        .to_vec();
        let all = cluster.wait_final(&names, Duration::from_secs(90)).await;

        for name in &names[..5] {
            let d = &all[name];
            let status = d.status.clone().unwrap();
            assert_eq!(phase(d), "Succeeded", "{name}: {status:?}");
            assert!(status.machine_action_id.is_some(), "{name}: {status:?}");
            assert_eq!(status.action_status.as_deref(), Some("Succeeded"));
            assert_eq!(ready(d).0, "True", "{name}: {status:?}");
        }
        // Resolved by name: the status names the machine the operator found.
        assert_eq!(
            all["hr-desktop-12"]
                .status
                .as_ref()
                .unwrap()
                .machine_id
                .as_deref()
                .map(str::len),
            Some(40)
        );

        let agent = &all["build-agent-03"];
        assert_eq!(phase(agent), "Failed");
        assert_eq!(ready(agent).0, "False");
        assert_eq!(ready(agent).1, "PlatformNotSupported", "{:?}", agent.status);
        assert!(agent.status.as_ref().unwrap().machine_action_id.is_none());

        let kiosk = &all["shared-kiosk-02"];
        assert_eq!(phase(kiosk), "Failed");
        let (_, reason, message) = ready(kiosk);
        assert_eq!(reason, "DeviceAmbiguous", "{:?}", kiosk.status);
        for id in [
            "fe00000000000000000000000000000000000201",
            "fe00000000000000000000000000000000000202",
        ] {
            assert!(
                message.contains(id),
                "message does not list {id}: {message}"
            );
        }
        assert_eq!(
            kiosk
                .status
                .as_ref()
                .unwrap()
                .last_error
                .as_ref()
                .map(|e| e.code.as_str()),
            Some("DeviceAmbiguous")
        );

        let lab = &all["lab-pc-09"];
        assert_eq!(phase(lab), "Failed");
        let lab_status = lab.status.as_ref().unwrap();
        assert!(lab_status.machine_action_id.is_some(), "{lab_status:?}");
        assert_eq!(lab_status.action_status.as_deref(), Some("Failed"));

        let dc = &all["dc-01"];
        assert_eq!(phase(dc), "Failed");
        assert_eq!(ready(dc).1, "DeviceProtected", "{:?}", dc.status);
        assert!(dc.status.as_ref().unwrap().machine_action_id.is_none());

        // A shared simulator of a real cluster counts earlier runs' offboards too.
        if let (false, Some(url)) = (cluster.is_real(), &cluster.sim_url) {
            let stats = Sim::new(url).stats().await;
            assert_eq!(count(&stats, "duplicate_offboards"), 0, "{stats}");
        }

        if !kubectl {
            return;
        }
        cluster
            .kubectl_ok(
                &[
                    "wait",
                    "--for=condition=Ready",
                    "doff/finance-laptop-07",
                    "--timeout=30s",
                ],
                None,
            )
            .await;
        cluster
            .kubectl_ok(
                &[
                    "wait",
                    "--for=jsonpath={.status.phase}=Failed",
                    "doff/lab-pc-09",
                    "--timeout=30s",
                ],
                None,
            )
            .await;

        let describe = cluster
            .kubectl_ok(&["describe", "doff", "build-agent-03"], None)
            .await;
        let events = describe
            .split_once("Events:")
            .map(|(_, events)| events)
            .unwrap_or_else(|| panic!("no Events section:\n{describe}"));
        assert!(
            events.contains("PlatformNotSupported"),
            "no PlatformNotSupported event:\n{describe}"
        );

        let table = cluster.kubectl_ok(&["get", "doff"], None).await;
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "MACHINE", "PHASE", "ACTION", "STATUS", "AGE"],
            "{table}"
        );
        let finance = table
            .lines()
            .find(|l| l.starts_with("finance-laptop-07 "))
            .unwrap_or_else(|| panic!("{table}"));
        let action = all["finance-laptop-07"]
            .status
            .as_ref()
            .unwrap()
            .machine_action_id
            .clone()
            .unwrap();
        assert!(finance.contains("Succeeded"), "{finance}");
        assert!(finance.contains(&action), "{finance}");
        assert!(
            finance.contains("0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"),
            "{finance}"
        );

        // GitOps re-syncs: the applied manifests show no drift, re-applying them
        // changes nothing and offboards nothing again.
        let diff = cluster.kubectl(&["diff", "-f", examples], None).await;
        assert!(
            diff.success,
            "kubectl diff reports drift:\n{}{}",
            diff.stdout, diff.stderr
        );
        let sent_before = match &cluster.sim_url {
            Some(url) => count(&Sim::new(url).stats().await, "actions_created"),
            None => 0,
        };
        let reapplied = cluster.kubectl_ok(&["apply", "-f", examples], None).await;
        assert_eq!(
            reapplied.matches(" unchanged").count(),
            names.len(),
            "{reapplied}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again = cluster.wait_final(&names, Duration::from_secs(10)).await;
        for name in &names {
            assert_eq!(
                again[name].status, all[name].status,
                "{name} changed after a re-apply"
            );
        }
        if let Some(url) = &cluster.sim_url {
            let sent_after = count(&Sim::new(url).stats().await, "actions_created");
            assert_eq!(sent_before, sent_after, "a re-apply offboarded again");
        }

        let deleted = cluster
            .kubectl_ok(&["delete", "-f", examples, "--wait"], None)
            .await;
        assert_eq!(deleted.matches("deleted").count(), names.len(), "{deleted}");
        let left: Vec<String> = cluster
            .list()
            .await
            .iter()
            .filter_map(|d| d.metadata.name.clone())
            .filter(|n| names.contains(n))
            .collect();
        assert!(left.is_empty(), "still there after delete: {left:?}");
    })
    .await;
}

fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: defender.offboard.dev/v1alpha1\nkind: DeviceOffboard\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_are_rejected_naming_the_field() {
    bounded(90, async {
        let cluster = Cluster::start(&[]).await;
        let kubectl = have_kubectl().await;
        const ID: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
        let cases: Vec<(&str, String, &[&str])> = vec![
            (
                "e2e-bad-machine-id",
                "  machineId: ABC\n  comment: wiped\n".to_string(),
                &["spec.machineId", "ABC"],
            ),
            (
                "e2e-short-machine-id",
                format!("  machineId: {}\n  comment: wiped\n", &ID[..39]),
                &["spec.machineId"],
            ),
            (
                "e2e-missing-comment",
                format!("  machineId: {ID}\n"),
                &["spec.comment", "Required"],
            ),
            (
                "e2e-empty-comment",
                format!("  machineId: {ID}\n  comment: \"\"\n"),
                &["spec.comment"],
            ),
            (
                "e2e-blank-comment",
                format!("  machineId: {ID}\n  comment: \"   \"\n"),
                &["spec.comment", "blank"],
            ),
            (
                "e2e-both-ids",
                format!(
                    "  machineId: {ID}\n  deviceName: hr-desktop-12.contoso.com\n  comment: wiped\n"
                ),
                &["spec.machineId", "spec.deviceName", "exactly one"],
            ),
            (
                "e2e-neither-id",
                "  comment: wiped\n".to_string(),
                &["spec.machineId", "spec.deviceName", "exactly one"],
            ),
            (
                "e2e-bad-device-name",
                "  deviceName: \"not a host name!\"\n  comment: wiped\n".to_string(),
                &["spec.deviceName"],
            ),
        ];
        for (name, spec, expected) in &cases {
            let error = apply(&cluster, kubectl, &manifest(name, spec))
                .await
                .expect_err(&format!("{name} was accepted"));
            for field in *expected {
                assert!(
                    error.contains(field),
                    "{name}: the error does not name {field:?}:\n{error}"
                );
            }
            assert!(
                cluster.doffs().get_opt(name).await.unwrap().is_none(),
                "{name} was stored although rejected"
            );
        }

        // The spec is immutable once created. An unknown device name keeps a
        // real operator from offboarding anything.
        let name = "e2e-immutable";
        let spec = "  deviceName: e2e-no-such-device.invalid\n  comment: first reason\n";
        if kubectl {
            let _ = cluster
                .kubectl(
                    &["delete", "doff", name, "--ignore-not-found", "--wait"],
                    None,
                )
                .await;
        }
        apply(&cluster, kubectl, &manifest(name, spec))
            .await
            .unwrap();
        let changed = spec.replace("first reason", "second reason");
        let error = apply(&cluster, kubectl, &manifest(name, &changed))
            .await
            .expect_err("a spec change was accepted");
        assert!(error.contains("spec is immutable"), "{error}");
        let other_device = spec.replace("e2e-no-such-device", "e2e-other-device");
        let error = apply(&cluster, kubectl, &manifest(name, &other_device))
            .await
            .expect_err("a device change was accepted");
        assert!(error.contains("spec is immutable"), "{error}");
        let stored = cluster.doffs().get(name).await.unwrap();
        assert_eq!(stored.spec.comment, "first reason");
        assert_eq!(
            stored.spec.device_name.as_deref(),
            Some("e2e-no-such-device.invalid")
        );
        // Re-applying the same manifest is fine (GitOps re-syncs do that).
        apply(&cluster, kubectl, &manifest(name, spec))
            .await
            .unwrap();
        // Labels and annotations stay editable.
        if kubectl {
            cluster
                .kubectl_ok(&["label", "doff", name, "team=platform"], None)
                .await;
            cluster
                .kubectl_ok(&["delete", "doff", name, "--wait"], None)
                .await;
        } else {
            cluster
                .doffs()
                .delete(name, &Default::default())
                .await
                .unwrap();
        }
    })
    .await;
}

/// The resources of a burst, with the simulator's Windows machines.
async fn create_burst(cluster: &Cluster, sim: &Sim, prefix: &str, n: usize) -> Vec<String> {
    create_burst_after(cluster, sim, prefix, 0, n).await
}

/// `n` resources for the Windows machines after the first `skip`.
async fn create_burst_after(
    cluster: &Cluster,
    sim: &Sim,
    prefix: &str,
    skip: usize,
    n: usize,
) -> Vec<String> {
    let ids = sim.windows_machine_ids().await;
    assert!(ids.len() >= skip + n, "only {} Windows machines", ids.len());
    let ids = &ids[skip..skip + n];
    let kubectl = have_kubectl().await;
    apply(cluster, kubectl, &manifests(prefix, ids))
        .await
        .unwrap_or_else(|e| panic!("creating the burst: {e}"));
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// Every resource final with one action, and MDE holding at most one offboard
/// action per machine: the exactly-once contract seen from both sides.
fn assert_exactly_once(
    all: &BTreeMap<String, DeviceOffboard>,
    names: &[String],
    stats: &serde_json::Value,
) {
    assert_eq!(all.len(), names.len(), "resources lost");
    assert_eq!(count(stats, "duplicate_offboards"), 0, "{stats}");
    // POSTs counted at MDE per key: a second POST for a key is allowed only
    // after a lookup proved the first created nothing, which here happens only
    // when MDE refused the first with an injected 5xx before acting.
    let posts = posts_by_key(stats);
    let uids: BTreeSet<String> = all
        .values()
        .filter_map(|d| d.metadata.uid.clone())
        .collect();
    let extra: u64 = posts
        .iter()
        .filter(|(key, _)| uids.contains(*key))
        .map(|(_, n)| n.saturating_sub(1))
        .sum();
    assert!(
        extra <= refused_with_5xx(stats),
        "{extra} second POSTs for a key, but only {} POSTs were refused before MDE acted: {posts:?}",
        refused_with_5xx(stats)
    );
    let per_machine = actions_by_machine(stats);
    let over: Vec<_> = per_machine.iter().filter(|(_, n)| **n > 1).collect();
    assert!(over.is_empty(), "machines with several offboards: {over:?}");
    let mut action_ids = BTreeSet::new();
    for (name, d) in all {
        let status = d.status.as_ref().unwrap();
        let machine = d.spec.machine_id.as_deref().unwrap();
        let action = status
            .machine_action_id
            .as_deref()
            .unwrap_or_else(|| panic!("{name} ended without an action: {status:?}"));
        assert!(
            action_ids.insert(action.to_string()),
            "{name}: action {action} reused"
        );
        assert_eq!(
            per_machine.get(machine),
            Some(&1),
            "{name}: MDE does not hold exactly one offboard for {machine}"
        );
    }
    assert_eq!(
        count(stats, "actions_created"),
        names.len() as u64,
        "{stats}"
    );
}

fn phase_counts(all: &BTreeMap<String, DeviceOffboard>) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for d in all.values() {
        *counts.entry(phase(d)).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_sigkill_never_duplicates() {
    if real_cluster() {
        eprintln!(
            "NOTICE: crash_test_sigkill_never_duplicates starts and kills controllers itself; skipped on a real cluster"
        );
        return;
    }
    bounded(170, async {
        // Simulated time runs 10x: MDE's 100/min and 1500/h become 100/6s and
        // 1500/6min, slow enough that the kills land while work is in flight.
        // A short watch history (kube-apiserver's watch cache starts at 100
        // events) and compactions: watches expire and the controllers list
        // again while they are killed and restarted.
        let cluster = Cluster::start(&[
            "--sim-machines",
            "320",
            "--sim-time-scale",
            "10",
            "--sim-fault-error-rate",
            "0.05",
            "--sim-fault-lost-response-rate",
            "0.1",
            "--watch-history",
            "100",
        ])
        .await;
        let sim = Sim::new(cluster.sim_url.as_deref().unwrap());
        let n = 240;
        let started = Instant::now();
        let names = create_burst(&cluster, &sim, "crash", n).await;
        let run_flags = ["--rate-limit", "100/6s,1500/360s", "--concurrency", "16"];

        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut kills = 0;
        let mut final_at_kill = Vec::new();
        // Kill at random moments until the work is done, at least 10 times.
        // A process proves absence only after its own lookup delay (500 ms)
        // since it first saw a resource Submitting, so each one lives a
        // little longer than its start-up plus that delay, at random.
        while kills < 10 || final_at_kill.last() < Some(&n) {
            assert!(kills < 80, "no progress across restarts: {final_at_kill:?}");
            let mut run = cluster.spawn_run(&format!("run-{kills}"), &run_flags);
            let life = Duration::from_millis(rng.random_range(300..2000));
            if kills % 3 == 1 {
                // Expire every third controller's watch halfway through its life; it
                // waits out kube-runtime's backoff (0.8 s) before it lists again, so
                // it gets a second more.
                tokio::time::sleep(life / 2).await;
                cluster.compact_watches().await;
                tokio::time::sleep(life / 2 + Duration::from_secs(1)).await;
            } else {
                tokio::time::sleep(life).await;
            }
            if let Some(status) = run.exited() {
                panic!("run exited by itself ({status}):\n{}", run.log());
            }
            run.kill().await;
            kills += 1;
            final_at_kill.push(cluster.list().await.iter().filter(|d| is_final(d)).count());
        }
        let _last = cluster.spawn_run("run-last", &run_flags);
        let all = cluster.wait_final(&names, Duration::from_secs(90)).await;
        let elapsed = started.elapsed();
        let stats = sim.stats().await;
        let expired = cluster.expired_watches().await;
        println!(
            "crash test (seed {seed}): {} resources, {kills} SIGKILLs (final at each kill: {final_at_kill:?}), \
             {expired} watches expired (history 100, every third controller's watch compacted away), \
             phases {:?}, actions created {}, lost responses {}, injected errors {}, duplicates {}, 429s {}, elapsed {:.1}s",
            all.len(),
            phase_counts(&all),
            count(&stats, "actions_created"),
            count(&stats, "lost_responses"),
            count(&stats, "injected_errors"),
            count(&stats, "duplicate_offboards"),
            count(&stats, "throttled"),
            elapsed.as_secs_f64()
        );
        assert!(
            final_at_kill.iter().filter(|f| **f < n).count() >= 10,
            "most kills came after the work was done: {final_at_kill:?}"
        );
        assert!(count(&stats, "lost_responses") > 0, "no lost response was injected: {stats}");
        assert!(expired > 0, "no watch expired during the crash test");
        assert_exactly_once(&all, &names, &stats);
    })
    .await;
}

/// Two `run --leader-elect` replicas (3 s lease, MDE's limits ×10), and the
/// one that took the lease.
async fn two_replicas(cluster: &Cluster) -> (BTreeMap<String, Proc>, String) {
    let replica = |identity: &str| {
        cluster.spawn_run(
            identity,
            &[
                "--leader-elect",
                "--identity",
                identity,
                "--lease-namespace",
                "default",
                "--lease-duration",
                "3s",
                "--lease-renew-deadline",
                "2s",
                "--lease-retry-period",
                "500ms",
                "--rate-limit",
                "100/6s,1500/360s",
            ],
        )
    };
    let replicas = BTreeMap::from([
        ("replica-a".to_string(), replica("replica-a")),
        ("replica-b".to_string(), replica("replica-b")),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(holder) = cluster.lease_holder("default").await {
            break holder;
        }
        assert!(Instant::now() < deadline, "nobody took the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(replicas.contains_key(&first), "unknown holder {first}");
    (replicas, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_keeps_exactly_once() {
    if real_cluster() {
        eprintln!(
            "NOTICE: leader_failover_keeps_exactly_once starts and kills controllers itself; skipped on a real cluster"
        );
        return;
    }
    bounded(150, async {
        // Simulated time 10x: 100 offboards per 6s. With 300 resources the
        // budget holds two thirds back for 6 to 12 s; a second batch applied
        // just before the kill leaves sends for the new leader however long
        // the checks before the kill take on a busy machine.
        let cluster = Cluster::start(&["--sim-machines", "600", "--sim-time-scale", "10"]).await;
        let sim = Sim::new(cluster.sim_url.as_deref().unwrap());
        let lease_duration = Duration::from_secs(3);
        let (mut replicas, first) = two_replicas(&cluster).await;
        // Ambiguous outcomes around the failover too.
        sim.set_faults(serde_json::json!({"error_rate": 0.05, "lost_response_rate": 0.2, "lost_response_mode": "mixed"}))
            .await;
        let standby = if first == "replica-a" { "replica-b" } else { "replica-a" }.to_string();
        replicas
            .get_mut(&first)
            .unwrap()
            .wait_for_log("became leader", Duration::from_secs(10))
            .await;

        let n = 300;
        let started = Instant::now();
        let mut names = create_burst(&cluster, &sim, "failover", n).await;
        // Mid-way: some actions exist, some resources are still waiting.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = cluster.list().await;
            let with_action = list
                .iter()
                .filter(|d| d.status.as_ref().is_some_and(|s| s.machine_action_id.is_some()))
                .count();
            if with_action >= 20 {
                assert!(
                    list.iter().filter(|d| is_final(d)).count() < n,
                    "all done before the kill"
                );
                break;
            }
            assert!(Instant::now() < deadline, "the leader does no work");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Only the holder works: the standby has sent no offboard.
        let http = reqwest::Client::new();
        let scrape = |proc: &Proc| {
            let addr = metrics_addr(&proc.log())
                .unwrap_or_else(|| panic!("{} logged no metrics address", proc.name));
            let http = http.clone();
            async move {
                http.get(format!("http://{addr}/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            }
        };
        let leader_metrics = scrape(&replicas[&first]).await;
        let standby_metrics = scrape(&replicas[&standby]).await;
        assert_eq!(metric_sum(&leader_metrics, "defender_offboard_leader", &[]), 1.0);
        assert_eq!(metric_sum(&standby_metrics, "defender_offboard_leader", &[]), 0.0);
        assert!(
            metric_sum(&leader_metrics, "defender_offboard_mde_requests_total", &["family=\"offboard\""]) > 0.0,
            "{leader_metrics}"
        );
        assert_eq!(
            metric_sum(&standby_metrics, "defender_offboard_mde_requests_total", &["family=\"offboard\""]),
            0.0,
            "{standby_metrics}"
        );
        assert_eq!(cluster.lease_holder("default").await.as_deref(), Some(first.as_str()));
        assert!(!replicas[&standby].log().contains("became leader"));
        if have_kubectl().await {
            let holder = cluster
                .kubectl_ok(
                    &[
                        "get",
                        "lease",
                        LEASE_NAME,
                        "-n",
                        "default",
                        "-o",
                        "jsonpath={.spec.holderIdentity}",
                    ],
                    None,
                )
                .await;
            assert_eq!(holder, first);
        }

        names.extend(create_burst_after(&cluster, &sim, "failover-late", n, 50).await);
        replicas.get_mut(&first).unwrap().kill().await;
        let killed_at = Instant::now();
        let final_at_kill = cluster.list().await.iter().filter(|d| is_final(d)).count();
        let failover = loop {
            if cluster.lease_holder("default").await.as_deref() == Some(standby.as_str()) {
                break killed_at.elapsed();
            }
            assert!(
                killed_at.elapsed() < lease_duration + Duration::from_secs(4),
                "{standby} did not take over:\n{}",
                replicas[&standby].log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let all = cluster.wait_final(&names, Duration::from_secs(90)).await;
        let stats = sim.stats().await;
        let new_leader_metrics = scrape(&replicas[&standby]).await;
        println!(
            "leader failover: {} resources, {final_at_kill} final when {first} was killed, {standby} took over after {:.2}s \
             (lease {lease_duration:?}), phases {:?}, actions created {}, lost responses {}, duplicates {}, 429s {}, elapsed {:.1}s",
            all.len(),
            failover.as_secs_f64(),
            phase_counts(&all),
            count(&stats, "actions_created"),
            count(&stats, "lost_responses"),
            count(&stats, "duplicate_offboards"),
            count(&stats, "throttled"),
            started.elapsed().as_secs_f64()
        );
        assert_eq!(metric_sum(&new_leader_metrics, "defender_offboard_leader", &[]), 1.0);
        assert!(
            metric_sum(&new_leader_metrics, "defender_offboard_mde_requests_total", &["family=\"offboard\""]) > 0.0,
            "the new leader sent no offboard: {new_leader_metrics}"
        );
        assert_exactly_once(&all, &names, &stats);
    })
    .await;
}

/// A leader paused past its lease (SIGSTOP: a frozen VM, a stop-the-world
/// pause, a debugger): the standby takes over and finishes the work; when the
/// paused process wakes, its own monotonic clock says its lease has run out,
/// so none of its workers sends, and it stops. MDE counts at most one POST per
/// resource (beyond refusals that a lookup proved created nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_sends_nothing_when_it_wakes() {
    if real_cluster() {
        eprintln!(
            "NOTICE: a_paused_leader_sends_nothing_when_it_wakes pauses controllers itself; skipped on a real cluster"
        );
        return;
    }
    bounded(150, async {
        let cluster = Cluster::start(&["--sim-machines", "200", "--sim-time-scale", "10"]).await;
        let sim = Sim::new(cluster.sim_url.as_deref().unwrap());
        let (mut replicas, first) = two_replicas(&cluster).await;
        let standby = if first == "replica-a" { "replica-b" } else { "replica-a" }.to_string();
        replicas
            .get_mut(&first)
            .unwrap()
            .wait_for_log("became leader", Duration::from_secs(10))
            .await;
        sim.set_faults(serde_json::json!({"lost_response_rate": 0.2, "lost_response_mode": "mixed"}))
            .await;

        let n = 120;
        let started = Instant::now();
        let names = create_burst(&cluster, &sim, "paused", n).await;
        // Pause it mid-work: some sent, many waiting for budget or in flight.
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .list()
            .await
            .iter()
            .filter(|d| d.status.as_ref().is_some_and(|s| s.machine_action_id.is_some()))
            .count()
            < 15
        {
            assert!(Instant::now() < deadline, "the leader does no work");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replicas[&first].signal("STOP");
        let paused_at = Instant::now();
        let takeover = loop {
            if cluster.lease_holder("default").await.as_deref() == Some(standby.as_str()) {
                break paused_at.elapsed();
            }
            assert!(
                paused_at.elapsed() < Duration::from_secs(10),
                "{standby} did not take over:\n{}",
                replicas[&standby].log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Let the new leader send for a while, then wake the old one up in
        // the middle of it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let paused_for = paused_at.elapsed();
        replicas[&first].signal("CONT");
        let woken = replicas.get_mut(&first).unwrap();
        let log = woken
            .wait_for_log("stopping: no longer the leader", Duration::from_secs(10))
            .await;
        let all = cluster.wait_final(&names, Duration::from_secs(90)).await;
        let stats = sim.stats().await;
        println!(
            "paused leader: {} resources, {first} paused {:.1}s (lease 3s), {standby} took over after {:.2}s, \
             phases {:?}, actions created {}, lost responses {}, duplicates {}, 429s {}, elapsed {:.1}s",
            all.len(),
            paused_for.as_secs_f64(),
            takeover.as_secs_f64(),
            phase_counts(&all),
            count(&stats, "actions_created"),
            count(&stats, "lost_responses"),
            count(&stats, "duplicate_offboards"),
            count(&stats, "throttled"),
            started.elapsed().as_secs_f64()
        );
        assert!(log.contains("became leader"), "{log}");
        assert_eq!(
            cluster.lease_holder("default").await.as_deref(),
            Some(standby.as_str()),
            "the woken replica must not take the lease back"
        );
        assert_exactly_once(&all, &names, &stats);
    })
    .await;
}

/// The playground's node offboarding, as a user tries it: `kubectl delete node
/// win-node-1` against the dev API, then `kubectl get doff` shows its offboard
/// `Succeeded`; a Linux node's deletion creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_windows_node_in_the_playground_offboards_its_device() {
    if real_cluster() {
        eprintln!(
            "NOTICE: deleting_a_windows_node_in_the_playground_offboards_its_device deletes Nodes; skipped on a real cluster"
        );
        return;
    }
    bounded(120, async {
        let cluster = Cluster::start(&[]).await;
        let kubectl = have_kubectl().await;
        let _controller = cluster.spawn_run(
            "run",
            &["--offboard-deleted-nodes", "--node-offboard-grace", "1s"],
        );
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cluster.client.clone());
        // The controller holds the Nodes with its finalizer first.
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in ["linux-node-1", "win-node-1"] {
            loop {
                let finalizers = nodes.get(node).await.unwrap().metadata.finalizers;
                if finalizers.is_some_and(|f| {
                    f.iter()
                        .any(|f| f == "defender.offboard.dev/offboard-device")
                }) {
                    break;
                }
                assert!(Instant::now() < deadline, "{node} never got the finalizer");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for node in ["linux-node-1", "win-node-1"] {
            if kubectl {
                let out = cluster.kubectl_ok(&["delete", "node", node], None).await;
                assert!(out.contains(&format!("node \"{node}\" deleted")), "{out}");
            } else {
                nodes.delete(node, &Default::default()).await.unwrap();
            }
        }
        // Linux Nodes are offboarded too (MDE's Offboard API takes them).
        let all = cluster
            .wait_final(
                &["linux-node-1".to_string(), "win-node-1".to_string()],
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(phase(&all["win-node-1"]), "Succeeded");
        assert_eq!(phase(&all["linux-node-1"]), "Succeeded");
        if kubectl {
            let out = cluster.kubectl_ok(&["get", "doff"], None).await;
            println!("kubectl get doff after kubectl delete node win-node-1:\n{out}");
            let row = out
                .lines()
                .find(|l| l.starts_with("win-node-1 "))
                .unwrap_or_else(|| panic!("{out}"));
            assert!(row.contains("Succeeded"), "{out}");
        }
        let names: Vec<_> = cluster
            .list()
            .await
            .into_iter()
            .filter_map(|d| d.metadata.name)
            .collect();
        assert_eq!(names, ["linux-node-1", "win-node-1"]);
        let stats = Sim::new(cluster.sim_url.as_deref().unwrap()).stats().await;
        assert_eq!(count(&stats, "actions_created"), 2, "{stats}");
    })
    .await;
}
