//! Behaviours of kube-apiserver 1.32 that the in-memory API must share so that a
//! bug a real cluster exposes also shows here (issue 10's list), each checked
//! through a real client.

use devcluster::{ApiHandle, ApiServerConfig, WatchHistory, spawn_api};
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

        let statuses: Api<k8s_openapi::api::core::v1::ComponentStatus> = Api::all(client.clone());
        statuses
            .get("scheduler")
            .await
            .expect("the scheduler's component status");

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
            watch_history: WatchHistory::changes(4),
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

fn expired_watches(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("devcluster_watch_expired_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the counter is exported")
}

#[tokio::test]
async fn an_expired_watch_gets_an_in_stream_410_and_the_watcher_relists() {
    use kube::runtime::watcher::{self, Event};
    bounded(async {
        let (api, client) = start(ApiServerConfig {
            crds: vec![thing_crd()],
            watch_history: WatchHistory::changes(2),
            ..Default::default()
        })
        .await;
        let things = things(&client);
        for name in ["a", "b"] {
            things
                .create(&PostParams::default(), &thing(name, json!({})))
                .await
                .expect("create");
        }
        let mut stream = watcher::watcher(things.clone(), watcher::Config::default()).boxed();
        let mut init = Vec::new();
        loop {
            match stream.try_next().await.expect("watcher").expect("event") {
                Event::InitApply(o) => init.push(o.name_any()),
                Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(init, ["a", "b"]);
        // While the watcher is not polled: a deletion, a creation, then compaction.
        things
            .delete("b", &DeleteParams::default())
            .await
            .expect("delete");
        things
            .create(&PostParams::default(), &thing("c", json!({})))
            .await
            .expect("create");
        let from = things
            .list(&ListParams::default())
            .await
            .expect("list")
            .metadata
            .resource_version
            .expect("rv");
        api.compact();
        // A raw watch from a version before the compaction: 200 and one ERROR event with a 410 Status.
        let old = raw(
            &api,
            reqwest::Method::GET,
            &format!("{THINGS}?watch=true&resourceVersion=1"),
            "application/json",
            json!(null),
        )
        .await;
        assert_eq!(old.status().as_u16(), 200);
        let text = old.text().await.expect("body");
        let event: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("one event")).expect("json");
        assert_eq!(event["type"], "ERROR", "{text}");
        assert_eq!(
            (
                event["object"]["kind"].as_str(),
                event["object"]["code"].as_i64(),
                event["object"]["reason"].as_str()
            ),
            (Some("Status"), Some(410), Some("Expired"))
        );
        // The watcher's open watch ended; resuming is refused, so it lists again:
        // b's deletion shows only as its absence from the new list.
        let mut after = Vec::new();
        loop {
            match stream.next().await.expect("the watcher goes on") {
                Err(watcher::Error::WatchError(status)) => {
                    after.push(format!("Error {}", status.code))
                }
                Err(other) => panic!("watcher: {other}"),
                Ok(Event::Init) => after.push("Init".to_string()),
                Ok(Event::InitApply(o)) => after.push(o.name_any()),
                Ok(Event::InitDone) => break,
                Ok(Event::Apply(o)) => after.push(format!("Apply {}", o.name_any())),
                Ok(Event::Delete(o)) => after.push(format!("Delete {}", o.name_any())),
            }
        }
        assert_eq!(after, ["Error 410", "Init", "a", "c"]);
        let metrics = raw(
            &api,
            reqwest::Method::GET,
            "/metrics",
            "text/plain",
            json!(null),
        )
        .await
        .text()
        .await
        .expect("metrics");
        assert!(expired_watches(&metrics) >= 2, "{metrics}");
        // The current version stays valid after a compaction.
        let current = things
            .watch(&WatchParams::default().timeout(1), &from)
            .await
            .expect("watch")
            .boxed();
        let events: Vec<_> = current.try_collect().await.expect("events");
        assert!(
            events.iter().all(|e| !matches!(e, WatchEvent::Error(_))),
            "{events:?}"
        );
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_scale_subresource_reads_and_writes_the_crd_paths() {
    bounded(async {
        let (api, client) = start_with_things().await;
        let things = things(&client);
        things
            .create(&PostParams::default(), &thing("s", json!({"replicas": 2})))
            .await
            .expect("create");
        let status = json!({"status": {"replicas": 1, "selector": "app=s"}});
        things
            .patch_status("s", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("status");
        let scale = things.get_scale("s").await.expect("get scale");
        assert_eq!(scale.spec.as_ref().and_then(|s| s.replicas), Some(2));
        let scale_status = scale.status.clone().expect("status");
        assert_eq!(
            (scale_status.replicas, scale_status.selector.as_deref()),
            (1, Some("app=s"))
        );

        let patched = things
            .patch_scale(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await
            .expect("patch scale");
        assert_eq!(patched.spec.and_then(|s| s.replicas), Some(3));
        let object = things.get("s").await.expect("get");
        assert_eq!(object.data["spec"]["replicas"], 3);
        assert_eq!(object.metadata.generation, Some(2));

        let mut stale = scale;
        stale.spec = Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(5) });
        let conflict = api_error(
            things
                .replace_scale("s", &PostParams::default(), &stale)
                .await,
        );
        assert_eq!(conflict.code, 409);
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn aggregated_discovery_is_served_to_those_who_ask() {
    use kube::discovery::{Discovery, Scope, verbs};
    bounded(async {
        let (api, client) = start_with_things().await;
        let core = client.list_core_api_versions_aggregated().await.expect("/api aggregated");
        let v1 = core.items[0].versions.iter().find(|v| v.version.as_deref() == Some("v1")).expect("core v1");
        let nodes = v1.resources.iter().find(|r| r.resource.as_deref() == Some("nodes")).expect("nodes");
        assert_eq!(nodes.scope.as_deref(), Some("Cluster"));
        assert!(nodes.verbs.iter().any(|v| v == "watch"));

        let discovery = Discovery::new(client.clone()).run_aggregated().await.expect("run_aggregated");
        let (thing, caps) = discovery.get("example.dev").expect("the CRD's group").recommended_kind("Thing").expect("Thing");
        assert_eq!((thing.plural.as_str(), caps.scope.clone()), ("things", Scope::Namespaced));
        assert!(caps.supports_operation(verbs::PATCH));
        let subresources: Vec<&str> = caps.subresources.iter().map(|(ar, _)| ar.plural.as_str()).collect();
        assert!(subresources.contains(&"things/status") || subresources.contains(&"status"), "{subresources:?}");
        let (service, _) = discovery.get("").expect("core").recommended_kind("Service").expect("Service");
        assert_eq!(service.plural, "services");

        let response = reqwest::Client::new()
            .get(format!("{}/apis", api.url()))
            .header("accept", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json")
            .send()
            .await
            .expect("GET /apis");
        let content_type = response.headers()["content-type"].to_str().expect("ascii").to_string();
        assert_eq!(content_type, "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList");
        let legacy: serde_json::Value = reqwest::get(format!("{}/apis", api.url())).await.expect("GET").json().await.expect("json");
        assert_eq!(legacy["kind"], "APIGroupList");
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn events_v1_need_an_event_time_a_known_type_and_a_reporting_controller() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event;
    bounded(async {
        let (api, client) = start(ApiServerConfig::default()).await;
        let events: Api<Event> = Api::namespaced(client.clone(), "default");
        let good = json!({
            "metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z",
            "type": "Normal", "reason": "Tested", "action": "Test", "note": "n",
            "reportingController": "example.dev/test", "reportingInstance": "test-1",
            "regarding": {"kind": "Namespace", "name": "default"},
        });
        let event = |patch: serde_json::Value| {
            let mut e = good.clone();
            json_patch::merge(&mut e, &patch);
            serde_json::from_value::<Event>(e).expect("event")
        };
        for (patch, field) in [
            (json!({"eventTime": null}), "eventTime"),
            (json!({"type": "Info"}), "type"),
            (json!({"reportingController": null}), "reportingController"),
        ] {
            let status = api_error(
                events
                    .create(&PostParams::default(), &event(patch.clone()))
                    .await,
            );
            assert_eq!(status.code, 422, "{patch}: {status:?}");
            let causes = status.details.expect("details").causes;
            assert!(
                causes.iter().any(|c| c.field == field),
                "{patch}: {causes:?}"
            );
        }
        events
            .create(&PostParams::default(), &event(json!({})))
            .await
            .expect("a complete event");
        // core/v1 stays as lenient as kube-apiserver's.
        let core: Api<CoreEvent> = Api::namespaced(client, "default");
        let legacy: CoreEvent = serde_json::from_value(json!({
            "metadata": {"name": "e2"}, "involvedObject": {"kind": "Namespace", "name": "default"},
            "reason": "Tested", "message": "m",
        }))
        .expect("core event");
        core.create(&PostParams::default(), &legacy)
            .await
            .expect("core/v1 event");
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_bookmark_comes_before_the_watch_times_out() {
    bounded(async {
        let (api, client) = start_with_things().await;
        let things = things(&client);
        let created = things
            .create(&PostParams::default(), &thing("b", json!({})))
            .await
            .expect("create");
        // Periodic bookmarks are a minute apart (the default); the watch lasts 4 s.
        let params = WatchParams::default().timeout(4); // bookmarks are allowed by default
        let mut stream = things
            .watch(&params, &created.resource_version().expect("rv"))
            .await
            .expect("watch")
            .boxed();
        match stream.try_next().await.expect("event") {
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("expected a bookmark first, got {other:?}"),
        }
        // The watch is still open after that bookmark: it was not the end of the stream.
        let patch = json!({"metadata": {"labels": {"after": "bookmark"}}});
        things
            .patch("b", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch");
        match stream.try_next().await.expect("event") {
            Some(WatchEvent::Modified(o)) => assert_eq!(o.labels()["after"], "bookmark"),
            other => panic!("expected the change on the same watch, got {other:?}"),
        }
        api.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pruned_unknown_fields_are_reported_as_warnings() {
    bounded(async {
        let (api, _client) = start_with_things().await;
        let body = |name: &str| {
            json!({"apiVersion": "example.dev/v1", "kind": "Thing",
                "metadata": {"name": name}, "spec": {"size": "s", "colour": "red"}})
        };
        let warned = raw(
            &api,
            reqwest::Method::POST,
            THINGS,
            "application/json",
            body("w"),
        )
        .await;
        assert_eq!(warned.status().as_u16(), 201);
        let warnings: Vec<&str> = warned
            .headers()
            .get_all("warning")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(warnings, [r#"299 - "unknown field \"spec.colour\"""#]);
        let stored: serde_json::Value = warned.json().await.expect("json");
        assert!(stored["spec"].get("colour").is_none(), "pruned: {stored}");

        let path = format!("{THINGS}?fieldValidation=Ignore");
        let quiet = raw(
            &api,
            reqwest::Method::POST,
            &path,
            "application/json",
            body("q"),
        )
        .await;
        assert_eq!(quiet.status().as_u16(), 201);
        assert!(quiet.headers().get("warning").is_none());
        api.shutdown().await;
    })
    .await;
}
