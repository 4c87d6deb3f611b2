//! In-memory Kubernetes API double for `defender-offboard dev` and tests.
//!
//! It serves custom resources from CRDs plus the built-ins the operator and
//! kubectl use (namespaces, nodes, component statuses, secrets, configmaps,
//! service accounts, services with `default/kubernetes`, events in `v1` and
//! `events.k8s.io/v1`, leases, CRDs) over plain HTTP on loopback, with
//! kube-apiserver's semantics where clients depend on them: resourceVersions,
//! paged lists, list/watch with bookmarks and the in-stream `410 Expired`, the
//! status, scale and ServiceAccount `token` subresources (TokenRequest, as Entra
//! Workload ID uses), `generation`, optimistic concurrency, patches, schema and CEL
//! validation with unknown-field warnings, legacy and aggregated discovery,
//! OpenAPI and the Table form.
//!
//! Known differences from kube-apiserver (none of which the operator,
//! kube-rs or kubectl's commands used here rely on):
//! - no authentication or authorization, no admission, no TLS;
//! - ServiceAccount tokens have kube's claims but a random signature: no
//!   `TokenReview`, no OIDC discovery, and `boundObjectRef` is not checked;
//! - built-ins are stored as sent: no schema, defaults or validation beyond
//!   what `events.k8s.io/v1` requires; no pods, workloads or kubelet;
//! - server-side apply is approximated (see `patch`): lists are atomic, and
//!   non-apply writes own the leaf fields they change; no apply to `/scale`;
//! - no garbage collection of dependents (`ownerReferences`), and
//!   `propagationPolicy` is accepted but ignored; a deleted namespace turns
//!   `Terminating` and is emptied half a second later;
//! - CRD versions share one store without conversion; validation covers the
//!   structural-schema keywords and CEL rules the project's CRD uses;
//! - the watch history per resource is kube-apiserver's watch cache window by
//!   default ([`WatchHistory::KUBE_WATCH_CACHE`]: the newest 100 changes, and
//!   every change of the last 75 s up to 102,400), without its power-of-two
//!   resizing; `--watch-history N` keeps exactly N instead, and
//!   `POST /_dev/compact` forgets it on demand;
//! - a watch from a resourceVersion newer than the server's answers `410`
//!   (kube-apiserver times out and clients relist; kube-rs relists on 410);
//! - `resourceVersionMatch` and `resourceVersion` on lists are ignored (every
//!   first page is read at the newest version).

mod discovery;
mod events;
mod holds;
mod http;
pub mod kubeconfig;
mod lifecycle;
mod openapi;
mod ops;
mod paging;
mod patch;
mod protobuf;
mod registry;
mod scale;
mod selector;
mod state;
mod status;
mod store;
mod table;
mod token;
mod validation;
mod watch;

pub use store::WatchHistory;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How the in-memory API is set up.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// CRDs served from the start (more can be created through the API).
    pub crds: Vec<CustomResourceDefinition>,
    /// Changes kept per resource for watches that resume from a resourceVersion; older → `410 Gone`.
    /// Kube-apiserver's watch cache window by default.
    pub watch_history: WatchHistory,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Namespaces created at start besides `default` and `kube-system`.
    pub namespaces: Vec<String>,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            crds: Vec::new(),
            watch_history: WatchHistory::default(),
            bookmark_interval: Duration::from_secs(60),
            namespaces: Vec::new(),
        }
    }
}

/// A running API; dropping it does not stop it, call [`ApiHandle::shutdown`].
#[derive(Debug)]
pub struct ApiHandle {
    addr: SocketAddr,
    shared: Arc<ops::Shared>,
    server: JoinHandle<std::io::Result<()>>,
}

impl ApiHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (context and user `defender-offboard-dev`, namespace `default`).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig::kubeconfig_yaml(&self.url())
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// A kube-rs client for this API (default namespace `default`).
    pub async fn client(&self) -> kube::Result<kube::Client> {
        let url = self
            .url()
            .parse()
            .expect("a socket address always forms a valid URL");
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        kube::Client::try_from(config)
    }

    /// Forget the watch history and end open watches (as `POST /_dev/compact` does):
    /// clients that resume from the version they last saw get `410 Expired` and relist.
    pub fn compact(&self) {
        self.shared.compact();
    }

    /// Hold every list of `plural` whose `labelSelector` is exactly
    /// `label_selector` (empty: lists without one) until
    /// [`ApiHandle::release_lists`]. Watches are not held.
    pub fn hold_lists(&self, plural: &str, label_selector: &str) {
        self.shared.holds.hold(plural, label_selector);
    }

    pub fn release_lists(&self) {
        self.shared.holds.release_all();
    }

    /// How many list requests have been held so far.
    pub fn lists_held(&self) -> u64 {
        self.shared.holds.waited()
    }

    /// Stop serving: end open watches and wait for the server to finish.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

/// Start the API on `listener` (bind it to `127.0.0.1:0` for tests).
pub async fn spawn_api(
    config: ApiServerConfig,
    listener: TcpListener,
) -> std::io::Result<ApiHandle> {
    let addr = listener.local_addr()?;
    let shared = Arc::new(ops::Shared::new(
        registry::Registry::with_builtins(),
        config.watch_history.max_changes,
        config.bookmark_interval,
    ));
    shared.lock().store.set_history(config.watch_history);
    let registry = shared.registry();
    let namespaces = registry
        .find("", "v1", "namespaces")
        .expect("namespaces are built in");
    let crds = registry
        .find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("CRDs are built in");
    let mut names = vec!["default".to_string(), "kube-system".to_string()];
    names.extend(config.namespaces.iter().cloned());
    for name in names {
        seed(&shared, &namespaces, json!({"metadata": {"name": name}}))?;
    }
    let services = registry
        .find("", "v1", "services")
        .expect("services are built in");
    seed(&shared, &services, kubernetes_service(addr))?;
    let statuses = registry
        .find("", "v1", "componentstatuses")
        .expect("component statuses are built in");
    // kube-apiserver still reports these (deprecated); kube-rs's recorder tests read one.
    for component in ["controller-manager", "scheduler", "etcd-0"] {
        let healthy = json!({"type": "Healthy", "status": "True", "message": "ok"});
        seed(
            &shared,
            &statuses,
            json!({"metadata": {"name": component}, "conditions": [healthy]}),
        )?;
    }
    for crd in &config.crds {
        let object = serde_json::to_value(crd).map_err(std::io::Error::other)?;
        seed(&shared, &crds, object)?;
    }
    let app = Arc::new(http::App {
        shared: shared.clone(),
        addr,
    });
    let shutdown = shared.shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, http::router(app))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok(ApiHandle {
        addr,
        shared,
        server,
    })
}

/// The `default/kubernetes` Service every cluster has; clients read it to find the API.
fn kubernetes_service(addr: SocketAddr) -> serde_json::Value {
    json!({
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": addr.ip().to_string(),
            "clusterIPs": [addr.ip().to_string()],
            "ipFamilies": [if addr.is_ipv4() { "IPv4" } else { "IPv6" }],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": addr.port()}],
            "sessionAffinity": "None",
        },
        "status": {"loadBalancer": {}},
    })
}

fn seed(
    shared: &ops::Shared,
    rt: &registry::ResourceType,
    object: serde_json::Value,
) -> std::io::Result<()> {
    shared
        .seed(rt, object)
        .map(|_| ())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))
}
