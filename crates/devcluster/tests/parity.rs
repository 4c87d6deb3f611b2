//! Behaviours of kube-apiserver 1.32 that the in-memory API must share so that a
//! bug a real cluster exposes also shows here (issue 10's list), each checked
//! through a real client.

use devcluster::{ApiHandle, ApiServerConfig, spawn_api};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::net::TcpListener;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A namespaced kind with a status and a scale subresource and a closed schema.
fn thing_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.dev"},
        "spec": {
            "group": "example.dev", "scope": "Namespaced",
            "names": {"kind": "Thing", "plural": "things", "singular": "thing"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}, "scale": {
                    "specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas",
                    "labelSelectorPath": ".status.selector"}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "replicas": {"type": "integer"}, "size": {"type": "string"}}},
                    "status": {"type": "object", "properties": {
                        "replicas": {"type": "integer"}, "selector": {"type": "string"},
                        "observedGeneration": {"type": "integer"}}}}}}}]
        }
    }))
    .expect("valid CRD")
}

fn thing_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.dev", "v1", "Thing"),
        "things",
    )
}

fn things(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), "default", &thing_resource())
}

fn thing(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "example.dev/v1", "kind": "Thing",
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

async fn start_with_things() -> (ApiHandle, Client) {
    start(ApiServerConfig {
        crds: vec![thing_crd()],
        ..Default::default()
    })
    .await
}

/// A raw request, for what kube-rs hides: status codes and headers.
async fn raw(
    api: &ApiHandle,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: Value,
) -> reqwest::Response {
    reqwest::Client::new()
        .request(method, format!("{}{path}", api.url()))
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .expect("request")
}

const THINGS: &str = "/apis/example.dev/v1/namespaces/default/things";

async fn start(config: ApiServerConfig) -> (ApiHandle, Client) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let api = spawn_api(config, listener).await.expect("start API");
    let client = api.client().await.expect("client");
    (api, client)
}

async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, future)
        .await
        .expect("test finished in time")
}

#[tokio::test]
async fn the_kubernetes_service_and_nodes_are_served() {
    bounded(async {
        let (api, client) = start(ApiServerConfig::default()).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let kubernetes = services
            .get("kubernetes")
            .await
            .expect("default/kubernetes");
        let port = &kubernetes.spec.expect("spec").ports.expect("ports")[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("https"), 443));

        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "win-07", "finalizers": ["example.dev/offboard"]},
            "spec": {"providerID": "azure:///win-07"}
        }))
        .expect("node");
        let created = nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        let mut watch = nodes
            .watch(
                &WatchParams::default(),
                &created.resource_version().expect("rv"),
            )
            .await
            .expect("watch nodes")
            .boxed();
        nodes
            .delete("win-07", &DeleteParams::default())
            .await
            .expect("delete");
        let held = nodes.get("win-07").await.expect("held by its finalizer");
        assert!(held.metadata.deletion_timestamp.is_some());
        let release = json!({"metadata": {"finalizers": null}});
        nodes
            .patch("win-07", &PatchParams::default(), &Patch::Merge(&release))
            .await
            .expect("remove finalizer");
        let mut kinds = Vec::new();
        while let Some(event) = watch.try_next().await.expect("watch event") {
            let last = matches!(event, WatchEvent::Deleted(_));
            kinds.push(match event {
                WatchEvent::Added(_) => "ADDED",
                WatchEvent::Modified(_) => "MODIFIED",
                WatchEvent::Deleted(_) => "DELETED",
                _ => "OTHER",
            });
            if last {
                break;
            }
        }
        assert_eq!(kinds, ["MODIFIED", "DELETED"]);
        assert!(nodes.get_opt("win-07").await.expect("get").is_none());
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_update_of_a_custom_resource_needs_a_resource_version() {
    bounded(async {
        let (api, client) = start_with_things().await;
        let things = things(&client);
        let created = things
            .create(&PostParams::default(), &thing("a", json!({"size": "s"})))
            .await
            .expect("create");
        for subresource in [None, Some("status")] {
            let mut blind = created.clone();
            blind.metadata.resource_version = None;
            let result = match subresource {
                None => things.replace("a", &PostParams::default(), &blind).await,
                Some(_) => {
                    things
                        .replace_status("a", &PostParams::default(), &blind)
                        .await
                }
            };
            let status = api_error(result);
            assert_eq!(
                (status.code, status.reason.as_str()),
                (422, "Invalid"),
                "{subresource:?}"
            );
            assert!(
                status.message.contains(
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
                ),
                "{}",
                status.message
            );
        }
        // Built-ins keep their unconditional update.
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let mut kubernetes = services.get("kubernetes").await.expect("get");
        kubernetes.metadata.resource_version = None;
        services
            .replace("kubernetes", &PostParams::default(), &kubernetes)
            .await
            .expect("unconditional update of a built-in");
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn marking_for_deletion_bumps_the_generation() {
    bounded(async {
        let (api, client) = start_with_things().await;
        let things = things(&client);
        let mut held = thing("held", json!({"size": "s"}));
        held.metadata.finalizers = Some(vec!["example.dev/hold".into()]);
        let created = things
            .create(&PostParams::default(), &held)
            .await
            .expect("create");
        assert_eq!(created.metadata.generation, Some(1));
        things
            .delete("held", &DeleteParams::default())
            .await
            .expect("delete");
        let terminating = things.get("held").await.expect("still there");
        assert!(terminating.metadata.deletion_timestamp.is_some());
        assert_eq!(terminating.metadata.generation, Some(2));
        // A second delete changes nothing.
        things
            .delete("held", &DeleteParams::default())
            .await
            .expect("delete again");
        assert_eq!(
            things.get("held").await.expect("get").metadata.generation,
            Some(2)
        );
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_strategic_merge_patch_of_a_custom_resource_is_unsupported() {
    bounded(async {
        let (api, client) = start_with_things().await;
        let things = things(&client);
        things
            .create(&PostParams::default(), &thing("a", json!({"size": "s"})))
            .await
            .expect("create");
        let patch = json!({"spec": {"size": "m"}});
        let status = api_error(
            things
                .patch(
                    "a",
                    &PatchParams::default(),
                    &Patch::Strategic(patch.clone()),
                )
                .await,
        );
        assert_eq!(
            (status.code, status.reason.as_str()),
            (415, "UnsupportedMediaType")
        );
        assert_eq!(
            things.get("a").await.expect("get").data["spec"]["size"],
            "s"
        );
        things
            .patch("a", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("a merge patch works");
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_server_side_apply_that_creates_answers_created() {
    bounded(async {
        let (api, _client) = start_with_things().await;
        let body = json!({"apiVersion": "example.dev/v1", "kind": "Thing",
            "metadata": {"name": "applied"}, "spec": {"size": "s"}});
        let path = format!("{THINGS}/applied?fieldManager=test");
        let first = raw(
            &api,
            reqwest::Method::PATCH,
            &path,
            "application/apply-patch+yaml",
            body.clone(),
        )
        .await;
        assert_eq!(first.status().as_u16(), 201);
        let again = raw(
            &api,
            reqwest::Method::PATCH,
            &path,
            "application/apply-patch+yaml",
            body,
        )
        .await;
        assert_eq!(again.status().as_u16(), 200);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn lists_are_paged_at_one_version_and_stale_tokens_expire() {
    bounded(async {
        let (api, client) = start(ApiServerConfig {
            crds: vec![thing_crd()],
            watch_history: 4,
            ..Default::default()
        })
        .await;
        let things = things(&client);
        for i in 0..5 {
            things
                .create(&PostParams::default(), &thing(&format!("t{i}"), json!({})))
                .await
                .expect("create");
        }
        let first = things
            .list(&ListParams::default().limit(2))
            .await
            .expect("page 1");
        let names = |list: &kube::api::ObjectList<DynamicObject>| {
            list.items.iter().map(|o| o.name_any()).collect::<Vec<_>>()
        };
        assert_eq!(names(&first), ["t0", "t1"]);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let token = first.metadata.continue_.clone().expect("a continue token");
        // Later pages show the list as it was when the first page was read.
        things
            .delete("t3", &DeleteParams::default())
            .await
            .expect("delete");
        let second = things
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .expect("page 2");
        assert_eq!(names(&second), ["t2", "t3"]);
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );
        let last = things
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token(second.metadata.continue_.as_deref().expect("more")),
            )
            .await
            .expect("page 3");
        assert_eq!(names(&last), ["t4"]);
        assert!(last.metadata.continue_.as_deref().is_none_or(str::is_empty));

        // Once the first page's version has left the history, its token is refused.
        for i in 0..5 {
            let patch = json!({"metadata": {"labels": {"i": i.to_string()}}});
            things
                .patch("t0", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("patch");
        }
        let status = api_error(
            things
                .list(&ListParams::default().limit(2).continue_token(&token))
                .await,
        );
        assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));

        // kube-runtime's watcher reads its initial list in pages.
        let seen: Vec<_> = kube::runtime::watcher(
            things.clone(),
            kube::runtime::watcher::Config::default().page_size(1),
        )
        .take_while(|e| {
            std::future::ready(!matches!(e, Ok(kube::runtime::watcher::Event::InitDone)))
        })
        .filter_map(|e| {
            std::future::ready(match e {
                Ok(kube::runtime::watcher::Event::InitApply(o)) => Some(o.name_any()),
                _ => None,
            })
        })
        .collect()
        .await;
        assert_eq!(seen, ["t0", "t1", "t2", "t4"]);
        api.shutdown().await;
    })
    .await;
}
