//! Every status shape the operator writes, collected from real runs of the
//! controller against the in-memory API and the MDE simulator, and written
//! as the API stores it to `target/status-shapes/<shape>.json`.
//! `scripts/health-check.py` (in `.ci/run`, after the tests) runs the Argo CD
//! health script and kstatus's rules on each of them: the shapes must come
//! from the operator, not be written by hand, or the check proves nothing.

use crate::common::*;
use defender_offboard::crd::{CANCEL_ANNOTATION, DeviceOffboard};
use defender_offboard::devcluster::{self, ApiHandle};
use defender_offboard::mde::comment_with_marker;
use defender_offboard::operator::offboard::decision::Settings;
use defender_offboard::operator::tenants::DefaultNamespaces;
use defender_offboard::operator::tenants::resource::DefenderConnection;
use defender_offboard::playground::{create_connection, embedded_controller_with, sim_host};
use defender_offboard::simulator::{SimConfig, SimHandle};
use k8s_openapi::api::core::v1::Secret;
use kube::CustomResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shapes `scripts/health-check.py` expects, one file each.
const SHAPES: &[&str] = &[
    "no-status",
    "pending-connection-not-found",
    "pending-connection-not-ready",
    "pending-throttled",
    "pending-permission-denied",
    "submitting-outcome-unknown",
    "in-progress-mde-pending",
    "in-progress",
    "in-progress-adopted",
    "in-progress-cancel-too-late",
    "succeeded",
    "failed-action-failed",
    "failed-action-timed-out",
    "failed-device-not-found",
    "failed-device-not-found-by-name",
    "failed-device-ambiguous",
    "failed-platform-not-supported",
    "failed-invalid-spec",
    "failed-cancelled",
    "failed-cancelled-before-send",
    "failed-device-protected",
    "pending-breaker-open",
    "pending-awaiting-approval",
];

/// Example machines of the simulator and how their offboard ends.
const FINANCE_LAPTOP: &str = "finance-laptop-07.contoso.com";
const HR_DESKTOP: &str = "hr-desktop-12.contoso.com";
const LINUX_REFUSED: &str = "3d4e5f60718293a4b5c6d7e8f9012345678ab1c2";
const TIMES_OUT: &str = "4e5f60718293a4b5c6d7e8f9012345678ab1c2d3";
const FAILS: &str = "60718293a4b5c6d7e8f9012345678ab1c2d3e4f5";
/// Two live records share this name.
const SHARED_NAME: &str = "shared-kiosk-02.contoso.com";

/// Where the shapes go: `$CARGO_TARGET_DIR/status-shapes`, else the
/// workspace's `target/status-shapes`.
fn shapes_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace.join(dir)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    target.join("status-shapes")
}

/// One running controller with its own simulator and API.
struct Env {
    _api: ApiHandle,
    sim: SimHandle,
    client: kube::Client,
    controller: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(controller) = &self.controller {
            controller.abort();
        }
    }
}

/// The CRD without its spec rules, as an older CRD or a hand-edited one
/// would be: the only way an invalid spec reaches the controller.
fn crd_without_spec_rules()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = DeviceOffboard::crd();
    for version in &mut crd.spec.versions {
        let spec = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("spec"))
            .expect("the CRD has a spec schema");
        spec.x_kubernetes_validations = None;
    }
    crd
}

/// A simulator and an API; the controller starts with [`Env::start_controller`],
/// so a resource can be seen before it has any status.
async fn env(sim_config: SimConfig, spec_rules: bool) -> Env {
    let sim = spawn_sim(sim_config).await;
    let crd = if spec_rules {
        DeviceOffboard::crd()
    } else {
        crd_without_spec_rules()
    };
    let config = devcluster::ApiServerConfig {
        crds: vec![crd, DefenderConnection::crd()],
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = devcluster::spawn_api(config, listener).await.unwrap();
    let client = api.client().await.unwrap();
    Env {
        _api: api,
        sim,
        client,
        controller: None,
    }
}

impl Env {
    /// The controller as `run --connections` runs it, `default` served by
    /// the operator's own credentials.
    fn start_controller(&mut self, settings: Settings) {
        let allowed = sim_host(&self.sim);
        let controller = embedded_controller_with(
            self.client.clone(),
            &self.sim,
            FAST_LIMITS.parse().unwrap(),
            settings,
            Duration::from_millis(200),
            |run| {
                run.connections = true;
                run.connection_allowed_hosts = vec![allowed];
                run.default_connection_namespaces = Some(DefaultNamespaces::Only(
                    ["default".to_string()].into_iter().collect(),
                ));
            },
        )
        .unwrap();
        self.controller = Some(tokio::spawn(controller));
    }

    fn api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            "default",
            &ApiResource::erase::<DeviceOffboard>(&()),
        )
    }

    /// Create a resource from its spec (and annotations).
    async fn create(&self, name: &str, spec: Value, annotations: Value) {
        let object: DeviceOffboard = serde_json::from_value(json!({
            "apiVersion": "defender.offboard.dev/v1alpha1",
            "kind": "DeviceOffboard",
            "metadata": {"name": name, "annotations": annotations},
            "spec": spec,
        }))
        .unwrap();
        Api::<DeviceOffboard>::namespaced(self.client.clone(), "default")
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }

    async fn get(&self, name: &str) -> Value {
        serde_json::to_value(self.api().get(name).await.unwrap()).unwrap()
    }

    /// The object once its status satisfies `reached` (`what` names it).
    async fn wait(&self, name: &str, what: &str, reached: impl Fn(&Value) -> bool) -> Value {
        let waited = tokio::time::timeout(Duration::from_secs(25), async {
            loop {
                let object = self.get(name).await;
                if reached(&object["status"]) {
                    return object;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match waited {
            Ok(object) => object,
            Err(_) => panic!(
                "{name} never reached {what}; its status: {}",
                self.get(name).await["status"]
            ),
        }
    }

    async fn annotate_cancel(&self, name: &str, reason: &str) {
        let patch = json!({"metadata": {"annotations": {CANCEL_ANNOTATION: reason}}});
        self.api()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
}

fn by_id(machine_id: &str) -> Value {
    json!({"machineId": machine_id, "comment": "retired"})
}

fn by_name(device_name: &str) -> Value {
    json!({"deviceName": device_name, "comment": "retired"})
}

fn phase(status: &Value) -> &str {
    status["phase"].as_str().unwrap_or_default()
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

fn ready_reason(status: &Value) -> &str {
    condition(status, "Ready")["reason"]
        .as_str()
        .unwrap_or_default()
}

fn is(status: &Value, want_phase: &str, want_reason: &str) -> bool {
    phase(status) == want_phase && ready_reason(status) == want_reason
}

/// The shapes collected so far, written as the API stores them.
#[derive(Default)]
struct Shapes(Vec<(String, Value)>);

impl Shapes {
    fn keep(&mut self, shape: &str, mut object: Value) {
        // Who wrote which field is noise here; everything else is kept.
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("managedFields");
        }
        self.0.push((shape.to_string(), object));
    }

    fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                std::fs::remove_file(path).unwrap();
            }
        }
        for (shape, object) in &self.0 {
            let text = serde_json::to_string_pretty(object).unwrap();
            std::fs::write(dir.join(format!("{shape}.json")), text + "\n").unwrap();
        }
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names
    }
}

/// Before the controller, then final outcomes and connection waits: MDE's
/// actions end at once (time-scaled), the API admits an invalid spec.
async fn finals(shapes: &mut Shapes) {
    let mut env = env(fast_sim_config(), false).await;
    // Another device than `succeeded`'s, which would adopt its action.
    env.create("no-status", by_name(HR_DESKTOP), json!({}))
        .await;
    let untouched = env.get("no-status").await;
    assert!(untouched.get("status").is_none(), "{untouched}");
    shapes.keep("no-status", untouched);
    env.start_controller(fast_settings());

    // A connection whose secret MDE no longer accepts (the Secret exists
    // first, so the connection's own is not written over it).
    let revoked: Secret = serde_json::from_value(json!({
        "metadata": {"name": "revoked", "namespace": "default"},
        "stringData": {"client-secret": "revoked"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), "default")
        .create(&PostParams::default(), &revoked)
        .await
        .unwrap();
    create_connection(&env.client, "default", "revoked", &env.sim)
        .await
        .unwrap();
    let with_connection = |name: &str| json!({"machineId": FAILS, "comment": "retired", "connectionRef": {"name": name}});
    let none = json!({});
    let cancel = json!({CANCEL_ANNOTATION: "wrong device"});
    // (shape, spec, annotations, the phase and Ready reason it reaches)
    let resources = [
        (
            "succeeded",
            by_name(FINANCE_LAPTOP),
            &none,
            "Succeeded",
            "Succeeded",
        ),
        (
            "failed-action-failed",
            by_id(FAILS),
            &none,
            "Failed",
            "Failed",
        ),
        (
            "failed-action-timed-out",
            by_id(TIMES_OUT),
            &none,
            "Failed",
            "Failed",
        ),
        (
            "failed-device-not-found",
            by_id(&"f".repeat(40)),
            &none,
            "Failed",
            "DeviceNotFound",
        ),
        (
            "failed-device-not-found-by-name",
            by_name("retired-pc-99"),
            &none,
            "Failed",
            "DeviceNotFound",
        ),
        (
            "failed-device-ambiguous",
            by_name(SHARED_NAME),
            &none,
            "Failed",
            "DeviceAmbiguous",
        ),
        (
            "failed-platform-not-supported",
            by_id(LINUX_REFUSED),
            &none,
            "Failed",
            "PlatformNotSupported",
        ),
        (
            "failed-invalid-spec",
            json!({"comment": "retired"}),
            &none,
            "Failed",
            "InvalidSpec",
        ),
        (
            "pending-connection-not-found",
            with_connection("missing"),
            &none,
            "Pending",
            "ConnectionNotFound",
        ),
        (
            "pending-connection-not-ready",
            with_connection("revoked"),
            &none,
            "Pending",
            "ConnectionNotReady",
        ),
        (
            "failed-cancelled-before-send",
            with_connection("missing"),
            &cancel,
            "Failed",
            "Cancelled",
        ),
    ];
    for (name, spec, annotations, _, _) in &resources {
        env.create(name, spec.clone(), (*annotations).clone()).await;
    }
    for (name, _, _, want_phase, want_reason) in resources {
        let what = format!("{want_phase}/{want_reason}");
        let object = env
            .wait(name, &what, |s| is(s, want_phase, want_reason))
            .await;
        shapes.keep(name, object);
    }
    let timed_out = shapes
        .0
        .iter()
        .find(|(n, _)| n == "failed-action-timed-out");
    assert_eq!(
        timed_out.unwrap().1["status"]["actionStatus"],
        "TimeOut",
        "MDE's word is kept"
    );
    assert!(
        env.sim
            .stats()
            .offboard_requests_by_machine
            .get(FAILS)
            .is_some_and(|n| *n == 1),
        "the connection waits and the cancel sent nothing: one POST for the machine, \
         from failed-action-failed"
    );
}

/// MDE holds actions `Pending` 3 s, then `InProgress` 10 s: the shapes of
/// an action under way, a cancel in time and one too late, an adopted action.
async fn under_way(shapes: &mut Shapes) {
    let mut env = env(
        SimConfig {
            pending_for: Duration::from_secs(180),
            in_progress_for: Duration::from_secs(600),
            ..fast_sim_config()
        },
        true,
    )
    .await;
    let mde = client(&env.sim, FAST_LIMITS);
    let machines = windows_machines(&mde, 3).await;
    // Another request of this operator offboarded the third machine already.
    let earlier = mde
        .offboard(
            &machines[2],
            &comment_with_marker("earlier", "another-request"),
        )
        .await
        .unwrap();
    env.start_controller(fast_settings());
    env.create("mistake", by_id(&machines[0]), json!({})).await;
    env.create("running", by_id(&machines[1]), json!({})).await;
    env.create("adopting", by_id(&machines[2]), json!({})).await;

    let mde_pending = env
        .wait("mistake", "InProgress, MDE Pending", |s| {
            phase(s) == "InProgress" && s["actionStatus"] == "Pending"
        })
        .await;
    shapes.keep("in-progress-mde-pending", mde_pending);
    env.annotate_cancel("mistake", "wrong device").await;
    let adopted = env
        .wait("adopting", "InProgress, Submitted by adoption", |s| {
            phase(s) == "InProgress" && condition(s, "Submitted")["reason"] == "Adopted"
        })
        .await;
    assert_eq!(adopted["status"]["machineActionId"], earlier.id.as_str());
    shapes.keep("in-progress-adopted", adopted);
    let cancelled = env
        .wait("mistake", "Failed/Cancelled with the cancel sent", |s| {
            is(s, "Failed", "Cancelled") && s["cancel"]["state"] == "Sent"
        })
        .await;
    shapes.keep("failed-cancelled", cancelled);

    let in_progress = env
        .wait("running", "InProgress, MDE InProgress", |s| {
            phase(s) == "InProgress" && s["actionStatus"] == "InProgress"
        })
        .await;
    shapes.keep("in-progress", in_progress);
    env.annotate_cancel("running", "changed my mind").await;
    let too_late = env
        .wait("running", "a cancel too late", |s| {
            phase(s) == "InProgress" && s["cancel"]["state"] == "TooLate"
        })
        .await;
    shapes.keep("in-progress-cancel-too-late", too_late);
}

/// Every answer to an offboard is lost (504 after MDE created the action):
/// the resource stays `Submitting`, `OutcomeUnknown`, until its lookup 2 s
/// later. (The intent record before the POST is `Submitting` too, for
/// milliseconds: too short to catch reliably.)
async fn submitting(shapes: &mut Shapes) {
    let mut env = env(fast_sim_config(), true).await;
    control(
        &env.sim,
        "faults",
        json!({"lost_response_rate": 1.0, "lost_response_mode": "504"}),
    )
    .await;
    let machine = windows_machines(&client(&env.sim, FAST_LIMITS), 1).await;
    env.start_controller(Settings {
        lookup_delay: Duration::from_secs(2),
        ..fast_settings()
    });
    env.create("lost", by_id(&machine[0]), json!({})).await;
    let object = env
        .wait("lost", "Submitting/OutcomeUnknown", |s| {
            is(s, "Submitting", "OutcomeUnknown")
        })
        .await;
    shapes.keep("submitting-outcome-unknown", object);
}

/// MDE throttles offboards for a minute: the resource waits, `Pending`,
/// with the time it tries again (Throttled by the 429, or WaitingForBudget
/// once the operator's budget learned it).
async fn throttled(shapes: &mut Shapes) {
    let mut env = env(fast_sim_config(), true).await;
    control(
        &env.sim,
        "throttle",
        json!({"family": "offboard", "seconds": 60.0}),
    )
    .await;
    let machine = windows_machines(&client(&env.sim, FAST_LIMITS), 1).await;
    env.start_controller(fast_settings());
    env.create("throttled", by_id(&machine[0]), json!({})).await;
    let object = env
        .wait("throttled", "Pending/Throttled with nextRetryAt", |s| {
            phase(s) == "Pending"
                && matches!(ready_reason(s), "Throttled" | "WaitingForBudget")
                && s["nextRetryAt"].is_string()
        })
        .await;
    shapes.keep("pending-throttled", object);
}

/// The app may read machines but not offboard them: `Pending`, the
/// permission named.
async fn permission_denied(shapes: &mut Shapes) {
    let mut env = env(
        SimConfig {
            roles: vec!["Machine.Read.All".into()],
            ..fast_sim_config()
        },
        true,
    )
    .await;
    let machine = windows_machines(&client(&env.sim, FAST_LIMITS), 1).await;
    env.start_controller(fast_settings());
    env.create("denied", by_id(&machine[0]), json!({})).await;
    let object = env
        .wait("denied", "Pending/PermissionDenied", |s| {
            is(s, "Pending", "PermissionDenied")
        })
        .await;
    shapes.keep("pending-permission-denied", object);
}

/// The safety rails: a protected device (`--protected-tag`), a new offboard
/// held by the breaker (`--max-offboards-per-hour 1`, after one was sent),
/// and one waiting for its approval (`--require-approval`).
async fn safety(shapes: &mut Shapes) {
    let mut rails = env(fast_sim_config(), true).await;
    let machines = windows_machines(&client(&rails.sim, FAST_LIMITS), 2).await;
    rails.start_controller(Settings {
        protection: defender_offboard::operator::offboard::decision::Protection::from_flags(
            &[defender_offboard::simulator::PROTECTED_EXAMPLE_TAG.into()],
            &[],
        ),
        max_offboards_per_hour: 1,
        ..fast_settings()
    });
    rails
        .create("protected", by_name("dc-01.contoso.com"), json!({}))
        .await;
    let object = rails
        .wait("protected", "Failed/DeviceProtected", |s| {
            is(s, "Failed", "DeviceProtected")
        })
        .await;
    shapes.keep("failed-device-protected", object);
    rails.create("first", by_id(&machines[0]), json!({})).await;
    rails
        .wait("first", "sent", |s| s["machineActionId"].is_string())
        .await;
    rails.create("held", by_id(&machines[1]), json!({})).await;
    let object = rails
        .wait("held", "Pending/BreakerOpen", |s| {
            is(s, "Pending", "BreakerOpen")
        })
        .await;
    shapes.keep("pending-breaker-open", object);

    // A second cluster, approvals required.
    let mut approvals = env(fast_sim_config(), true).await;
    let machine = windows_machines(&client(&approvals.sim, FAST_LIMITS), 1).await;
    approvals.start_controller(Settings {
        require_approval: true,
        ..fast_settings()
    });
    approvals
        .create(
            "unapproved",
            by_id(&machine[0]),
            json!({"defender.offboard.dev/created-by": "alice@contoso.com"}),
        )
        .await;
    let object = approvals
        .wait("unapproved", "Pending/AwaitingApproval", |s| {
            is(s, "Pending", "AwaitingApproval")
        })
        .await;
    shapes.keep("pending-awaiting-approval", object);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_shape_is_collected_from_a_real_run() {
    let (mut a, mut b, mut c, mut d, mut e, mut f) = Default::default();
    tokio::join!(
        finals(&mut a),
        under_way(&mut b),
        submitting(&mut c),
        throttled(&mut d),
        permission_denied(&mut e),
        safety(&mut f),
    );
    let mut shapes = Shapes::default();
    for part in [a, b, c, d, e, f] {
        shapes.0.extend(part.0);
    }
    let mut expected = SHAPES.to_vec();
    expected.sort_unstable();
    assert_eq!(shapes.names(), expected, "every expected shape, once");
    for (name, object) in &shapes.0 {
        let status = &object["status"];
        let generation = &object["metadata"]["generation"];
        if name != "no-status" {
            assert_eq!(
                &status["observedGeneration"], generation,
                "{name}: the status says which generation it reflects"
            );
        }
    }
    let dir = shapes_dir();
    shapes.write(&dir);
    println!(
        "status shapes: {} written to {}",
        shapes.0.len(),
        dir.display()
    );
}
