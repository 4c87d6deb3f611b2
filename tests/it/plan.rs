//! `defender-offboard plan` as a CI job runs it (the built binary against the
//! simulator), and protected devices in the controller: nothing is sent for
//! either, counted at the simulator.

use crate::common::*;
use crate::controller::{phases, start_with};
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec, Phase};
use defender_offboard::operator::offboard::decision::{NamePattern, Protection};
use defender_offboard::simulator::{PROTECTED_EXAMPLE_TAG, SimHandle, SimStats};
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_defender-offboard");
const FINANCE_LAPTOP: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const HR_DESKTOP: &str = "1b2c3d4e5f60718293a4b5c6d7e8f9012345678a";
const DC_01: &str = "fedc000000000000000000000000000000000001";

async fn plan(sim: &SimHandle, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("plan")
        .args(args)
        .env_clear()
        .env("AZURE_TENANT_ID", "sim-tenant")
        .env("AZURE_CLIENT_ID", "sim-client")
        .env("AZURE_CLIENT_SECRET", "sim-secret")
        .env("DEFENDER_API_URL", sim.base_url())
        .env("AZURE_AUTHORITY_HOST", sim.base_url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .unwrap();
    drop(input);
    with_timeout(60, child.wait_with_output()).await.unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The table's rows: resource → its ACTION column.
fn actions(table: &str) -> BTreeMap<String, String> {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let action_at = header.find("ACTION").unwrap();
    let machine_at = header.find("MACHINE").unwrap();
    lines
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let resource = l[..action_at].trim().to_string();
            let action = l[action_at..machine_at].trim().to_string();
            (resource, action)
        })
        .collect()
}

/// Nothing offboarded, cancelled or even attempted.
fn nothing_sent(stats: &SimStats) {
    assert!(
        stats.offboard_requests_by_machine.is_empty(),
        "offboard POSTs: {:?}",
        stats.offboard_requests_by_machine
    );
    assert!(
        !stats.requests.contains_key("offboard"),
        "{:?}",
        stats.requests
    );
    assert!(
        !stats.requests.contains_key("cancel"),
        "{:?}",
        stats.requests
    );
}

/// `plan` over `examples/` prints a row per DeviceOffboard with what the
/// operator would do, exits 2 because some would not be offboarded, and
/// sends nothing; `--output json` says the same as one array.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_over_the_examples_shows_each_action_and_sends_nothing() {
    let sim = spawn_sim(fast_sim_config()).await;
    let protected = ["--protected-tag", PROTECTED_EXAMPLE_TAG];
    let output = plan(&sim, &[&["-f", "examples"][..], &protected].concat(), None).await;
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stdout}\n{stderr}");
    let rows = actions(&stdout);
    let expected = [
        ("hr-desktop-12", "send"),
        ("finance-laptop-07", "send"),
        ("ws2019-file-01", "send"),
        ("kiosk-lobby-01-current", "send"),
        // MDE refuses it at send time; the plan can only say it would send.
        ("build-agent-03", "send"),
        ("lab-pc-09", "send"),
        ("shared-kiosk-02", "nothing: ambiguous"),
        ("dc-01", "nothing: protected"),
        // Another tenant's resource is not planned against this one.
        ("fabrikam-finance-laptop-07", "skipped"),
    ];
    assert_eq!(
        rows,
        expected
            .iter()
            .map(|(r, a)| (r.to_string(), a.to_string()))
            .collect(),
        "{stdout}"
    );
    // The chosen record and why: the tag, and the records of an ambiguous name.
    let dc = stdout.lines().find(|l| l.starts_with("dc-01 ")).unwrap();
    assert!(dc.contains(DC_01) && dc.contains("do-not-offboard"), "{dc}");
    assert!(
        stdout.contains("fe00000000000000000000000000000000000202"),
        "{stdout}"
    );
    assert!(stdout.contains("OsPlatformNotSupported"), "{stdout}");
    assert!(stderr.contains("exit 2"), "{stderr}");

    let output = plan(
        &sim,
        &[&["-f", "examples", "--output", "json"][..], &protected].concat(),
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output).1);
    let json: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json.len(), expected.len());
    let row = |name: &str| json.iter().find(|r| r["name"] == name).unwrap().clone();
    assert_eq!(row("dc-01")["action"], "nothing");
    assert_eq!(row("dc-01")["reason"], "protected");
    assert_eq!(
        row("dc-01")["machine"]["machineTags"][0],
        PROTECTED_EXAMPLE_TAG
    );
    assert_eq!(row("shared-kiosk-02")["reason"], "ambiguous");
    assert_eq!(row("hr-desktop-12")["action"], "send");
    assert_eq!(row("hr-desktop-12")["machine"]["id"], HR_DESKTOP);
    assert_eq!(row("hr-desktop-12")["machine"]["osPlatform"], "Windows10");
    assert!(
        row("hr-desktop-12")["resolution"]
            .as_str()
            .unwrap()
            .contains("chose")
    );

    // Without the protected tag, dc-01 would be sent for: the flag is what protects it.
    let unprotected = plan(&sim, &["-f", "examples/protected.yaml"], None).await;
    assert_eq!(
        unprotected.status.code(),
        Some(0),
        "{}",
        text(&unprotected).1
    );
    assert_eq!(actions(&text(&unprotected).0)["dc-01"], "send");

    nothing_sent(&sim.stats());
}

/// Exit 0 when every resource would be offboarded; a resource whose device
/// already has a live offboard adopts it, and a second resource for a
/// machine an earlier one sends for adopts that one's action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_the_action_a_resource_would_adopt() {
    let sim = spawn_sim(fast_sim_config()).await;
    let live = client(&sim, FAST_LIMITS)
        .offboard(
            FINANCE_LAPTOP,
            &defender_offboard::mde::comment_with_marker("earlier", "other-request"),
        )
        .await
        .unwrap();
    let manifests = format!(
        r#"
apiVersion: v1
kind: List
items:
  - apiVersion: defender.offboard.dev/v1alpha1
    kind: DeviceOffboard
    metadata: {{name: finance}}
    spec: {{machineId: "{FINANCE_LAPTOP}", comment: returned}}
  - apiVersion: defender.offboard.dev/v1alpha1
    kind: DeviceOffboard
    metadata: {{name: hr, namespace: it}}
    spec: {{deviceName: hr-desktop-12.contoso.com, comment: moved}}
  - apiVersion: defender.offboard.dev/v1alpha1
    kind: DeviceOffboard
    metadata: {{name: hr-again, namespace: it}}
    spec: {{machineId: "{HR_DESKTOP}", comment: moved}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: unrelated}}
"#
    );
    let output = plan(&sim, &["-f", "-"], Some(&manifests)).await;
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let rows = actions(&stdout);
    assert_eq!(rows["finance"], format!("adopt {}", live.id), "{stdout}");
    assert_eq!(rows["it/hr"], "send", "{stdout}");
    assert_eq!(rows["it/hr-again"], "adopt (from it/hr)", "{stdout}");
    assert!(stderr.contains("ConfigMap \"unrelated\""), "{stderr}");
    assert_eq!(
        sim.stats()
            .offboard_requests_by_machine
            .values()
            .sum::<u64>(),
        1,
        "only this test's own offboard"
    );
}

/// A manifest that cannot be read, or an MDE that cannot be reached, is an
/// error (exit 1), not a plan; an invalid resource is a row (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_exits_one_on_errors_and_two_on_invalid_resources() {
    let sim = spawn_sim(fast_sim_config()).await;
    let bad = plan(&sim, &["-f", "-"], Some("kind: [")).await;
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad).1);
    assert!(text(&bad).1.contains("-f -"), "{}", text(&bad).1);
    let missing = plan(&sim, &["-f", "no/such/dir"], None).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing).1.contains("no/such/dir"),
        "{}",
        text(&missing).1
    );

    let invalid = r#"
apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata: {name: both}
spec: {machineId: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567", deviceName: pc, comment: c}
"#;
    let output = plan(&sim, &["-f", "-", "-o", "json"], Some(invalid)).await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output).1);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json[0]["reason"], "invalid");
    assert!(json[0]["message"].as_str().unwrap().contains("exactly one"));

    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let output = tokio::process::Command::new(BIN)
        .args(["plan", "-f", "examples/by-machine-id.yaml", "--api-url"])
        .arg(&unreachable)
        .arg("--authority-host")
        .arg(&unreachable)
        .env_clear()
        .env("AZURE_TENANT_ID", "sim-tenant")
        .env("AZURE_CLIENT_ID", "sim-client")
        .env("AZURE_CLIENT_SECRET", "sim-secret")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output).1);
    nothing_sent(&sim.stats());
}

async fn create(client: &kube::Client, name: &str, spec: DeviceOffboardSpec) {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &DeviceOffboard::new(name, spec))
        .await
        .unwrap();
}

fn spec(machine_id: Option<&str>, device_name: Option<&str>) -> DeviceOffboardSpec {
    DeviceOffboardSpec {
        machine_id: machine_id.map(Into::into),
        device_name: device_name.map(Into::into),
        comment: "listed by mistake".into(),
        ttl_seconds_after_finished: None,
        connection_ref: None,
        node: None,
    }
}

/// A protected device's DeviceOffboard ends Failed/DeviceProtected with an
/// Event and nothing sent, by tag (found by name) and by name pattern (named
/// by machine id); an unprotected device beside them is offboarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_device_is_never_sent_for() {
    let settings = defender_offboard::operator::offboard::decision::Settings {
        protection: Protection::from_flags(
            &[PROTECTED_EXAMPLE_TAG.to_string()],
            &[NamePattern::parse("^hr-desktop-").unwrap()],
        ),
        ..fast_settings()
    };
    let env = start_with(fast_sim_config(), settings).await;
    create(&env.client, "dc-01", spec(None, Some("dc-01.contoso.com"))).await;
    create(&env.client, "hr-desktop-12", spec(Some(HR_DESKTOP), None)).await;
    create(&env.client, "finance", spec(Some(FINANCE_LAPTOP), None)).await;
    let done = with_timeout(60, async {
        loop {
            let now = phases(&env.client).await;
            if now.len() == 3 && now.iter().all(|(_, p, _)| p.is_terminal()) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");
    for (name, machine, rule) in [
        ("dc-01", DC_01, "machine tag \"do-not-offboard\""),
        (
            "hr-desktop-12",
            HR_DESKTOP,
            "protected pattern \"^hr-desktop-\"",
        ),
    ] {
        let status = api.get(name).await.unwrap().status.unwrap();
        assert_eq!(status.phase, Some(Phase::Failed), "{name}: {status:?}");
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.reason, "DeviceProtected", "{name}: {status:?}");
        assert!(ready.message.contains(rule), "{name}: {}", ready.message);
        assert_eq!(status.machine_id.as_deref(), Some(machine));
        assert!(status.machine_action_id.is_none());
        assert_eq!(
            env.sim.stats().offboard_requests_by_machine.get(machine),
            None,
            "{name}: an offboard was sent"
        );
    }
    let finance = done.iter().find(|(n, _, _)| n == "finance").unwrap();
    assert_eq!(finance.1, Phase::Succeeded, "{done:?}");
    assert_eq!(
        env.sim
            .stats()
            .offboard_requests_by_machine
            .get(FINANCE_LAPTOP),
        Some(&1)
    );
    // The Event says so too.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), "default");
    let events = events.list(&Default::default()).await.unwrap().items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("DeviceProtected")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("dc-01")),
        "no DeviceProtected Event: {:?}",
        events.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
}

/// A `DefenderConnection`'s own protected tags hold for the resources using
/// it, though the operator protects nothing itself; a pattern that is not a
/// regular expression leaves the connection unusable (`InvalidSpec`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_protected_tags_hold_for_its_resources() {
    use defender_offboard::operator::tenants::resource::DefenderConnection;
    use defender_offboard::playground::{create_connection, embedded_controller_with, sim_host};
    use kube::api::{Patch, PatchParams};
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let allowed = sim_host(&sim);
    let controller = embedded_controller_with(
        client.clone(),
        &sim,
        FAST_LIMITS.parse().unwrap(),
        fast_settings(),
        Duration::from_millis(300),
        |run| {
            run.connections = true;
            run.connection_allowed_hosts = vec![allowed];
        },
    )
    .unwrap();
    let controller = tokio::spawn(controller);
    let connections: Api<DefenderConnection> = Api::namespaced(client.clone(), "default");
    let ready_at = |generation: i64, reason: &'static str| {
        let connections = connections.clone();
        async move {
            with_timeout(30, async {
                loop {
                    let status = connections.get("guarded").await.unwrap().status;
                    let ready = status.as_ref().and_then(|s| {
                        s.conditions.iter().find(|c| {
                            c.type_ == "Ready" && c.observed_generation == Some(generation)
                        })
                    });
                    if ready.is_some_and(|c| c.reason == reason) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
        }
    };
    create_connection(&client, "default", "guarded", &sim)
        .await
        .unwrap();
    let patch = |spec: serde_json::Value| {
        let connections = connections.clone();
        async move {
            connections
                .patch(
                    "guarded",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "spec": spec })),
                )
                .await
                .unwrap()
        }
    };
    patch(serde_json::json!({"protectedTags": ["tier0"]})).await;
    ready_at(2, "SignedIn").await;
    let through = |spec: DeviceOffboardSpec| DeviceOffboardSpec {
        connection_ref: Some(defender_offboard::crd::ConnectionRef {
            name: "guarded".into(),
        }),
        ..spec
    };
    create(
        &client,
        "dc-01",
        through(spec(None, Some("dc-01.contoso.com"))),
    )
    .await;
    create(&client, "hr", through(spec(Some(HR_DESKTOP), None))).await;
    let done = with_timeout(60, async {
        loop {
            let now = phases(&client).await;
            if now.len() == 2 && now.iter().all(|(_, p, _)| p.is_terminal()) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let offboards: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let dc = offboards.get("dc-01").await.unwrap().status.unwrap();
    let ready = dc.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "DeviceProtected", "{dc:?}");
    assert!(
        ready
            .message
            .contains("DefenderConnection \"guarded\" spec.protectedTags"),
        "{}",
        ready.message
    );
    let hr = done.iter().find(|(n, _, _)| n == "hr").unwrap();
    assert_eq!(hr.1, Phase::Succeeded, "{done:?}");
    let stats = sim.stats();
    assert_eq!(stats.offboard_requests_by_machine.get(DC_01), None);
    assert_eq!(stats.offboard_requests_by_machine.get(HR_DESKTOP), Some(&1));

    patch(serde_json::json!({"protectedNamePatterns": ["("]})).await;
    ready_at(3, "InvalidSpec").await;
    let reason = connections
        .get("guarded")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions[0]
        .message
        .clone();
    assert!(reason.contains("spec.protectedNamePatterns"), "{reason}");
    controller.abort();
}

/// `offboard` takes the same protection flags and stops before sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offboard_command_refuses_a_protected_device() {
    let sim = spawn_sim(fast_sim_config()).await;
    for target in [
        ["--device-name", "dc-01.contoso.com"],
        ["--machine-id", DC_01],
    ] {
        let output = tokio::process::Command::new(BIN)
            .arg("offboard")
            .args(target)
            .args(["--comment", "retired", "--protected-name", "^DC-\\d+\\."])
            .env_clear()
            .env("AZURE_TENANT_ID", "sim-tenant")
            .env("AZURE_CLIENT_ID", "sim-client")
            .env("AZURE_CLIENT_SECRET", "sim-secret")
            .env("DEFENDER_API_URL", sim.base_url())
            .env("AZURE_AUTHORITY_HOST", sim.base_url())
            .output()
            .await
            .unwrap();
        let (_, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(1), "{target:?}: {stderr}");
        assert!(
            stderr.contains("is protected") && stderr.contains("--protected-name"),
            "{target:?}: {stderr}"
        );
    }
    nothing_sent(&sim.stats());
}
