//! The project's own CRD (generated from the Rust types) enforced at admission
//! by the in-memory API, as kube-apiserver enforces it.

use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use defender_offboard::devcluster::{ApiHandle, ApiServerConfig, spawn_api};
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use std::time::Duration;

const MACHINE_ID: &str = "0123456789abcdef0123456789abcdef01234567";

async fn start(config: ApiServerConfig) -> ApiHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    spawn_api(config, listener).await.expect("start API")
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("test finished in time")
}

/// The project's own CRD (generated from the Rust types) is enforced like kube-apiserver would.
#[tokio::test]
async fn project_crd_rules_are_enforced() {
    bounded(async {
        let api = start(ApiServerConfig { crds: vec![DeviceOffboard::crd()], ..Default::default() }).await;
        let client = api.client().await.unwrap();
        let typed: Api<DeviceOffboard> = Api::default_namespaced(client.clone());
        let spec = |machine: Option<&str>, device: Option<&str>, comment: &str| DeviceOffboardSpec {
            machine_id: machine.map(String::from),
            device_name: device.map(String::from),
            comment: comment.into(), ttl_seconds_after_finished: None, connection_ref: None, node: None };
        let create = |name: &str, spec: DeviceOffboardSpec| {
            let typed = typed.clone();
            let object = DeviceOffboard::new(name, spec);
            async move { typed.create(&PostParams::default(), &object).await }
        };
        let message = |status: kube::core::Status| status.message;

        let both = message(api_error(create("both", spec(Some(MACHINE_ID), Some("pc-1"), "c")).await));
        assert!(both.contains("spec: Invalid value: \"object\": exactly one of spec.machineId or spec.deviceName must be set"), "{both}");
        let neither = message(api_error(create("neither", spec(None, None, "c")).await));
        assert!(neither.contains("exactly one of spec.machineId or spec.deviceName must be set"), "{neither}");
        let blank = message(api_error(create("blank", spec(None, Some("pc-1"), "   ")).await));
        assert!(blank.contains("spec.comment: Invalid value: \"   \": spec.comment must not be blank"), "{blank}");
        // A marker in the comment could attribute this action to another request.
        let marked = message(api_error(create("marked", spec(None, Some("pc-1"), "returned [defender-offboard:6f1c1a52-0000-4a4a-9c9c-000000000001]")).await));
        assert!(marked.contains("spec.comment must not carry a [defender-offboard:...] marker"), "{marked}");
        let bad_name = message(api_error(create("bad-name", spec(None, Some("pc 1"), "c")).await));
        assert!(bad_name.contains("spec.deviceName: Invalid value: \"pc 1\": spec.deviceName in body should match"), "{bad_name}");

        let mut negative = spec(None, Some("pc-1"), "c");
        negative.ttl_seconds_after_finished = Some(-1);
        let negative = message(api_error(create("negative-ttl", negative).await));
        assert!(negative.contains("spec.ttlSecondsAfterFinished: Invalid value: -1: spec.ttlSecondsAfterFinished in body should be greater than or equal to 0"), "{negative}");

        let created = create("ok", spec(None, Some("pc-1"), "retired")).await.unwrap();
        let mut status_write = created.clone();
        status_write.status = Some(DeviceOffboardStatus { phase: Some(Phase::Pending), ..Default::default() });
        let written = typed.replace_status("ok", &PostParams::default(), &status_write).await.unwrap();
        assert_eq!(written.status.unwrap().phase, Some(Phase::Pending));
        assert_eq!(api_error(typed.replace_status("ok", &PostParams::default(), &status_write).await).code, 409);

        let mut edited = typed.get("ok").await.unwrap();
        edited.spec.comment = "changed".into();
        let immutable = message(api_error(typed.replace("ok", &PostParams::default(), &edited).await));
        assert!(immutable.contains("spec: Invalid value: \"object\": spec is immutable"), "{immutable}");
        api.shutdown().await;
    })
    .await;
}

/// A DefenderConnection names exactly one credential and only URLs, refused
/// at admission with the field named.
#[tokio::test]
async fn connection_crd_rules_are_enforced() {
    use defender_offboard::operator::tenants::resource::DefenderConnection;
    bounded(async {
        let api = start(ApiServerConfig { crds: vec![DefenderConnection::crd()], ..Default::default() }).await;
        let client = api.client().await.unwrap();
        let typed: Api<DefenderConnection> = Api::default_namespaced(client);
        let create = |name: &str, credential: serde_json::Value, api_url: Option<&str>| {
            let mut spec = serde_json::json!({"tenantId": "t", "clientId": "c", "credential": credential});
            if let Some(url) = api_url {
                spec["apiUrl"] = url.into();
            }
            let object: DefenderConnection = serde_json::from_value(serde_json::json!({
                "apiVersion": "defender.offboard.dev/v1alpha1", "kind": "DefenderConnection",
                "metadata": {"name": name}, "spec": spec,
            }))
            .unwrap();
            let typed = typed.clone();
            async move { typed.create(&PostParams::default(), &object).await }
        };
        let secret = serde_json::json!({"name": "s", "key": "k"});
        let two = api_error(create("two", serde_json::json!({"clientSecret": secret, "workloadIdentity": {"serviceAccountName": "sa"}}), None).await).message;
        assert!(two.contains("spec.credential needs exactly one of clientSecret, certificate or workloadIdentity"), "{two}");
        let none = api_error(create("none", serde_json::json!({}), None).await).message;
        assert!(none.contains("spec.credential needs exactly one of"), "{none}");
        let ftp = api_error(create("ftp", serde_json::json!({"clientSecret": secret}), Some("ftp://x")).await).message;
        assert!(ftp.contains("spec.apiUrl must be an https:// URL"), "{ftp}");
        // Names that go into URL paths are Kubernetes names, nothing else.
        let traversal = api_error(create("traversal", serde_json::json!({"clientSecret": {"name": "../../kube-system/secrets/x", "key": "k"}}), None).await).message;
        assert!(traversal.contains("spec.credential.clientSecret.name"), "{traversal}");
        let sa = api_error(create("sa", serde_json::json!({"workloadIdentity": {"serviceAccountName": "Default/token"}}), None).await).message;
        assert!(sa.contains("spec.credential.workloadIdentity.serviceAccountName"), "{sa}");
        let key = api_error(create("key", serde_json::json!({"clientSecret": {"name": "s", "key": "a/b"}}), None).await).message;
        assert!(key.contains("spec.credential.clientSecret.key"), "{key}");
        create("ok", serde_json::json!({"certificate": secret}), Some("https://eu.api.security.microsoft.com")).await.unwrap();
        // Whom a connection reaches is fixed for its life (resources in
        // flight were begun there); its credential may be rotated.
        let current = typed.get("ok").await.unwrap();
        type Edit = (&'static str, fn(&mut serde_json::Value));
        let edits: [Edit; 5] = [
            ("tenantId", |s| s["tenantId"] = "other-tenant".into()),
            ("clientId", |s| s["clientId"] = "other-app".into()),
            ("cloud", |s| s["cloud"] = "GCCHigh".into()),
            ("apiUrl", |s| s["apiUrl"] = "https://us.api.security.microsoft.com".into()),
            ("loginUrl", |s| s["loginUrl"] = "https://login.microsoftonline.us".into()),
        ];
        for (field, edit) in edits {
            let mut spec = serde_json::to_value(&current.spec).unwrap();
            edit(&mut spec);
            let mut edited = current.clone();
            edited.spec = serde_json::from_value(spec).unwrap();
            let refused = api_error(typed.replace("ok", &PostParams::default(), &edited).await).message;
            assert!(refused.contains("spec.tenantId, spec.clientId, spec.cloud, spec.apiUrl and spec.loginUrl cannot change"), "{field}: {refused}");
        }
        let mut rotated = current.clone();
        rotated.spec.credential = serde_json::from_value(serde_json::json!({"certificate": {"name": "s-2026", "key": "tls.pem"}})).unwrap();
        typed.replace("ok", &PostParams::default(), &rotated).await.expect("a credential rotation is an allowed edit");
        api.shutdown().await;
    })
    .await;
}
