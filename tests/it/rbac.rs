//! The chart grants every Kubernetes call the code makes: a full controller
//! cycle (start-up check, leader lease, watch, status writes, events) runs
//! against the in-memory API through a client that records each request, and
//! every request must be allowed by the chart's RBAC rules.

use crate::common::*;
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec};
use defender_offboard::operator::offboard::decision::Settings;
use defender_offboard::operator::runtime::check_crd_installed;
use defender_offboard::operator::runtime::leader::{Elector, LeaseTiming};
use defender_offboard::operator::tenants::resource::DefenderConnection;

use defender_offboard::metrics::Metrics;
use defender_offboard::operator::nodes::{self, NODE_FINALIZER};
use defender_offboard::playground::{
    create_connection, create_dev_node, create_workload_identity_connection, dev_node_named,
    embedded_controller_with, sim_host,
};
use http::{Method, Request};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::client::{Body, ClientBuilder};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (API group, resource, verb) as RBAC names them.
type Permission = (String, String, String);

fn chart_rules() -> BTreeSet<Permission> {
    let mut granted = BTreeSet::new();
    for file in [
        "clusterrole.yaml",
        "leader-election-rbac.yaml",
        "node-offboarding-rbac.yaml",
        "node-finalizer-cleanup.yaml",
        "connections-rbac.yaml",
    ] {
        let text =
            std::fs::read_to_string(format!("charts/defender-offboard/templates/{file}")).unwrap();
        // Rules are plain YAML between `rules:` and the end of that document.
        let rules = text.split("rules:\n").nth(1).unwrap();
        // A `{{- if ... }}` line inside the rules (e.g. connections.enabled)
        // is skipped: what it guards counts as granted.
        let rules: String = rules
            .lines()
            .take_while(|l| l.starts_with("  ") || l.starts_with("{{-"))
            .filter(|l| !l.starts_with("{{"))
            .map(|l| format!("{l}\n"))
            .collect();
        let rules: Vec<serde_json::Value> = serde_yaml_ng::from_str(&rules).unwrap();
        for rule in rules {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        granted.insert((
                            group.as_str().unwrap().to_string(),
                            resource.as_str().unwrap().to_string(),
                            verb.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
    }
    granted
}

/// The RBAC permission a request needs.
fn permission(method: &Method, path: &str, query: &str) -> Permission {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest.to_vec()),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest.to_vec()),
        _ => panic!("unexpected path {path}"),
    };
    let rest = match rest.as_slice() {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest.to_vec(),
        other => other.to_vec(),
    };
    let (resource, named) = match rest.as_slice() {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {path}"),
    };
    let verb = match *method {
        Method::GET if query.contains("watch=true") => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => panic!("unexpected method {method}"),
    };
    (group, resource, verb.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_exactly_the_calls_the_controller_makes() {
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let seen: Arc<Mutex<BTreeSet<Permission>>> = Arc::default();
    let record = seen.clone();
    let recorder = tower::util::MapRequestLayer::new(move |request: Request<Body>| {
        let uri = request.uri();
        record.lock().unwrap().insert(permission(
            request.method(),
            uri.path(),
            uri.query().unwrap_or_default(),
        ));
        request
    });
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&recorder)
        .build();

    // Start-up and leader election, as `run --leader-elect` does them.
    check_crd_installed(&client, None).await.unwrap();
    let timing = LeaseTiming {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(200),
    };
    let mut elector = Elector::new(client.clone(), "default", "replica-a", timing);
    assert!(
        elector.try_acquire_or_renew().await.unwrap(),
        "first replica takes the lease"
    );
    assert!(
        elector.try_acquire_or_renew().await.unwrap(),
        "and renews it"
    );

    // A full controller cycle: success, a failure with events, a throttle.
    let settings = Settings {
        lookup_delay: Duration::from_millis(200),
        retry_backoff: Duration::from_millis(200),
        access_backoff: Duration::from_secs(5),
        // The deleted Node's grace ends within the test, so the look for
        // the Node come back (get, list) is recorded too.
        node_grace: Duration::from_millis(300),
        ..Settings::default()
    };
    // With node offboarding and a fast TTL sweep, so their calls are recorded too.
    let admin = api.client().await.unwrap();
    create_dev_node(&admin, dev_node_named("win-node-1").unwrap())
        .await
        .unwrap();
    create_dev_node(&admin, dev_node_named("win-node-2").unwrap())
        .await
        .unwrap();
    // Two DefenderConnections: one with a Secret, one with workload identity.
    let second = spawn_sim(fast_sim_config()).await;
    create_connection(&admin, "default", "with-secret", &second)
        .await
        .unwrap();
    create_workload_identity_connection(&admin, "default", "with-identity", &second)
        .await
        .unwrap();
    let second_host = sim_host(&second);
    let controller = embedded_controller_with(
        client.clone(),
        &sim,
        FAST_LIMITS.parse().unwrap(),
        settings,
        Duration::from_millis(200),
        |run| {
            run.nodes.offboard_deleted_nodes = true;
            run.nodes.node_offboard_namespace = Some("default".into());
            run.ttl_sweep_interval = Duration::from_millis(200);
            run.connections = true;
            run.connection_allowed_hosts = vec![second_host];
            run.default_connection_namespaces = Some(
                defender_offboard::operator::tenants::DefaultNamespaces::parse("default").unwrap(),
            );
        },
    )
    .unwrap();
    let controller = tokio::spawn(controller);
    let nodes: Api<Node> = Api::all(admin.clone());
    with_timeout(30, async {
        loop {
            let node = nodes.get("win-node-1").await.unwrap();
            if node
                .metadata
                .finalizers
                .unwrap_or_default()
                .iter()
                .any(|f| f == NODE_FINALIZER)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    nodes
        .delete("win-node-1", &DeleteParams::default())
        .await
        .unwrap();
    let resources: Api<DeviceOffboard> = Api::namespaced(admin.clone(), "default");
    let spec = |machine: Option<&str>, device: Option<&str>| DeviceOffboardSpec {
        machine_id: machine.map(str::to_string),
        device_name: device.map(str::to_string),
        comment: "rbac".into(),
        // Deleted once final: the TTL sweep's delete is recorded.
        ttl_seconds_after_finished: machine.map(|_| 0),
        connection_ref: None,
        node: None,
    };
    resources
        .create(
            &PostParams::default(),
            &DeviceOffboard::new(
                "ok",
                spec(Some("0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"), None),
            ),
        )
        .await
        .unwrap();
    resources
        .create(
            &PostParams::default(),
            &DeviceOffboard::new("ambiguous", spec(None, Some("shared-kiosk-02.contoso.com"))),
        )
        .await
        .unwrap();
    with_timeout(30, async {
        loop {
            let list = resources.list(&ListParams::default()).await.unwrap();
            let named = |name: &str| {
                list.items
                    .iter()
                    .any(|d| d.metadata.name.as_deref() == Some(name))
            };
            if named("win-node-1")
                && !named("ok")
                && list.items.iter().all(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(|p| p.is_terminal())
                })
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Both connections signed in (their credential fetched, status written).
    let connections: Api<DefenderConnection> = Api::namespaced(admin.clone(), "default");
    with_timeout(30, async {
        loop {
            let list = connections.list(&ListParams::default()).await.unwrap();
            let ready = list.items.iter().filter(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            });
            if ready.count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    controller.abort();
    let _ = controller.await;
    // The uninstall hook's calls (win-node-2 still holds the finalizer).
    let options = {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            nodes: defender_offboard::cli::NodeArgs,
        }
        Cli::parse_from(["run"]).nodes.options("default")
    };
    let released = nodes::remove_finalizers(&client, &options, None, &Metrics::default())
        .await
        .unwrap();
    assert_eq!(released, 1);
    elector.release().await;

    let granted = chart_rules();
    let used = seen.lock().unwrap().clone();
    println!("calls the controller made: {used:?}");
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "the chart does not grant {missing:?}; add them to charts/defender-offboard/templates"
    );
    // And not one grant more than the calls: what is granted is used. These
    // are used on paths this run does not drive, each named:
    let elsewhere: BTreeSet<Permission> = [
        // `run --remove-node-finalizers --stop-deployment` (the uninstall
        // hook) scales the controller to zero first.
        ("apps", "deployments", "get"),
        ("apps", "deployments/scale", "patch"),
        // kube's event recorder patches an Event it publishes again (a series).
        ("events.k8s.io", "events", "patch"),
        // The record of a deleted Node read back by name when its create
        // answered 409 (made by an earlier leader).
        ("defender.offboard.dev", "deviceoffboards", "get"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    let unused: Vec<_> = granted
        .difference(&used)
        .filter(|p| !elsewhere.contains(*p))
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants {unused:?}, which the operator never calls; remove them from charts/defender-offboard/templates"
    );
    // Nodes are cluster-wide: not one verb more than node offboarding uses.
    let on_nodes = |set: &BTreeSet<Permission>| -> BTreeSet<String> {
        set.iter()
            .filter(|(group, resource, _)| group.is_empty() && resource == "nodes")
            .map(|(_, _, verb)| verb.clone())
            .collect()
    };
    assert_eq!(
        on_nodes(&granted),
        on_nodes(&used),
        "the chart's verbs on nodes must be exactly those node offboarding calls"
    );
    for never in [("", "secrets", "list"), ("", "secrets", "watch")] {
        let never = (
            never.0.to_string(),
            never.1.to_string(),
            never.2.to_string(),
        );
        assert!(
            !used.contains(&never),
            "the operator must only get Secrets by name, not {never:?}"
        );
        assert!(
            !granted.contains(&never),
            "the chart must not grant {never:?}"
        );
    }
    for expected in [
        ("defender.offboard.dev", "deviceoffboards", "watch"),
        ("defender.offboard.dev", "deviceoffboards/status", "patch"),
        // The final label (see `cache::final_label`).
        ("defender.offboard.dev", "deviceoffboards", "patch"),
        ("events.k8s.io", "events", "create"),
        ("coordination.k8s.io", "leases", "update"),
        ("", "nodes", "watch"),
        ("", "nodes", "patch"),
        // The deleted Node read in full (its identity), and looked for after its grace.
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("defender.offboard.dev", "deviceoffboards", "create"),
        ("defender.offboard.dev", "deviceoffboards", "delete"),
        ("defender.offboard.dev", "defenderconnections", "watch"),
        (
            "defender.offboard.dev",
            "defenderconnections/status",
            "patch",
        ),
        ("", "secrets", "get"),
        ("", "serviceaccounts", "get"),
        ("", "serviceaccounts/token", "create"),
    ] {
        let expected = (
            expected.0.to_string(),
            expected.1.to_string(),
            expected.2.to_string(),
        );
        assert!(
            used.contains(&expected),
            "the recording missed {expected:?}: the test no longer exercises the controller"
        );
    }
}
