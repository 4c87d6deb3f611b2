//! Behaviours of kube-apiserver 1.32 that the in-memory API must share so that a
//! bug a real cluster exposes also shows here (issue 10's list), each checked
//! through a real client.

use devcluster::{ApiHandle, ApiServerConfig, spawn_api};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::time::Duration;
use tokio::net::TcpListener;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

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
