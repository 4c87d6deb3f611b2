//! End-to-end tests of the in-memory Kubernetes API through kube-rs and the real kubectl.

use devcluster::{ApiHandle, ApiServerConfig, WatchHistory, spawn_api};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, controller::Action, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const GROUP: &str = "defender.offboard.dev";
const VERSION: &str = "v1alpha1";
const MACHINE_ID: &str = "0123456789abcdef0123456789abcdef01234567";
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A CRD mirroring the project's DeviceOffboard contract.
const DOFF_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: deviceoffboards.defender.offboard.dev
spec:
  group: defender.offboard.dev
  scope: Namespaced
  names:
    kind: DeviceOffboard
    plural: deviceoffboards
    singular: deviceoffboard
    listKind: DeviceOffboardList
    shortNames: [doff, offboard]
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - {name: Machine, type: string, jsonPath: .status.machineId}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Action, type: string, jsonPath: .status.machineActionId}
    - {name: Status, type: string, jsonPath: .status.actionStatus}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          spec:
            type: object
            required: [comment]
            x-kubernetes-validations:
            - rule: self == oldSelf
              message: spec is immutable
            oneOf:
            - required: [machineId]
            - required: [deviceName]
            properties:
              machineId: {type: string, pattern: '^[0-9a-f]{40}$'}
              deviceName: {type: string}
              comment: {type: string, minLength: 1, maxLength: 1000}
          status:
            type: object
            properties:
              phase: {type: string, enum: [Pending, Submitting, InProgress, Succeeded, Failed]}
              machineId: {type: string}
              machineActionId: {type: string}
              actionStatus: {type: string}
              observedGeneration: {type: integer}
              conditions:
                type: array
                items:
                  type: object
                  required: [type, status]
                  properties:
                    type: {type: string}
                    status: {type: string}
                    reason: {type: string}
                    message: {type: string}
                    lastTransitionTime: {type: string}
                    observedGeneration: {type: integer}
"#;

fn doff_crd() -> CustomResourceDefinition {
    serde_yaml_ng::from_str(DOFF_CRD).expect("valid CRD")
}

/// A cluster-scoped kind with a mutable spec, for generation rules.
fn widget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.dev"},
        "spec": {
            "group": "example.dev", "scope": "Cluster",
            "names": {"kind": "Widget", "plural": "widgets"},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]
        }
    }))
    .expect("valid CRD")
}

fn doff_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "DeviceOffboard"),
        "deviceoffboards",
    )
}

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.dev", "v1", "Widget"),
        "widgets",
    )
}

async fn start(config: ApiServerConfig) -> ApiHandle {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    spawn_api(config, listener).await.expect("start API")
}

async fn start_default() -> (ApiHandle, Client) {
    let api = start(ApiServerConfig {
        crds: vec![doff_crd(), widget_crd()],
        ..Default::default()
    })
    .await;
    let client = api.client().await.expect("client");
    (api, client)
}

fn doffs(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), "default", &doff_resource())
}

fn doff(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("valid object")
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv(object: &impl Resource) -> u64 {
    object
        .meta()
        .resource_version
        .as_deref()
        .expect("resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, future)
        .await
        .expect("test finished in time")
}

#[tokio::test]
async fn crud_through_kube_client() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        let created = doffs
            .create(
                &PostParams::default(),
                &doff(
                    "pc-1",
                    json!({"deviceName": "pc-1.corp", "comment": "retired"}),
                ),
            )
            .await
            .unwrap();
        assert!(created.uid().is_some());
        assert!(created.creation_timestamp().is_some());
        assert_eq!(created.meta().generation, Some(1));
        assert_eq!(created.namespace().as_deref(), Some("default"));

        let fetched = doffs.get("pc-1").await.unwrap();
        assert_eq!(fetched.data["spec"]["deviceName"], "pc-1.corp");
        assert_eq!(fetched.resource_version(), created.resource_version());

        let duplicate = api_error(
            doffs
                .create(
                    &PostParams::default(),
                    &doff("pc-1", json!({"deviceName": "x", "comment": "c"})),
                )
                .await,
        );
        assert_eq!(
            (duplicate.code, duplicate.reason.as_str()),
            (409, "AlreadyExists")
        );
        assert_eq!(
            duplicate.message,
            "deviceoffboards.defender.offboard.dev \"pc-1\" already exists"
        );

        let mut generated = doff("", json!({"machineId": MACHINE_ID, "comment": "c"}));
        generated.metadata.name = None;
        generated.metadata.generate_name = Some("gen-".into());
        let generated = doffs
            .create(&PostParams::default(), &generated)
            .await
            .unwrap();
        assert!(
            generated.name_any().starts_with("gen-") && generated.name_any().len() == 9,
            "{}",
            generated.name_any()
        );

        let mut labelled = fetched.clone();
        labelled.labels_mut().insert("team".into(), "it".into());
        let replaced = doffs
            .replace("pc-1", &PostParams::default(), &labelled)
            .await
            .unwrap();
        assert_eq!(
            replaced.labels().get("team").map(String::as_str),
            Some("it")
        );
        assert!(rv(&replaced) > rv(&fetched));

        assert_eq!(
            doffs
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            2
        );
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &doff_resource());
        assert_eq!(
            all.list(&ListParams::default()).await.unwrap().items.len(),
            2
        );
        // Metadata-only requests (kube-rs metadata_watcher) get PartialObjectMetadata.
        let metadata = doffs.list_metadata(&ListParams::default()).await.unwrap();
        assert_eq!(metadata.items.len(), 2);
        assert_eq!(
            metadata.items[0].types.as_ref().map(|t| t.kind.as_str()),
            Some("PartialObjectMetadata")
        );
        assert_eq!(
            doffs.get_metadata("pc-1").await.unwrap().metadata.uid,
            created.metadata.uid
        );

        doffs
            .delete("pc-1", &DeleteParams::default())
            .await
            .unwrap();
        let missing = api_error(doffs.get("pc-1").await);
        assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
        assert_eq!(
            missing.message,
            "deviceoffboards.defender.offboard.dev \"pc-1\" not found"
        );

        let elsewhere: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "nowhere", &doff_resource());
        let no_namespace = api_error(
            elsewhere
                .create(
                    &PostParams::default(),
                    &doff("x", json!({"deviceName": "x", "comment": "c"})),
                )
                .await,
        );
        assert_eq!(no_namespace.message, "namespaces \"nowhere\" not found");

        let namespaces: Api<Namespace> = Api::all(client.clone());
        let names: Vec<String> = namespaces
            .list(&ListParams::default())
            .await
            .unwrap()
            .iter()
            .map(|n| n.name_any())
            .collect();
        assert!(
            names.contains(&"default".to_string()) && names.contains(&"kube-system".to_string())
        );
        assert!(
            client
                .apiserver_version()
                .await
                .unwrap()
                .git_version
                .starts_with("v1.32")
        );
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn generation_follows_spec_only() {
    bounded(async {
        let (api, client) = start_default().await;
        let widgets: Api<DynamicObject> = Api::all_with(client.clone(), &widget_resource());
        let mut widget: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}
        }))
        .unwrap();
        let created = widgets.create(&PostParams::default(), &widget).await.unwrap();
        assert_eq!(created.meta().generation, Some(1));
        assert!(created.namespace().is_none());

        let labelled = widgets
            .patch("w", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})))
            .await
            .unwrap();
        assert_eq!(labelled.meta().generation, Some(1), "metadata changes keep generation");
        assert!(rv(&labelled) > rv(&created));

        let status = widgets
            .patch_status("w", &PatchParams::default(), &Patch::Merge(json!({"status": {"ready": true}})))
            .await
            .unwrap();
        assert_eq!(status.meta().generation, Some(1), "status changes keep generation");

        let noop = widgets
            .patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"size": 1}})))
            .await
            .unwrap();
        assert_eq!(rv(&noop), rv(&status), "an unchanged object is not written again");

        let spec = widgets
            .patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"size": 2}})))
            .await
            .unwrap();
        assert_eq!(spec.meta().generation, Some(2));

        widget = spec.clone();
        widget.data["spec"]["size"] = json!(3);
        let replaced = widgets.replace("w", &PostParams::default(), &widget).await.unwrap();
        assert_eq!(replaced.meta().generation, Some(3));
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn status_subresource_is_split_from_the_main_resource() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        let mut with_status = doff("split", json!({"deviceName": "pc", "comment": "c"}));
        with_status.data["status"] = json!({"phase": "Succeeded"});
        let created = doffs.create(&PostParams::default(), &with_status).await.unwrap();
        assert!(created.data.get("status").is_none(), "create ignores status");

        let status = doffs
            .patch_status(
                "split",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Pending"}, "spec": {"deviceName": "other"}, "metadata": {"labels": {"x": "y"}}})),
            )
            .await
            .unwrap();
        assert_eq!(status.data["status"]["phase"], "Pending");
        assert_eq!(status.data["spec"]["deviceName"], "pc", "status writes ignore spec");
        assert!(status.labels().is_empty(), "status writes ignore metadata");

        let main = doffs
            .patch("split", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}, "metadata": {"labels": {"x": "y"}}})))
            .await
            .unwrap();
        assert_eq!(main.data["status"]["phase"], "Pending", "main writes ignore status");
        assert_eq!(main.labels().get("x").map(String::as_str), Some("y"));

        let invalid = api_error(
            doffs
                .patch_status("split", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Bogus"}})))
                .await,
        );
        assert_eq!(invalid.code, 422);
        assert!(invalid.message.contains("status.phase: Unsupported value: \"Bogus\""), "{}", invalid.message);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        let created = doffs
            .create(&PostParams::default(), &doff("race", json!({"deviceName": "pc", "comment": "c"})))
            .await
            .unwrap();
        let mut first = created.clone();
        first.data["status"] = json!({"phase": "Submitting"});
        let written = doffs.replace_status("race", &PostParams::default(), &first).await.unwrap();
        assert_eq!(written.data["status"]["phase"], "Submitting");

        let mut stale = created.clone();
        stale.data["status"] = json!({"phase": "Pending"});
        let conflict = api_error(doffs.replace_status("race", &PostParams::default(), &stale).await);
        assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
        assert_eq!(
            conflict.message,
            "Operation cannot be fulfilled on deviceoffboards.defender.offboard.dev \"race\": the object has been modified; please apply your changes to the latest version and try again"
        );
        let stale_rv = created.resource_version().unwrap();
        let merge = doffs
            .patch("race", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"resourceVersion": stale_rv, "labels": {"a": "b"}}})))
            .await;
        assert_eq!(api_error(merge).reason, "Conflict");
        let apply = doffs
            .patch_status(
                "race",
                &PatchParams::apply("test").force(),
                &Patch::Apply(json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                    "metadata": {"name": "race", "resourceVersion": stale_rv}, "status": {"phase": "Pending"}})),
            )
            .await;
        assert_eq!(api_error(apply).reason, "Conflict");
        let replace = doffs.replace("race", &PostParams::default(), &created).await;
        assert_eq!(api_error(replace).code, 409);
        assert_eq!(doffs.get("race").await.unwrap().data["status"]["phase"], "Submitting");
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn merge_json_and_apply_patches() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        doffs
            .create(&PostParams::default(), &doff("p", json!({"deviceName": "pc", "comment": "c"})))
            .await
            .unwrap();
        let apply = |status: Value| {
            Patch::Apply(json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                "metadata": {"name": "p"}, "status": status}))
        };
        let pp = PatchParams::apply("defender-offboard").force();
        let applied = doffs
            .patch_status("p", &pp, &apply(json!({"phase": "Pending", "machineId": MACHINE_ID})))
            .await
            .unwrap();
        assert_eq!(applied.data["status"]["phase"], "Pending");
        let managers: Vec<_> = applied.managed_fields().iter().filter_map(|m| m.manager.clone()).collect();
        assert!(managers.contains(&"defender-offboard".to_string()), "{managers:?}");
        // Fields the manager stops applying are removed, as with real server-side apply.
        let reapplied = doffs.patch_status("p", &pp, &apply(json!({"phase": "Submitting"}))).await.unwrap();
        assert_eq!(reapplied.data["status"]["phase"], "Submitting");
        assert!(reapplied.data["status"].get("machineId").is_none());

        let merged = doffs
            .patch_status("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"actionStatus": "Pending"}})))
            .await
            .unwrap();
        assert_eq!(merged.data["status"]["phase"], "Submitting");
        assert_eq!(merged.data["status"]["actionStatus"], "Pending");

        let json_patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/metadata/labels", "value": {"k": "v"}},
            {"op": "add", "path": "/metadata/finalizers", "value": ["defender.offboard.dev/cleanup"]}
        ]))
        .unwrap();
        let patched = doffs.patch("p", &PatchParams::default(), &Patch::<()>::Json(json_patch)).await.unwrap();
        assert_eq!(patched.labels().get("k").map(String::as_str), Some("v"));

        // Finalizers hold deletion until removed.
        doffs.delete("p", &DeleteParams::default()).await.unwrap();
        let terminating = doffs.get("p").await.unwrap();
        assert!(terminating.meta().deletion_timestamp.is_some());
        doffs
            .patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
            .await
            .unwrap();
        assert_eq!(api_error(doffs.get("p").await).code, 404);

        // Strategic merge patches on built-ins behave as merge patches.
        let configmaps: Api<ConfigMap> = Api::default_namespaced(client.clone());
        configmaps
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "cm"}, "data": {"a": "1"}})).unwrap())
            .await
            .unwrap();
        let cm = configmaps
            .patch("cm", &PatchParams::default(), &Patch::Strategic(json!({"data": {"b": "2"}})))
            .await
            .unwrap();
        assert_eq!(cm.data.unwrap().len(), 2);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn apply_conflicts_between_managers() {
    bounded(async {
        let (api, client) = start_default().await;
        let leases: Api<Lease> = Api::default_namespaced(client.clone());
        let lease = |holder: &str| {
            Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}}))
        };
        leases.patch("leader", &PatchParams::apply("manager-a"), &lease("a")).await.unwrap();
        let conflict = api_error(leases.patch("leader", &PatchParams::apply("manager-b"), &lease("b")).await);
        assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
        assert!(conflict.message.contains("conflict with \"manager-a\""), "{}", conflict.message);
        let forced = leases.patch("leader", &PatchParams::apply("manager-b").force(), &lease("b")).await.unwrap();
        assert_eq!(forced.spec.unwrap().holder_identity.as_deref(), Some("b"));

        // Apply creates missing objects; status sent to the main resource is neither kept nor owned.
        let doffs = doffs(&client);
        let applied = doffs
            .patch(
                "applied",
                &PatchParams::apply("operator"),
                &Patch::Apply(json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                    "metadata": {"name": "applied"}, "spec": {"deviceName": "pc", "comment": "c"}, "status": {"phase": "Failed"}})),
            )
            .await
            .unwrap();
        assert!(applied.data.get("status").is_none());
        let status = doffs
            .patch_status(
                "applied",
                &PatchParams::apply("operator"),
                &Patch::Apply(json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                    "metadata": {"name": "applied"}, "status": {"phase": "Pending"}})),
            )
            .await
            .unwrap();
        assert_eq!(status.data["status"]["phase"], "Pending");
        let taken = api_error(
            doffs
                .patch_status(
                    "applied",
                    &PatchParams::apply("intruder"),
                    &Patch::Apply(json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                        "metadata": {"name": "applied"}, "status": {"phase": "Failed"}})),
                )
                .await,
        );
        assert!(taken.message.contains("conflict with \"operator\"") && taken.message.contains(".status.phase"), "{}", taken.message);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn watch_resumes_from_a_version_with_bookmarks_and_expires() {
    bounded(async {
        let api = start(ApiServerConfig {
            crds: vec![doff_crd()],
            watch_history: WatchHistory::changes(5),
            bookmark_interval: Duration::from_millis(200),
            ..Default::default()
        })
        .await;
        let client = api.client().await.unwrap();
        let doffs = doffs(&client);
        let first = doffs
            .create(
                &PostParams::default(),
                &doff("w1", json!({"deviceName": "pc", "comment": "c"})),
            )
            .await
            .unwrap();
        let from = first.resource_version().unwrap();
        doffs
            .create(
                &PostParams::default(),
                &doff("w2", json!({"deviceName": "pc", "comment": "c"})),
            )
            .await
            .unwrap();
        doffs
            .patch_status(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Pending"}})),
            )
            .await
            .unwrap();
        doffs.delete("w2", &DeleteParams::default()).await.unwrap();

        let events: Vec<WatchEvent<DynamicObject>> = doffs
            .watch(&WatchParams::default().timeout(1), &from)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let summary: Vec<String> = events
            .iter()
            .map(|e| match e {
                WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
                WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
                WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
                WatchEvent::Bookmark(_) => "BOOKMARK".into(),
                WatchEvent::Error(e) => format!("ERROR {}", e.code),
            })
            .collect();
        assert_eq!(
            &summary[..3],
            ["ADDED w2", "MODIFIED w1", "DELETED w2"],
            "{summary:?}"
        );
        assert!(
            summary[3..].iter().all(|s| s == "BOOKMARK") && summary.len() >= 5,
            "periodic and final bookmarks: {summary:?}"
        );
        if let Some(WatchEvent::Bookmark(b)) = events.last() {
            assert_eq!(
                b.metadata.resource_version,
                doffs
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .metadata
                    .resource_version
                    .unwrap()
            );
        }

        // Label-filtered watch: an object leaving the selection is seen as DELETED.
        for i in 0..6 {
            doffs
                .patch(
                    "w1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"i": i.to_string()}}})),
                )
                .await
                .unwrap();
        }
        let mut expired = doffs
            .watch(&WatchParams::default(), &from)
            .await
            .unwrap()
            .boxed();
        match expired.next().await {
            Some(Ok(WatchEvent::Error(e))) => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                assert!(
                    e.message.starts_with("too old resource version"),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected 410 Gone, got {other:?}"),
        }
        // A version from the future (another server instance) makes the client relist too.
        let mut future = doffs
            .watch(&WatchParams::default(), "999999")
            .await
            .unwrap()
            .boxed();
        match future.next().await {
            Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
            other => panic!("expected 410 Gone, got {other:?}"),
        }
        api.shutdown().await;
    })
    .await;
}

/// The first event of a watch from `from`, as a short summary.
async fn first_watch_event(doffs: &Api<DynamicObject>, from: &str) -> String {
    let mut events = doffs
        .watch(&WatchParams::default().timeout(1), from)
        .await
        .unwrap()
        .boxed();
    match events.next().await {
        Some(Ok(WatchEvent::Added(o))) => format!("ADDED {}", o.name_any()),
        Some(Ok(WatchEvent::Error(e))) => format!("ERROR {} {}", e.code, e.reason),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn a_watch_from_before_the_fresh_window_and_the_newest_changes_expires() {
    bounded(async {
        let api = start(ApiServerConfig {
            crds: vec![doff_crd()],
            watch_history: WatchHistory {
                min_changes: 2,
                fresh_for: Duration::from_millis(300),
                ..WatchHistory::default()
            },
            ..Default::default()
        })
        .await;
        let client = api.client().await.unwrap();
        let doffs = doffs(&client);
        let mut versions = Vec::new();
        for name in ["t1", "t2", "t3", "t4"] {
            let spec = json!({"deviceName": name, "comment": "c"});
            let created = doffs
                .create(&PostParams::default(), &doff(name, spec))
                .await
                .unwrap();
            versions.push(created.resource_version().unwrap());
        }
        // Young changes are kept beyond the newest two.
        assert_eq!(first_watch_event(&doffs, &versions[0]).await, "ADDED t2");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let spec = json!({"deviceName": "t5", "comment": "c"});
        doffs
            .create(&PostParams::default(), &doff("t5", spec))
            .await
            .unwrap();
        // Once stale, only the newest two changes (t4, t5) stay.
        assert_eq!(
            first_watch_event(&doffs, &versions[0]).await,
            "ERROR 410 Expired"
        );
        assert_eq!(
            first_watch_event(&doffs, &versions[2]).await,
            "ADDED t4",
            "the newest changes stay however old"
        );
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn label_selectors_filter_lists_and_watches() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        for (name, labels) in [
            ("a", json!({"env": "prod", "tier": "web"})),
            ("b", json!({"env": "dev"})),
            ("c", json!({})),
        ] {
            let mut o = doff(name, json!({"deviceName": name, "comment": "c"}));
            o.metadata.labels = Some(serde_json::from_value(labels).unwrap());
            doffs.create(&PostParams::default(), &o).await.unwrap();
        }
        let names = |selector: &'static str| {
            let doffs = doffs.clone();
            async move {
                let mut names: Vec<String> = doffs
                    .list(&ListParams::default().labels(selector))
                    .await
                    .unwrap()
                    .iter()
                    .map(|o| o.name_any())
                    .collect();
                names.sort();
                names.join(",")
            }
        };
        assert_eq!(names("env=prod").await, "a");
        assert_eq!(names("env==dev").await, "b");
        assert_eq!(names("env!=prod").await, "b,c");
        assert_eq!(names("env in (prod,dev)").await, "a,b");
        assert_eq!(names("env notin (prod)").await, "b,c");
        assert_eq!(names("tier").await, "a");
        assert_eq!(names("!env").await, "c");
        assert_eq!(names("env,tier=web").await, "a");
        let by_name = doffs
            .list(&ListParams::default().fields("metadata.name=b"))
            .await
            .unwrap();
        assert_eq!(by_name.items.len(), 1);
        let bad = api_error(
            doffs
                .list(&ListParams::default().fields("spec.deviceName=a"))
                .await,
        );
        assert_eq!(bad.code, 400);

        // A filtered watch sees objects entering (ADDED) and leaving (DELETED) the selection.
        let from = doffs
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let relabel = |name: &'static str, env: &'static str| {
            let doffs = doffs.clone();
            async move {
                doffs
                    .patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"env": env}}})),
                    )
                    .await
                    .unwrap();
            }
        };
        relabel("b", "prod").await;
        relabel("a", "dev").await;
        relabel("c", "dev").await;
        let events: Vec<WatchEvent<DynamicObject>> = doffs
            .watch(&WatchParams::default().labels("env=prod").timeout(1), &from)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let seen: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Added(o) => Some(format!("ADDED {}", o.name_any())),
                WatchEvent::Modified(o) => Some(format!("MODIFIED {}", o.name_any())),
                WatchEvent::Deleted(o) => Some(format!("DELETED {}", o.name_any())),
                _ => None,
            })
            .collect();
        assert_eq!(seen, ["ADDED b", "DELETED a"]);
        api.shutdown().await;
    })
    .await;
}

fn causes(status: &kube::core::Status) -> Vec<(String, String, String)> {
    status
        .details
        .as_ref()
        .map(|d| {
            d.causes
                .iter()
                .map(|c| (c.reason.clone(), c.field.clone(), c.message.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_field_causes() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        let create = |name: &'static str, spec: Value| {
            let doffs = doffs.clone();
            async move { api_error(doffs.create(&PostParams::default(), &doff(name, spec)).await) }
        };

        let pattern = create("bad", json!({"machineId": "abc", "comment": "c"})).await;
        assert_eq!((pattern.code, pattern.reason.as_str()), (422, "Invalid"));
        assert_eq!(
            pattern.message,
            "DeviceOffboard.defender.offboard.dev \"bad\" is invalid: spec.machineId: Invalid value: \"abc\": spec.machineId in body should match '^[0-9a-f]{40}$'"
        );
        let details = pattern.details.as_ref().unwrap();
        assert_eq!((details.name.as_str(), details.group.as_str(), details.kind.as_str()), ("bad", GROUP, "DeviceOffboard"));
        assert_eq!(causes(&pattern)[0].0, "FieldValueInvalid");
        assert_eq!(causes(&pattern)[0].1, "spec.machineId");

        let missing = create("nocomment", json!({"deviceName": "pc"})).await;
        assert_eq!(causes(&missing), vec![("FieldValueRequired".into(), "spec.comment".into(), "Required value".into())]);

        let both = create("both", json!({"deviceName": "pc", "machineId": MACHINE_ID, "comment": "c"})).await;
        assert!(causes(&both).iter().any(|(_, f, m)| f == "spec" && m.contains("one and only one schema (oneOf)")), "{both:?}");
        let neither = create("neither", json!({"comment": "c"})).await;
        let neither_causes = causes(&neither);
        assert!(neither_causes.iter().any(|(r, f, _)| r == "FieldValueRequired" && f == "spec.machineId"), "{neither_causes:?}");
        assert!(neither_causes.iter().any(|(r, f, _)| r == "FieldValueRequired" && f == "spec.deviceName"), "{neither_causes:?}");

        let empty = create("empty", json!({"deviceName": "pc", "comment": ""})).await;
        assert_eq!(causes(&empty)[0].1, "spec.comment");

        let ok = doffs.create(&PostParams::default(), &doff("fixed", json!({"deviceName": "pc", "comment": "c"}))).await.unwrap();
        let mut edited = ok.clone();
        edited.data["spec"]["deviceName"] = json!("other");
        let immutable = api_error(doffs.replace("fixed", &PostParams::default(), &edited).await);
        assert_eq!(immutable.code, 422);
        assert_eq!(
            immutable.message,
            "DeviceOffboard.defender.offboard.dev \"fixed\" is invalid: spec: Invalid value: \"object\": spec is immutable"
        );
        let merge_edit = api_error(
            doffs.patch("fixed", &PatchParams::default(), &Patch::Merge(json!({"spec": {"comment": "changed"}}))).await,
        );
        assert_eq!(causes(&merge_edit)[0].1, "spec");
        // Unknown fields are pruned, as for structural schemas.
        let pruned = doffs
            .create(&PostParams::default(), &doff("pruned", json!({"deviceName": "pc", "comment": "c", "colour": "red"})))
            .await
            .unwrap();
        assert!(pruned.data["spec"].get("colour").is_none());
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn recorder_events_are_visible_as_core_events() {
    bounded(async {
        let (api, client) = start_default().await;
        let doffs = doffs(&client);
        let object = doffs
            .create(&PostParams::default(), &doff("evt", json!({"deviceName": "pc", "comment": "c"})))
            .await
            .unwrap();
        let other = doffs
            .create(&PostParams::default(), &doff("other", json!({"deviceName": "pc", "comment": "c"})))
            .await
            .unwrap();
        let recorder = Recorder::new(client.clone(), Reporter { controller: "defender-offboard".into(), instance: None });
        let event = Event {
            type_: EventType::Normal,
            reason: "Submitted".into(),
            note: Some("offboard request sent".into()),
            action: "Offboard".into(),
            secondary: None,
        };
        let reference = object.object_ref(&doff_resource());
        recorder.publish(&event, &reference).await.unwrap();
        recorder.publish(&event, &reference).await.unwrap();
        recorder.publish(&event, &other.object_ref(&doff_resource())).await.unwrap();

        let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
        let selector = format!(
            "involvedObject.name=evt,involvedObject.namespace=default,involvedObject.kind=DeviceOffboard,involvedObject.uid={}",
            object.uid().unwrap()
        );
        let listed = core.list(&ListParams::default().fields(&selector)).await.unwrap();
        assert_eq!(listed.items.len(), 1, "repeats are one event with a series");
        let e = &listed.items[0];
        assert_eq!(e.reason.as_deref(), Some("Submitted"));
        assert_eq!(e.message.as_deref(), Some("offboard request sent"));
        assert_eq!(e.involved_object.name.as_deref(), Some("evt"));
        assert_eq!(e.reporting_component.as_deref(), Some("defender-offboard"));
        assert_eq!(e.source.as_ref().and_then(|s| s.component.as_deref()), Some("defender-offboard"));
        assert_eq!(e.count, Some(2));
        assert_eq!(core.list(&ListParams::default()).await.unwrap().items.len(), 2);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn leases_use_optimistic_concurrency() {
    bounded(async {
        let (api, client) = start_default().await;
        let leases: Api<Lease> = Api::default_namespaced(client.clone());
        let lease: Lease =
            serde_json::from_value(json!({"metadata": {"name": "defender-offboard"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}))
            .unwrap();
        let created = leases.create(&PostParams::default(), &lease).await.unwrap();
        let mut renewed = created.clone();
        renewed.spec.as_mut().unwrap().holder_identity = Some("b".into());
        let renewed = leases
            .replace("defender-offboard", &PostParams::default(), &renewed)
            .await
            .unwrap();
        let mut stale = created.clone();
        stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
        let conflict = api_error(
            leases
                .replace("defender-offboard", &PostParams::default(), &stale)
                .await,
        );
        assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
        assert_eq!(
            leases
                .get("defender-offboard")
                .await
                .unwrap()
                .spec
                .unwrap()
                .holder_identity
                .as_deref(),
            Some("b")
        );
        assert!(rv(&renewed) > rv(&created));

        // kube-lease-manager: one leader at a time.
        let manager = |id: &str| {
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "election")
                .with_identity(id)
                .with_duration(5)
                .with_grace(2)
                .build()
        };
        let first = manager("first").await.unwrap();
        let second = manager("second").await.unwrap();
        assert!(first.changed().await.unwrap(), "the first candidate leads");
        let contender = tokio::time::timeout(Duration::from_secs(2), second.changed()).await;
        assert!(
            contender.is_err() || !contender.unwrap().unwrap(),
            "the second does not lead while the first holds the lease"
        );
        let election = leases.get("election").await.unwrap();
        assert_eq!(
            election.spec.unwrap().holder_identity.as_deref(),
            Some("first")
        );
        leases
            .delete("defender-offboard", &DeleteParams::default())
            .await
            .unwrap();
        assert_eq!(api_error(leases.get("defender-offboard").await).code, 404);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn controller_and_watcher_run_against_the_api() {
    bounded(async {
        let api = start(ApiServerConfig {
            crds: vec![doff_crd()],
            bookmark_interval: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let client = api.client().await.unwrap();
        let doffs = doffs(&client);
        doffs
            .create(&PostParams::default(), &doff("before", json!({"deviceName": "pc", "comment": "c"})))
            .await
            .unwrap();
        let reconciled = Arc::new(tokio::sync::Notify::new());
        let context = Arc::new((doffs.clone(), reconciled.clone()));
        // Short watch timeouts make the watcher reconnect from its bookmarked resourceVersion.
        let controller = Controller::new_with(
            Api::<DynamicObject>::all_with(client.clone(), &doff_resource()),
            watcher::Config::default().timeout(1),
            doff_resource(),
        )
        .run(
            |object: Arc<DynamicObject>, ctx: Arc<(Api<DynamicObject>, Arc<tokio::sync::Notify>)>| async move {
                if object.data["status"]["phase"] != "Succeeded" {
                    let status = json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                        "metadata": {"name": object.name_any()},
                        "status": {"phase": "Succeeded", "observedGeneration": object.meta().generation}});
                    ctx.0
                        .patch_status(&object.name_any(), &PatchParams::apply("test-controller").force(), &Patch::Apply(status))
                        .await?;
                }
                ctx.1.notify_one();
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _: &kube::Error, _| Action::requeue(Duration::from_millis(200)),
            context,
        )
        .for_each(|_| async {});
        let controller = tokio::spawn(controller);
        let wait_phase = |name: &'static str| {
            let doffs = doffs.clone();
            async move {
                loop {
                    if doffs.get(name).await.unwrap().data["status"]["phase"] == "Succeeded" {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait_phase("before")).await.expect("reconciled existing object");
        // Created after at least one watch timed out and reconnected.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        doffs
            .create(&PostParams::default(), &doff("after", json!({"deviceName": "pc", "comment": "c"})))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), wait_phase("after")).await.expect("reconciled new object");

        // Streaming lists (sendInitialEvents) end the initial state with a marked bookmark.
        let mut stream = watcher(
            Api::<DynamicObject>::all_with(client.clone(), &doff_resource()),
            watcher::Config::default().streaming_lists(),
        )
        .boxed();
        let mut seen = Vec::new();
        while let Some(event) = stream.try_next().await.unwrap() {
            match event {
                watcher::Event::InitApply(o) => seen.push(o.name_any()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        seen.sort();
        assert_eq!(seen, ["after", "before"]);
        controller.abort();
        let _ = reconciled;
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn crds_created_through_the_api_are_served() {
    bounded(async {
        let api = start(ApiServerConfig::default()).await;
        let client = api.client().await.unwrap();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let created = crds
            .create(&PostParams::default(), &doff_crd())
            .await
            .unwrap();
        let conditions = created.status.unwrap().conditions.unwrap();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        );
        let doffs = doffs(&client);
        doffs
            .create(
                &PostParams::default(),
                &doff("late", json!({"deviceName": "pc", "comment": "c"})),
            )
            .await
            .unwrap();
        let discovery = kube::discovery::Discovery::new(client.clone())
            .run()
            .await
            .unwrap();
        let (resource, caps) = discovery
            .resolve_gvk(&GroupVersionKind::gvk(GROUP, VERSION, "DeviceOffboard"))
            .expect("discovered");
        assert_eq!(resource.plural, "deviceoffboards");
        assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
        crds.delete(
            "deviceoffboards.defender.offboard.dev",
            &DeleteParams::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            api_error(doffs.list(&ListParams::default()).await).code,
            404
        );
        api.shutdown().await;
    })
    .await;
}

/// Runs the real kubectl against the API with only `--kubeconfig` (and a private discovery cache).
struct Kubectl {
    kubeconfig: std::path::PathBuf,
    cache: std::path::PathBuf,
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("KUBECACHEDIR", &self.cache)
            .kill_on_drop(true);
        command
    }

    async fn run(&self, args: &[&str]) -> Output {
        let output = tokio::time::timeout(Duration::from_secs(30), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} finished in time"))
            .expect("kubectl runs");
        Output {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }
}

fn kubectl_available() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

const MANIFESTS: &[(&str, &str)] = &[
    (
        "00-namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: offboarding\n",
    ),
    (
        "10-deviceoffboards.yaml",
        "apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata:
  name: laptop-17
  namespace: offboarding
spec:
  machineId: 0123456789abcdef0123456789abcdef01234567
  comment: Retired laptop
---
apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata:
  name: desktop-3
  namespace: offboarding
spec:
  deviceName: desktop-3.corp.example
  comment: Returned to vendor
",
    ),
];

fn ready_status(name: &str) -> Patch<Value> {
    Patch::Apply(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard", "metadata": {"name": name},
        "status": {"phase": "Succeeded", "machineId": MACHINE_ID, "machineActionId": "7f3a", "actionStatus": "Succeeded",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Offboarded", "message": "device offboarded",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    }))
}

#[tokio::test]
async fn real_kubectl_works_against_the_api() {
    if !kubectl_available() {
        println!("NOTICE: kubectl is not on PATH; skipping the kubectl end-to-end test");
        return;
    }
    bounded(async {
        let api = start(ApiServerConfig::default()).await;
        let client = api.client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubectl = Kubectl { kubeconfig: dir.path().join("kubeconfig"), cache: dir.path().join("cache") };
        api.write_kubeconfig(&kubectl.kubeconfig).unwrap();
        // The project's committed CRD file, as a user would apply it.
        let crd_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds/deviceoffboards.defender.offboard.dev.yaml");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        for (name, text) in MANIFESTS {
            std::fs::write(manifests.join(name), text).unwrap();
        }
        let crd_path = crd_file.to_str().unwrap();
        let manifests_path = manifests.to_str().unwrap();

        let out = kubectl.ok(&["apply", "-f", crd_path]).await;
        assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/deviceoffboards.defender.offboard.dev created"), "{out}");
        let out = kubectl.ok(&["apply", "-f", manifests_path]).await;
        assert!(out.contains("namespace/offboarding created"), "{out}");
        assert!(out.contains("deviceoffboard.defender.offboard.dev/laptop-17 created"), "{out}");
        assert!(out.contains("deviceoffboard.defender.offboard.dev/desktop-3 created"), "{out}");
        let out = kubectl.ok(&["apply", "-f", manifests_path]).await;
        assert!(out.contains("deviceoffboard.defender.offboard.dev/laptop-17 unchanged"), "{out}");

        // Printer columns.
        let doffs: Api<DynamicObject> = Api::namespaced_with(client.clone(), "offboarding", &doff_resource());
        let pp = PatchParams::apply("defender-offboard").force();
        doffs
            .patch_status("laptop-17", &pp, &Patch::Apply(json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DeviceOffboard",
                "metadata": {"name": "laptop-17"}, "status": {"phase": "InProgress", "machineId": MACHINE_ID, "machineActionId": "7f3a", "actionStatus": "Pending"}})))
            .await
            .unwrap();
        let table = kubectl.ok(&["get", "doff", "-n", "offboarding"]).await;
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "MACHINE", "PHASE", "ACTION", "STATUS", "AGE"], "{table}");
        let row: Vec<&str> = table.lines().find(|l| l.starts_with("laptop-17")).unwrap().split_whitespace().collect();
        assert_eq!(&row[..5], ["laptop-17", MACHINE_ID, "InProgress", "7f3a", "Pending"], "{table}");
        assert!(row[5].ends_with('s'), "age column: {table}");
        let short = kubectl.ok(&["get", "offboard", "-A", "-o", "name"]).await;
        assert_eq!(short.lines().count(), 2, "{short}");

        // YAML output.
        let yaml = kubectl.ok(&["get", "doff", "laptop-17", "-n", "offboarding", "-o", "yaml"]).await;
        let object: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(object["spec"]["machineId"], MACHINE_ID);
        assert_eq!(object["kind"], "DeviceOffboard");
        assert_eq!(object["status"]["phase"], "InProgress");

        // Events published by kube-rs show in describe.
        let laptop = doffs.get("laptop-17").await.unwrap();
        let recorder = Recorder::new(client.clone(), Reporter { controller: "defender-offboard".into(), instance: None });
        recorder
            .publish(
                &Event { type_: EventType::Normal, reason: "Submitted".into(), note: Some("offboard request sent".into()),
                    action: "Offboard".into(), secondary: None },
                &laptop.object_ref(&doff_resource()),
            )
            .await
            .unwrap();
        let described = kubectl.ok(&["describe", "doff", "laptop-17", "-n", "offboarding"]).await;
        let event_line = described.lines().find(|l| l.contains("Submitted")).unwrap_or_else(|| panic!("{described}"));
        assert!(event_line.contains("Normal") && event_line.contains("defender-offboard") && event_line.contains("offboard request sent"), "{described}");

        // kubectl wait watches until the condition appears.
        let waiting = kubectl
            .command(&["wait", "--for=condition=Ready", "doff", "--all", "-n", "offboarding", "--timeout=30s"])
            .output();
        let waiting = tokio::spawn(waiting);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "kubectl wait returned before the condition was set");
        for name in ["laptop-17", "desktop-3"] {
            doffs.patch_status(name, &pp, &ready_status(name)).await.unwrap();
        }
        let waited = waiting.await.unwrap().unwrap();
        let stdout = String::from_utf8_lossy(&waited.stdout);
        assert!(waited.status.success(), "{stdout}{}", String::from_utf8_lossy(&waited.stderr));
        assert!(stdout.contains("deviceoffboard.defender.offboard.dev/laptop-17 condition met"), "{stdout}");
        assert!(stdout.contains("deviceoffboard.defender.offboard.dev/desktop-3 condition met"), "{stdout}");

        // An edited spec is refused by the CRD's CEL rule, naming the field.
        let edited = MANIFESTS[1].1.replace("Retired laptop", "Edited comment");
        std::fs::write(manifests.join(MANIFESTS[1].0), edited).unwrap();
        let refused = kubectl.run(&["apply", "-f", manifests_path]).await;
        assert!(!refused.ok);
        assert!(refused.stderr.contains("spec: Invalid value: \"object\": spec is immutable"), "{}", refused.stderr);
        assert!(refused.stderr.contains("laptop-17"), "{}", refused.stderr);

        // Strict field validation: unknown fields are rejected.
        let unknown = manifests.join("20-unknown.yaml");
        std::fs::write(&unknown, MANIFESTS[1].1.split("---").next().unwrap().replace("laptop-17", "typo").replace("comment:", "colour: red\n  comment:")).unwrap();
        let strict = kubectl.run(&["apply", "-f", unknown.to_str().unwrap()]).await;
        assert!(!strict.ok && strict.stderr.contains("unknown field \"spec.colour\""), "{}", strict.stderr);

        // Typed kubectl commands send protobuf bodies for built-ins.
        kubectl
            .ok(&["create", "secret", "generic", "azure", "-n", "offboarding", "--from-literal=AZURE_CLIENT_ID=app"])
            .await;
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "offboarding");
        let secret = secrets.get("azure").await.unwrap();
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        assert_eq!(secret.data.unwrap()["AZURE_CLIENT_ID"].0, b"app");

        let out = kubectl.ok(&["delete", "doff", "laptop-17", "-n", "offboarding"]).await;
        assert!(out.contains("deviceoffboard.defender.offboard.dev \"laptop-17\" deleted"), "{out}");
        let gone = kubectl.run(&["get", "doff", "laptop-17", "-n", "offboarding"]).await;
        assert!(!gone.ok);
        assert!(gone.stderr.contains("deviceoffboards.defender.offboard.dev \"laptop-17\" not found"), "{}", gone.stderr);
        api.shutdown().await;
    })
    .await;
}

/// The claims of a JWT-shaped token (its base64url middle part).
fn token_claims(token: &str) -> Value {
    use base64::Engine;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "header.payload.signature: {token}");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("base64url claims");
    serde_json::from_slice(&payload).expect("JSON claims")
}

fn token_request(audiences: &[&str], expiration_seconds: Option<i64>) -> TokenRequest {
    TokenRequest {
        // k8s-openapi 0.29 (`latest`) makes `spec` and `audiences` optional.
        spec: Some(TokenRequestSpec {
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            expiration_seconds,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn service_account_tokens_for_workload_identity() {
    bounded(async {
        let (api, client) = start_default().await;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let account: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "defender-offboard"}})).unwrap();
        let created = accounts.create(&PostParams::default(), &account).await.unwrap();
        let uid = created.uid().expect("uid");
        let listed = accounts.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        let mut labelled = accounts.get("defender-offboard").await.unwrap();
        labelled.labels_mut().insert("app".into(), "operator".into());
        accounts.replace("defender-offboard", &PostParams::default(), &labelled).await.unwrap();

        // What the operator asks for: an Entra Workload ID assertion.
        let pp = PostParams::default();
        let issued = accounts
            .create_token_request("defender-offboard", &pp, &token_request(&["api://AzureADTokenExchange"], Some(3600)))
            .await
            .unwrap();
        assert_eq!(issued.metadata.name.as_deref(), Some("defender-offboard"));
        assert_eq!(issued.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(issued.spec.unwrap().audiences.unwrap(), ["api://AzureADTokenExchange"]);
        let status = issued.status.expect("status");
        let claims = token_claims(status.token.as_deref().unwrap());
        assert_eq!(claims["sub"], "system:serviceaccount:default:defender-offboard");
        assert_eq!(claims["aud"], json!(["api://AzureADTokenExchange"]));
        assert_eq!(claims["iss"], "https://kubernetes.default.svc.cluster.local");
        assert_eq!(claims["kubernetes.io"]["namespace"], "default");
        assert_eq!(claims["kubernetes.io"]["serviceaccount"], json!({"name": "defender-offboard", "uid": uid}));
        let (iat, exp) = (claims["iat"].as_i64().unwrap(), claims["exp"].as_i64().unwrap());
        assert_eq!(claims["nbf"], claims["iat"]);
        assert_eq!(exp - iat, 3600);
        assert_eq!(status.expiration_timestamp.unwrap().0.as_second(), exp);
        assert!((iat - jiff::Timestamp::now().as_second()).abs() < 60);
        let again = accounts
            .create_token_request("defender-offboard", &pp, &token_request(&["api://AzureADTokenExchange"], Some(3600)))
            .await
            .unwrap();
        assert_ne!(again.status.unwrap().token, status.token, "every token is new");

        // Defaults: the API server's audience and an hour.
        let defaulted = accounts.create_token_request("defender-offboard", &pp, &token_request(&[], None)).await.unwrap();
        assert_eq!(defaulted.spec.unwrap().expiration_seconds, Some(3600));
        let claims = token_claims(&defaulted.status.unwrap().token.unwrap());
        assert_eq!(claims["aud"], json!(["https://kubernetes.default.svc.cluster.local"]));
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);

        // The floor: kube-apiserver refuses less than ten minutes and accepts exactly ten.
        let short = api_error(accounts.create_token_request("defender-offboard", &pp, &token_request(&["a"], Some(599))).await);
        assert_eq!((short.code, short.reason.as_str()), (422, "Invalid"));
        assert_eq!(
            short.message,
            "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes"
        );
        let ten_minutes = accounts.create_token_request("defender-offboard", &pp, &token_request(&["a"], Some(600))).await.unwrap();
        assert_eq!(ten_minutes.spec.unwrap().expiration_seconds, Some(600));
        let claims = token_claims(&ten_minutes.status.unwrap().token.unwrap());
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 600);

        // A missing ServiceAccount, and one in another namespace.
        let missing = api_error(accounts.create_token_request("ghost", &pp, &token_request(&["a"], None)).await);
        assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
        assert_eq!(missing.message, "serviceaccounts \"ghost\" not found");
        let elsewhere: Api<ServiceAccount> = Api::namespaced(client.clone(), "kube-system");
        assert_eq!(
            api_error(elsewhere.create_token_request("defender-offboard", &pp, &token_request(&["a"], None)).await).code,
            404
        );

        // Only POST creates; the body must be a TokenRequest.
        let url = format!("{}/api/v1/namespaces/default/serviceaccounts/defender-offboard/token", api.url());
        let http = reqwest::Client::new();
        let get = http.get(&url).send().await.unwrap();
        assert_eq!(get.status().as_u16(), 405);
        let get: Value = get.json().await.unwrap();
        assert_eq!((get["kind"].as_str(), get["reason"].as_str()), (Some("Status"), Some("MethodNotAllowed")));
        for body in [
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}),
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": "1h"}}),
            json!("token please"),
        ] {
            let response = http.post(&url).json(&body).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 400, "{body}");
            let status: Value = response.json().await.unwrap();
            assert_eq!(status["reason"], "BadRequest", "{body}");
        }
        let created = http
            .post(&url)
            .json(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": ["x"]}}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status().as_u16(), 201);
        let accounts_url = format!("{}/api/v1/namespaces/default/serviceaccounts/nobody/token", api.url());
        let status: Value = http.post(&accounts_url).json(&json!({})).send().await.unwrap().json().await.unwrap();
        assert_eq!(status["details"], json!({"name": "nobody", "group": "", "kind": "serviceaccounts"}));

        // Discovery: legacy and aggregated, with the short name and the token subresource.
        let core = client.list_core_api_resources("v1").await.unwrap();
        let sa = core.resources.iter().find(|r| r.name == "serviceaccounts").expect("serviceaccounts in /api/v1");
        assert_eq!((sa.kind.as_str(), sa.namespaced), ("ServiceAccount", true));
        assert_eq!(sa.short_names.as_deref(), Some(&["sa".to_string()][..]));
        let token = core.resources.iter().find(|r| r.name == "serviceaccounts/token").expect("the token subresource");
        assert_eq!((token.group.as_deref(), token.kind.as_str(), token.verbs.clone()), (Some("authentication.k8s.io"), "TokenRequest", vec!["create".to_string()]));
        let discovery = kube::discovery::Discovery::new(client.clone()).run_aggregated().await.unwrap();
        let (resource, caps) = discovery.get("").expect("core").recommended_kind("ServiceAccount").expect("ServiceAccount");
        assert_eq!((resource.plural.as_str(), caps.scope.clone()), ("serviceaccounts", kube::discovery::Scope::Namespaced));

        accounts.delete("defender-offboard", &DeleteParams::default()).await.unwrap();
        assert_eq!(
            api_error(accounts.create_token_request("defender-offboard", &pp, &token_request(&["a"], None)).await).code,
            404
        );
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn kubectl_creates_service_accounts_and_tokens() {
    if !kubectl_available() {
        println!("NOTICE: kubectl is not on PATH; skipping the kubectl service account test");
        return;
    }
    bounded(async {
        let api = start(ApiServerConfig::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let kubectl = Kubectl {
            kubeconfig: dir.path().join("kubeconfig"),
            cache: dir.path().join("cache"),
        };
        api.write_kubeconfig(&kubectl.kubeconfig).unwrap();

        let out = kubectl
            .ok(&["create", "serviceaccount", "defender-offboard"])
            .await;
        assert!(
            out.contains("serviceaccount/defender-offboard created"),
            "{out}"
        );
        let table = kubectl.ok(&["get", "sa"]).await;
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "SECRETS", "AGE"], "{table}");
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(&row[..2], ["defender-offboard", "0"], "{table}");
        let yaml = kubectl
            .ok(&["get", "serviceaccount", "defender-offboard", "-o", "yaml"])
            .await;
        let object: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(
            (
                object["kind"].as_str(),
                object["metadata"]["namespace"].as_str()
            ),
            (Some("ServiceAccount"), Some("default"))
        );

        let token = kubectl
            .ok(&[
                "create",
                "token",
                "defender-offboard",
                "--audience",
                "api://AzureADTokenExchange",
                "--duration",
                "20m",
            ])
            .await;
        let claims = token_claims(token.trim());
        assert_eq!(
            claims["sub"],
            "system:serviceaccount:default:defender-offboard"
        );
        assert_eq!(claims["aud"], json!(["api://AzureADTokenExchange"]));
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            1200
        );
        let missing = kubectl.run(&["create", "token", "ghost"]).await;
        assert!(
            !missing.ok
                && missing
                    .stderr
                    .contains("serviceaccounts \"ghost\" not found"),
            "{}",
            missing.stderr
        );

        let out = kubectl.ok(&["delete", "sa", "defender-offboard"]).await;
        assert!(
            out.contains("serviceaccount \"defender-offboard\" deleted"),
            "{out}"
        );
        api.shutdown().await;
    })
    .await;
}

/// A Secret's `stringData` is written into `data` (base64) on create, update
/// and patch, and never stored or returned, as the API server does.
#[tokio::test]
async fn secret_string_data_is_merged_into_data() {
    use k8s_openapi::api::core::v1::Secret;
    let (_api, client) = start_default().await;
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "data": {"kept": "a2VwdA==", "replaced": "b2xk"},
        "stringData": {"client-secret": "s3cr3t", "replaced": "new"},
    }))
    .unwrap();
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let data = created.data.clone().unwrap();
    assert_eq!(data["client-secret"].0, b"s3cr3t");
    assert_eq!(data["kept"].0, b"kept");
    assert_eq!(data["replaced"].0, b"new", "stringData wins over data");
    assert!(created.string_data.is_none());
    let patched = secrets
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"client-secret": "rotated"}})),
        )
        .await
        .unwrap();
    let data = patched.data.unwrap();
    assert_eq!(data["client-secret"].0, b"rotated");
    assert_eq!(data["kept"].0, b"kept");
    let read = secrets.get("app").await.unwrap();
    assert!(read.string_data.is_none(), "stringData is never stored");
}
