//! Several MDE tenants from one operator: each `DefenderConnection` has its
//! own client, budget and poller, so a throttled or refused tenant never
//! holds another's resources; a connection is used only from its own
//! namespace. Every count is read at the simulators.

use crate::common::*;
use defender_offboard::crd::{ConnectionRef, DeviceOffboard, DeviceOffboardSpec, Phase};
use defender_offboard::devcluster::ApiHandle;
use defender_offboard::operator::tenants::DefaultNamespaces;
use defender_offboard::operator::tenants::resource::DefenderConnection;
use defender_offboard::playground::{
    create_connection, create_workload_identity_connection, embedded_controller_with, sim_host,
};
use defender_offboard::simulator::{RateLimit, SimConfig, SimHandle};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, PostParams};
use std::time::Duration;

/// The second tenant: its own tenant, app and secret, the same generated
/// machines as the first (same seed), so one list of ids serves both.
fn second_tenant(config: SimConfig) -> SimConfig {
    SimConfig {
        tenant_id: "tenant-b".into(),
        client_id: "app-b".into(),
        client_secret: "secret-b".into(),
        ..config
    }
}

/// A client of the second tenant (for listing its generated machines).
fn second_client(sim: &SimHandle) -> defender_offboard::mde::DefenderClient {
    let mut config =
        defender_offboard::playground::sim_client_config(sim, "1000/1s".parse().unwrap());
    config.identity = defender_offboard::mde::ClientIdentity::from_parts(
        Some("tenant-b".into()),
        Some("app-b".into()),
        Some("secret-b".into()),
        None,
        None,
    )
    .unwrap();
    defender_offboard::mde::DefenderClient::new(
        config,
        std::sync::Arc::new(defender_offboard::mde::NoObserver),
    )
    .unwrap()
}

struct Tenants {
    api: ApiHandle,
    /// TokenRequests (`POST …/serviceaccounts/NAME/token`) the operator made.
    token_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The tenant of the operator's own credentials.
    own: SimHandle,
    /// The tenant reached through DefenderConnections.
    second: SimHandle,
    client: kube::Client,
    controller: tokio::task::JoinHandle<()>,
}

impl Drop for Tenants {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

async fn start(own: SimConfig, second: SimConfig) -> Tenants {
    start_with(own, second, |_| {}).await
}

/// [`start`], with more of `run`'s arguments set by `configure`.
async fn start_with(
    own: SimConfig,
    second: SimConfig,
    configure: impl FnOnce(&mut defender_offboard::cli::RunArgs),
) -> Tenants {
    let own = spawn_sim(own).await;
    let second = spawn_sim(second).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    for namespace in ["team-a", "team-b"] {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }
    let allowed = sim_host(&second);
    // The operator's own client counts its TokenRequests, at the API.
    let token_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = token_requests.clone();
    let recorder =
        tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            if request.method() == http::Method::POST
                && request.uri().path().contains("/serviceaccounts/")
                && request.uri().path().ends_with("/token")
            {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            request
        });
    let operator_client =
        kube::client::ClientBuilder::try_from(kube::Config::new(api.url().parse().unwrap()))
            .unwrap()
            .with_layer(&recorder)
            .build();
    let controller = embedded_controller_with(
        operator_client,
        &own,
        FAST_LIMITS.parse().unwrap(),
        fast_settings(),
        Duration::from_millis(300),
        |run| {
            run.connections = true;
            run.connection_allowed_hosts = vec![allowed];
            // team-a may use the operator's own tenant; team-b may not.
            run.default_connection_namespaces = Some(DefaultNamespaces::Only(
                ["team-a".to_string()].into_iter().collect(),
            ));
            configure(run);
        },
    )
    .unwrap();
    Tenants {
        api,
        token_requests,
        own,
        second,
        client: client.clone(),
        controller: tokio::spawn(controller),
    }
}

fn resource(name: &str, machine_id: &str, connection: Option<&str>) -> DeviceOffboard {
    DeviceOffboard::new(
        name,
        DeviceOffboardSpec {
            machine_id: Some(machine_id.into()),
            device_name: None,
            comment: "tenant test".into(),
            ttl_seconds_after_finished: None,
            connection_ref: connection.map(|name| ConnectionRef { name: name.into() }),
            node: None,
        },
    )
}

async fn create(client: &kube::Client, namespace: &str, resource: DeviceOffboard) {
    Api::<DeviceOffboard>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &resource)
        .await
        .unwrap();
}

async fn list(client: &kube::Client, namespace: &str) -> Vec<DeviceOffboard> {
    Api::<DeviceOffboard>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

fn phase(resource: &DeviceOffboard) -> Phase {
    resource
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or_default()
}

fn error_code(resource: &DeviceOffboard) -> Option<String> {
    Some(resource.status.as_ref()?.last_error.as_ref()?.code.clone())
}

async fn connection_reason(client: &kube::Client, namespace: &str, name: &str) -> Option<String> {
    let connection = Api::<DefenderConnection>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .ok()?;
    let status = connection.status?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(ready.reason.clone())
}

async fn wait_for_connection(client: &kube::Client, namespace: &str, name: &str, reason: &str) {
    with_timeout(30, async {
        while connection_reason(client, namespace, name).await.as_deref() != Some(reason) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Tenant A (the operator's own credentials) is throttled hard: MDE allows
/// it 2 calls a second. Tenant B's resources still finish, each with one
/// POST and no 429, while A's are mostly still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_tenant_does_not_slow_another() {
    let throttled = SimConfig {
        rate_limits: vec![RateLimit {
            calls: 2,
            window: Duration::from_secs(60),
        }],
        ..fast_sim_config()
    };
    let env = start(throttled, second_tenant(fast_sim_config())).await;
    create_connection(&env.client, "team-b", "tenant-b", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "tenant-b", "SignedIn").await;
    let machines = windows_machines(&second_client(&env.second), 20).await;
    for (i, machine) in machines.iter().enumerate() {
        create(
            &env.client,
            "team-a",
            resource(&format!("a-{i}"), machine, None),
        )
        .await;
        create(
            &env.client,
            "team-b",
            resource(&format!("b-{i}"), machine, Some("tenant-b")),
        )
        .await;
    }
    let a_final = with_timeout(60, async {
        loop {
            let b = list(&env.client, "team-b").await;
            if b.len() == 20 && b.iter().all(|r| phase(r).is_terminal()) {
                let a = list(&env.client, "team-a").await;
                break a.iter().filter(|r| phase(r).is_terminal()).count();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let b = env.second.stats();
    assert_eq!(
        b.offboard_requests_by_key.len(),
        20,
        "{:?}",
        b.offboard_requests_by_key
    );
    assert!(
        b.offboard_requests_by_key.values().all(|n| *n == 1),
        "one POST per resource: {:?}",
        b.offboard_requests_by_key
    );
    assert_eq!(b.throttled, 0, "tenant B never saw a 429");
    let a = env.own.stats();
    assert!(a.throttled > 0, "tenant A was throttled: {a:?}");
    assert!(
        a_final < 10,
        "when B was done, A (2 calls a second) had only {a_final} of 20 final"
    );
    assert!(
        a.offboard_requests_by_key.values().all(|n| *n == 1),
        "A's throttling never doubled a POST: {:?}",
        a.offboard_requests_by_key
    );
}

/// Tenant A's MDE hangs: every call takes a minute, longer than the
/// client's 10 s timeout, and each first send reads its machine first (no
/// adopt index). Twenty of A's resources are applied first, more
/// than the slots of a connection, so A's calls hold every slot it has. B's
/// resources are still sent at once: each is at B's MDE while none of A's
/// calls has come back, timed out or answered (no A resource has anything
/// in its status but the wait). With one pool for every tenant, B's
/// reconciles waited until A's calls timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tenant_holds_no_worker_another_needs() {
    let mut hanging = fast_sim_config();
    // Simulated time: a minute of wall time at the test's time scale.
    hanging.faults.latency = Duration::from_secs(60) * hanging.time_scale as u32;
    // Without the adopt index every first send reads its machine's actions:
    // one hanging call per resource, each in a worker.
    let env = start_with(hanging, second_tenant(fast_sim_config()), |run| {
        run.adopt_window = Duration::ZERO;
    })
    .await;
    create_connection(&env.client, "team-b", "tenant-b", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "tenant-b", "SignedIn").await;
    let machines = windows_machines(&second_client(&env.second), 25).await;
    for (i, machine) in machines[..20].iter().enumerate() {
        create(
            &env.client,
            "team-a",
            resource(&format!("a-{i}"), machine, None),
        )
        .await;
    }
    // A's reconciles are under way (they wait on A's MDE).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, machine) in machines[20..].iter().enumerate() {
        create(
            &env.client,
            "team-b",
            resource(&format!("b-{i}"), machine, Some("tenant-b")),
        )
        .await;
    }
    with_timeout(60, async {
        while env.second.stats().offboard_requests_by_key.len() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let a = list(&env.client, "team-a").await;
    let answered: Vec<_> = a
        .iter()
        .filter(|r| {
            r.status.as_ref().is_some_and(|s| {
                s.last_error.is_some()
                    || s.machine_action_id.is_some()
                    || s.phase.is_some_and(Phase::is_terminal)
            })
        })
        .map(|r| r.metadata.name.clone().unwrap_or_default())
        .collect();
    assert!(
        answered.is_empty(),
        "B was sent only after A's calls came back: {answered:?}"
    );
    let b = env.second.stats();
    assert!(
        b.offboard_requests_by_key.values().all(|n| *n == 1),
        "one POST per resource: {:?}",
        b.offboard_requests_by_key
    );
    assert_eq!(
        env.own
            .stats()
            .offboard_requests_by_key
            .values()
            .sum::<u64>(),
        0,
        "no POST of A has been answered"
    );
}

/// A connection whose secret was revoked (wrong value) is `AuthenticationFailed`;
/// its resources wait with `ConnectionNotReady` and nothing is sent to its
/// tenant, while the other tenant's resources finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_secret_holds_only_its_own_tenant() {
    let env = start(fast_sim_config(), second_tenant(fast_sim_config())).await;
    // Revoked: the Secret holds what the tenant no longer accepts (created
    // first, so the connection's own Secret is not written over it).
    let revoked: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tenant-b", "namespace": "team-b"},
        "stringData": {"client-secret": "revoked"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), "team-b")
        .create(&PostParams::default(), &revoked)
        .await
        .unwrap();
    create_connection(&env.client, "team-b", "tenant-b", &env.second)
        .await
        .unwrap();
    let machines = windows_machines(&client(&env.own, "1000/1s"), 6).await;
    for (i, machine) in machines.iter().take(3).enumerate() {
        create(
            &env.client,
            "team-a",
            resource(&format!("a-{i}"), machine, None),
        )
        .await;
    }
    for (i, machine) in machines.iter().skip(3).enumerate() {
        create(
            &env.client,
            "team-b",
            resource(&format!("b-{i}"), machine, Some("tenant-b")),
        )
        .await;
    }
    wait_for_connection(&env.client, "team-b", "tenant-b", "AuthenticationFailed").await;
    with_timeout(30, async {
        loop {
            let a = list(&env.client, "team-a").await;
            let b = list(&env.client, "team-b").await;
            let a_done = a.len() == 3 && a.iter().all(|r| phase(r).is_terminal());
            let b_waiting = b.len() == 3
                && b.iter()
                    .all(|r| error_code(r).as_deref() == Some("ConnectionNotReady"));
            if a_done && b_waiting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let b = list(&env.client, "team-b").await;
    assert!(
        b.iter().all(|r| phase(r) == Phase::Pending),
        "nothing final, nothing lost"
    );
    let message = &b[0]
        .status
        .as_ref()
        .unwrap()
        .last_error
        .as_ref()
        .unwrap()
        .message;
    assert!(
        message.contains("tenant-b") && message.contains("AuthenticationFailed"),
        "{message}"
    );
    assert!(
        !message.contains("secret-b") && !message.contains("revoked"),
        "{message}"
    );
    assert!(
        env.second.stats().offboard_requests_by_key.is_empty(),
        "nothing sent to B"
    );
}

/// `connectionRef` names a connection of the resource's own namespace: one
/// that exists only in another namespace is refused with the reason, and
/// nothing is sent; the same name from its own namespace works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_of_another_namespace_is_refused() {
    let env = start(fast_sim_config(), second_tenant(fast_sim_config())).await;
    create_connection(&env.client, "team-a", "shared", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-a", "shared", "SignedIn").await;
    let machines = windows_machines(&client(&env.own, "1000/1s"), 2).await;
    create(
        &env.client,
        "team-b",
        resource("borrower", &machines[0], Some("shared")),
    )
    .await;
    create(
        &env.client,
        "team-a",
        resource("owner", &machines[1], Some("shared")),
    )
    .await;
    let borrower = with_timeout(30, async {
        loop {
            let owner = list(&env.client, "team-a").await;
            let borrower = list(&env.client, "team-b").await;
            if owner.iter().all(|r| phase(r).is_terminal())
                && error_code(&borrower[0]).as_deref() == Some("ConnectionNotFound")
            {
                break borrower.into_iter().next().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let status = borrower.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Pending));
    let message = status.last_error.unwrap().message;
    assert!(
        message.contains("\"team-b\"") && message.contains("own namespace"),
        "{message}"
    );
    let sent = env.second.stats().offboard_requests_by_machine;
    assert_eq!(
        sent.get(&machines[0]),
        None,
        "nothing sent for the borrower: {sent:?}"
    );
    assert_eq!(
        sent.get(&machines[1]),
        Some(&1),
        "the owner's one POST: {sent:?}"
    );
    assert!(
        env.own.stats().offboard_requests_by_key.is_empty(),
        "nor through the operator's own tenant"
    );
}

/// The operator's own credentials serve only the namespaces listed: a
/// resource without a connectionRef in another namespace sends nothing to
/// the operator's tenant (counted at its simulator), and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_outside_the_default_list_cannot_use_the_operators_tenant() {
    let env = start(fast_sim_config(), second_tenant(fast_sim_config())).await;
    let machines = windows_machines(&client(&env.own, "1000/1s"), 2).await;
    create(
        &env.client,
        "team-b",
        resource("outsider", &machines[0], None),
    )
    .await;
    create(
        &env.client,
        "team-a",
        resource("insider", &machines[1], None),
    )
    .await;
    let outsider = with_timeout(30, async {
        loop {
            let insider = list(&env.client, "team-a").await;
            let outsider = list(&env.client, "team-b").await;
            if insider.iter().all(|r| phase(r).is_terminal())
                && error_code(&outsider[0]).as_deref() == Some("DefaultConnectionNotAllowed")
            {
                break outsider.into_iter().next().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let status = outsider.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Pending));
    let message = status.last_error.unwrap().message;
    assert!(
        message.contains("\"team-b\"") && message.contains("--default-connection-namespaces"),
        "{message}"
    );
    let sent = env.own.stats().offboard_requests_by_machine;
    assert_eq!(
        sent.get(&machines[0]),
        None,
        "nothing sent for team-b: {sent:?}"
    );
    assert_eq!(
        sent.get(&machines[1]),
        Some(&1),
        "team-a's one POST: {sent:?}"
    );
    assert!(
        env.second.stats().offboard_requests_by_key.is_empty(),
        "nor through the other tenant"
    );
}

/// An app that may offboard but not read (no `Machine.Read.All` nor
/// `Machine.ReadWrite.All`) could neither resolve a name nor prove what it
/// sent: its connection is not Ready, and says which permission to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_cannot_read_is_not_ready_and_the_reason_names_the_read_permission() {
    let offboard_only = SimConfig {
        roles: vec!["Machine.Offboard".into()],
        ..second_tenant(fast_sim_config())
    };
    let env = start(fast_sim_config(), offboard_only).await;
    create_connection(&env.client, "team-a", "blind", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-a", "blind", "PermissionDenied").await;
    let connection = Api::<DefenderConnection>::namespaced(env.client.clone(), "team-a")
        .get("blind")
        .await
        .unwrap();
    let ready = &connection.status.unwrap().conditions[0];
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("Machine.Read.All")
            && ready.message.contains("Machine.ReadWrite.All")
            && ready.message.contains("grants: Machine.Offboard"),
        "{}",
        ready.message
    );
}

/// Signed in, but the app lacks Machine.Offboard: `PermissionDenied`, named.
/// Workload identity: the operator requests the ServiceAccount's token; a
/// missing ServiceAccount is `CredentialNotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_what_to_fix() {
    let read_only = SimConfig {
        roles: vec!["Machine.Read.All".into()],
        ..second_tenant(fast_sim_config())
    };
    let env = start(fast_sim_config(), read_only).await;
    create_connection(&env.client, "team-a", "read-only", &env.second)
        .await
        .unwrap();
    create_workload_identity_connection(&env.client, "team-b", "federated", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-a", "read-only", "PermissionDenied").await;
    let connection = Api::<DefenderConnection>::namespaced(env.client.clone(), "team-a")
        .get("read-only")
        .await
        .unwrap();
    let ready = &connection.status.unwrap().conditions[0];
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("Machine.Offboard"),
        "{}",
        ready.message
    );
    // Workload identity signs in with the ServiceAccount's token, and is then
    // refused for the same missing permission: the token request worked.
    wait_for_connection(&env.client, "team-b", "federated", "PermissionDenied").await;
    let mut missing = Api::<DefenderConnection>::namespaced(env.client.clone(), "team-b")
        .get("federated")
        .await
        .unwrap();
    missing.metadata = kube::api::ObjectMeta {
        name: Some("no-account".into()),
        namespace: Some("team-b".into()),
        ..Default::default()
    };
    missing.status = None;
    missing
        .spec
        .credential
        .workload_identity
        .as_mut()
        .unwrap()
        .service_account_name = "nobody".into();
    Api::<DefenderConnection>::namespaced(env.client.clone(), "team-b")
        .create(&PostParams::default(), &missing)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "no-account", "CredentialNotFound").await;
    let tokens = env.second.stats().tokens_issued;
    assert!(tokens >= 2, "both signed in: {tokens}");
}

/// A connection may use a ServiceAccount only when its owner opted in (the
/// annotation naming the connection): otherwise no token is minted for it,
/// counted at the API, and the connection says how to opt in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_that_did_not_opt_in_gets_no_token_minted() {
    use defender_offboard::operator::tenants::controller::TOKEN_OPT_IN_ANNOTATION;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let env = start(fast_sim_config(), second_tenant(fast_sim_config())).await;
    // The namespace's deploy bot, federated with some Entra app, never meant
    // for offboarding: a connection author names it.
    let bot: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "deploy-bot", "namespace": "team-b"},
    }))
    .unwrap();
    let accounts = Api::<ServiceAccount>::namespaced(env.client.clone(), "team-b");
    accounts.create(&PostParams::default(), &bot).await.unwrap();
    // Opted in for another connection only: still not this one.
    create_workload_identity_connection(&env.client, "team-b", "other", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "other", "SignedIn").await;
    let before = env.token_requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(before >= 1, "the opted-in connection got its token");
    let mut borrowing = Api::<DefenderConnection>::namespaced(env.client.clone(), "team-b")
        .get("other")
        .await
        .unwrap();
    borrowing.metadata = kube::api::ObjectMeta {
        name: Some("borrowing".into()),
        namespace: Some("team-b".into()),
        ..Default::default()
    };
    borrowing.status = None;
    borrowing
        .spec
        .credential
        .workload_identity
        .as_mut()
        .unwrap()
        .service_account_name = "deploy-bot".into();
    let connections = Api::<DefenderConnection>::namespaced(env.client.clone(), "team-b");
    connections
        .create(&PostParams::default(), &borrowing)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "borrowing", "CredentialNotFound").await;
    let message = connections
        .get("borrowing")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions[0]
        .message
        .clone();
    assert!(
        message.contains(TOKEN_OPT_IN_ANNOTATION) && message.contains("no token was requested"),
        "{message}"
    );
    // The borrowed account's token was never asked for (`other` keeps the
    // token it signed in with: no new request either).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = env.token_requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after, before, "no TokenRequest for deploy-bot");
}

/// `kubectl get defenderconnections` shows the tenant and whether it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_tenant_and_readiness() {
    let env = start(fast_sim_config(), second_tenant(fast_sim_config())).await;
    create_connection(&env.client, "team-b", "tenant-b", &env.second)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "tenant-b", "SignedIn").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    env.api.write_kubeconfig(&kubeconfig).unwrap();
    let output = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "defenderconnections", "-A"])
        .output()
        .await
        .expect("kubectl on the PATH");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "NAME",
            "TENANT",
            "READY",
            "REASON",
            "OFFBOARDS",
            "LEFT",
            "AGE"
        ]
    );
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["team-b", "tenant-b", "tenant-b", "True", "SignedIn"]
    );
    assert!(row[5].parse::<u32>().is_ok(), "offboards left: {row:?}");
}

/// Certificate credentials: the Secret's key holds the certificate and its
/// private key; the operator signs an assertion with it and offboards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_connection_offboards() {
    let pem = include_str!("../../crates/mde-client/testdata/test-certificate.pem");
    // The app's certificate is registered in the second tenant (its public part
    // is all Entra keeps; the simulator reads the certificate from the PEM).
    let second = SimConfig {
        client_certificates: vec![pem.to_string()],
        ..second_tenant(fast_sim_config())
    };
    let env = start(fast_sim_config(), second).await;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app-b-certificate", "namespace": "team-b"},
        "stringData": {"tls.pem": pem},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), "team-b")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let connection: DefenderConnection = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "by-certificate", "namespace": "team-b"},
        "spec": {
            "tenantId": "tenant-b",
            "clientId": "app-b",
            "apiUrl": env.second.base_url(),
            "loginUrl": env.second.base_url(),
            "credential": {"certificate": {"name": "app-b-certificate", "key": "tls.pem"}},
        },
    }))
    .unwrap();
    Api::<DefenderConnection>::namespaced(env.client.clone(), "team-b")
        .create(&PostParams::default(), &connection)
        .await
        .unwrap();
    wait_for_connection(&env.client, "team-b", "by-certificate", "SignedIn").await;
    let machine = &windows_machines(&second_client(&env.second), 1).await[0];
    create(
        &env.client,
        "team-b",
        resource("cert", machine, Some("by-certificate")),
    )
    .await;
    with_timeout(30, async {
        while !list(&env.client, "team-b")
            .await
            .iter()
            .all(|r| phase(r).is_terminal())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let sent = env.second.stats().offboard_requests_by_machine;
    assert_eq!(sent.get(machine.as_str()), Some(&1), "{sent:?}");
}

/// `run --connections` on a cluster without the DefenderConnection CRD stops
/// at start with the command that installs it.
#[tokio::test]
async fn a_missing_connection_crd_is_named_at_start() {
    use defender_offboard::operator::runtime::{
        check_connection_crd_installed, check_crd_installed,
    };
    use kube::CustomResourceExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = defender_offboard::devcluster::ApiServerConfig {
        crds: vec![DeviceOffboard::crd()],
        ..Default::default()
    };
    let api = defender_offboard::devcluster::spawn_api(config, listener)
        .await
        .unwrap();
    let client = api.client().await.unwrap();
    check_crd_installed(&client, None).await.unwrap();
    let error = check_connection_crd_installed(&client, Some("team-a"))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        "--connections: the DefenderConnection CRD is not installed: kubectl apply -f crds/defenderconnections.defender.offboard.dev.yaml"
    );
}

/// Whoever may create connections but not read Secrets learns nothing of a
/// Secret's content by pointing a connection at it: for every malformed
/// credential shape, no line of it appears in the connection's status, a
/// resource's status or any Event of the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_of_a_malformed_credential_reaches_status_or_events() {
    let env = start(fast_sim_config(), second_tenant(fast_sim_config())).await;
    // Key material as a person would find it in other Secrets: lines long
    // enough to tell apart from any message.
    let ec_with_blank_line = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkQ9c3tAfLq8eXr1SUPERSECRETLINEONEz0Jw6yq4Kp0oAoGCCqGSM49\n\nAwEHoUQDQgAEsecretlinetwoK7n3vQ8mX2bYHc4pZt1uW6aLr0eJdF9sN5qTgVhY\n-----END EC PRIVATE KEY-----\n";
    let ed25519 = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEd25519SECRETLINEw1Zr9Qk3mT7pXa2Lc8VbN0Hs\n-----END PRIVATE KEY-----\n";
    let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJTRUNSRVRUT0tFTkxJTkUifQ.c2lnbmF0dXJlU0VDUkVU";
    let shapes: [(&str, Vec<u8>); 4] = [
        ("ec-blank-line", ec_with_blank_line.as_bytes().to_vec()),
        ("ed25519", ed25519.as_bytes().to_vec()),
        ("binary", (0u8..=255).cycle().take(600).collect()),
        ("token-file", token.as_bytes().to_vec()),
    ];
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), "team-b");
    let connections: Api<DefenderConnection> = Api::namespaced(env.client.clone(), "team-b");
    for (name, bytes) in &shapes {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some("team-b".into()),
                ..Default::default()
            },
            data: Some(
                [(
                    "tls.pem".to_string(),
                    k8s_openapi::ByteString(bytes.clone()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let connection: DefenderConnection = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "team-b"},
            "spec": {
                "tenantId": "tenant-b",
                "clientId": "app-b",
                "apiUrl": env.second.base_url(),
                "loginUrl": env.second.base_url(),
                "credential": {"certificate": {"name": name, "key": "tls.pem"}},
            },
        }))
        .unwrap();
        connections
            .create(&PostParams::default(), &connection)
            .await
            .unwrap();
        create(
            &env.client,
            "team-b",
            resource(&format!("via-{name}"), &"a".repeat(40), Some(name)),
        )
        .await;
    }
    // Every connection says it cannot sign in, and every resource says why it waits.
    with_timeout(30, async {
        loop {
            let mut answered = 0;
            for (name, _) in &shapes {
                let reason = connection_reason(&env.client, "team-b", name).await;
                if reason.is_some_and(|r| r != "SignedIn" && r != "Checking") {
                    answered += 1;
                }
            }
            let waiting = list(&env.client, "team-b")
                .await
                .iter()
                .filter(|r| r.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
                .count();
            if answered == shapes.len() && waiting == shapes.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut seen = String::new();
    for connection in connections.list(&ListParams::default()).await.unwrap() {
        seen.push_str(&serde_json::to_string(&connection.status).unwrap());
    }
    for resource in list(&env.client, "team-b").await {
        seen.push_str(&serde_json::to_string(&resource.status).unwrap());
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), "team-b");
    for event in events.list(&ListParams::default()).await.unwrap() {
        seen.push_str(&serde_json::to_string(&event).unwrap());
    }
    let core_events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(env.client.clone(), "team-b");
    for event in core_events.list(&ListParams::default()).await.unwrap() {
        seen.push_str(&serde_json::to_string(&event).unwrap());
    }
    assert!(
        seen.contains("CredentialNotFound"),
        "the messages say what is wrong: {seen}"
    );
    for (name, bytes) in &shapes {
        let text = String::from_utf8_lossy(bytes);
        for piece in text
            .split(['\n', '.'])
            .filter(|p| p.len() >= 12 && !p.starts_with("-----"))
        {
            assert!(
                !seen.contains(piece),
                "{name}: {piece:?} appeared in {seen}"
            );
        }
    }
    assert!(
        env.second.stats().offboard_requests_by_machine.is_empty(),
        "nothing sent"
    );
}
