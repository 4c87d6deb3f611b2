//! Node offboarding (`run --offboard-deleted-nodes`): when a Node matching
//! `--node-selector` is deleted, create a `DeviceOffboard` for its device.
//!
//! No deletion is missed across restarts or leader changes because the
//! operator puts a finalizer on every matching Node and removes it only once
//! the `DeviceOffboard` exists: a Node deleted while no operator runs stays
//! `Terminating` until one does. No deletion is blocked longer than
//! `--node-finalizer-max-age` while an operator runs: past it, the finalizer
//! is removed even if the `DeviceOffboard` could not be created (counted as
//! `released`). Uninstalling runs `run --remove-node-finalizers` (the chart's
//! pre-delete hook), which records the offboards of Nodes already being
//! deleted and then removes every finalizer of the operator.
//!
//! The `DeviceOffboard` records the Node's identity (`spec.node`: name, uid,
//! `spec.providerID`, `status.nodeInfo.systemUUID`), read from the full Node
//! while the finalizer still holds it: the device is then found by its cloud
//! identity (`--node-identity`), and the offboard waits
//! `--node-offboard-grace` in case the Node comes back. That wait is the
//! `DeviceOffboard`'s, never the Node's: the finalizer goes as soon as the
//! record exists.
//!
//! The work is level-based: a metadata-only watch of all Nodes (labels may
//! change, so no server-side selector), one decision per Node
//! ([`decide`]), and a pass over every Node on an interval so a failed step
//! is retried.

use crate::crd::{DeviceOffboard, DeviceOffboardSpec, MAX_COMMENT_LEN, NodeIdentity};
use crate::metrics::{Metrics, ResultLabels};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The operator's finalizer on matching Nodes.
pub const NODE_FINALIZER: &str = "defender.offboard.dev/offboard-device";
/// Label on a node's `DeviceOffboard`: the Node's uid (always fits a label value).
pub const NODE_UID_LABEL: &str = "defender.offboard.dev/node-uid";
/// Label on a node's `DeviceOffboard`: the Node's name, when it fits a label value.
pub const NODE_NAME_LABEL: &str = "defender.offboard.dev/node";
/// Annotation on a node's `DeviceOffboard`: the Node's name, always.
pub const NODE_NAME_ANNOTATION: &str = "defender.offboard.dev/node";
/// The placeholder of `--node-device-name`.
pub const NAME_PLACEHOLDER: &str = "{name}";

/// One requirement of an equality-based label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// An equality-based label selector, as `kubectl get -l` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSelector(pub Vec<Requirement>);

impl NodeSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim) {
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else {
                Requirement::Exists(part.to_string())
            };
            let (Requirement::Equals(key, _)
            | Requirement::NotEquals(key, _)
            | Requirement::Exists(key)
            | Requirement::NotExists(key)) = &requirement;
            let bad = |c: char| c.is_whitespace() || "()=!,".contains(c);
            if key.is_empty() || key.contains(bad) {
                return Err(format!(
                    "{part:?} is not a label requirement: use key=value, key!=value, key or !key \
                     (set-based `in`/`notin` are not supported)"
                ));
            }
            if let Requirement::Equals(_, v) | Requirement::NotEquals(_, v) = &requirement
                && v.contains(bad)
            {
                return Err(format!(
                    "{part:?}: a label value cannot contain spaces or ()=!,"
                ));
            }
            requirements.push(requirement);
        }
        Ok(NodeSelector(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// How a Node's name becomes the device's `computerDnsName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNameTemplate(String);

impl DeviceNameTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.matches(NAME_PLACEHOLDER).count() != 1 {
            return Err(format!(
                "{text:?} must contain {NAME_PLACEHOLDER} once, e.g. {NAME_PLACEHOLDER}.corp.contoso.com"
            ));
        }
        let template = DeviceNameTemplate(text.to_string());
        template
            .render("node")
            .map(|_| template.clone())
            .map_err(|e| format!("{text:?}: {e}"))
    }

    /// The device name for `node`, or why the CRD would refuse it.
    pub fn render(&self, node: &str) -> Result<String, String> {
        let name = self.0.replace(NAME_PLACEHOLDER, node);
        let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        let inner = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if name.len() <= 255 && inner && edge(name.chars().next()) && edge(name.chars().last()) {
            Ok(name)
        } else {
            Err(format!(
                "{name:?} is not a device name (letters, digits, '.', '_', '-', at most 255, starting and ending alphanumeric)"
            ))
        }
    }
}

/// The options node offboarding runs with, resolved from the flags.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub selector: NodeSelector,
    pub namespace: String,
    pub device_name: DeviceNameTemplate,
    pub ttl_seconds: Option<i64>,
    pub max_age: Duration,
}

/// What to do with one Node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStep {
    Nothing,
    AddFinalizer,
    /// It no longer matches: it will not be offboarded, so it is not held.
    RemoveFinalizer,
    /// Being deleted with our finalizer: create its `DeviceOffboard`, then
    /// remove the finalizer. `past_bound`: remove it even if creation fails.
    Offboard {
        past_bound: bool,
    },
}

/// The decision for one Node, from its metadata.
pub fn decide(meta: &ObjectMeta, options: &NodeOptions, now: Timestamp) -> NodeStep {
    let held = meta
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == NODE_FINALIZER));
    let empty = BTreeMap::new();
    let matches = options
        .selector
        .matches(meta.labels.as_ref().unwrap_or(&empty));
    match (&meta.deletion_timestamp, held) {
        (Some(since), true) => {
            let age = Duration::try_from(now.duration_since(since.0)).unwrap_or_default();
            NodeStep::Offboard {
                past_bound: age >= options.max_age,
            }
        }
        (Some(_), false) => NodeStep::Nothing,
        (None, false) if matches => NodeStep::AddFinalizer,
        (None, true) if !matches => NodeStep::RemoveFinalizer,
        (None, _) => NodeStep::Nothing,
    }
}

/// The name of a Node's `DeviceOffboard`: the Node's name; when that name is
/// taken by the record of an earlier Node of the same name, the name with
/// the start of this Node's uid appended (kept within 253 characters).
pub fn offboard_name(node: &str, uid: &str, taken_by_earlier_node: bool) -> String {
    if !taken_by_earlier_node {
        return node.to_string();
    }
    let suffix: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let base: String = node.chars().take(253 - suffix.len() - 1).collect();
    format!("{}-{suffix}", base.trim_end_matches(['-', '.']))
}

/// The CRD's limits on `spec.node.providerID` and `spec.node.systemUUID`:
/// a longer value is left out rather than have the record refused.
const MAX_PROVIDER_ID_LEN: usize = 1024;
const MAX_SYSTEM_UUID_LEN: usize = 128;

/// What a deleted Node's `DeviceOffboard` records of it: name and uid from
/// the watch's metadata, the cloud identity from `full`, the Node as read by
/// name. A Node of another uid (the deleted one gone, a new one of the name)
/// or none at all leaves name and uid only.
pub fn identity_of(meta: &ObjectMeta, full: Option<&Node>) -> NodeIdentity {
    let uid = meta.uid.clone().unwrap_or_default();
    let full = full.filter(|n| n.metadata.uid.as_deref() == Some(uid.as_str()));
    let kept = |value: &str, max: usize| {
        let value = value.trim();
        (!value.is_empty() && value.len() <= max).then(|| value.to_string())
    };
    let provider_id = full
        .and_then(|n| n.spec.as_ref())
        .and_then(|s| s.provider_id.as_deref())
        .and_then(|p| kept(p, MAX_PROVIDER_ID_LEN));
    let system_uuid = full
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.node_info.as_ref())
        .and_then(|i| kept(&i.system_uuid, MAX_SYSTEM_UUID_LEN));
    NodeIdentity {
        name: meta.name.clone().unwrap_or_default(),
        uid,
        provider_id,
        system_uuid,
    }
}

/// The deleted Node's identity: the watch is metadata-only, so the full Node
/// is read (it still exists: the finalizer holds it). Not found: name and
/// uid only. Any other error is the caller's to retry.
pub async fn read_identity(
    client: &kube::Client,
    meta: &ObjectMeta,
) -> Result<NodeIdentity, String> {
    let api: Api<Node> = Api::all(client.clone());
    let name = meta.name.clone().unwrap_or_default();
    let full = api
        .get_opt(&name)
        .await
        .map_err(|e| format!("cannot read Node {name} for its providerID and systemUUID: {e}"))?;
    Ok(identity_of(meta, full.as_ref()))
}

/// The deleted Node's identity, or (when it cannot be read) its name and uid
/// alone: the uninstall hook must not stop at one Node. Under
/// `--node-identity required` such a record sends nothing.
async fn identity_or_name(client: &kube::Client, meta: &ObjectMeta) -> NodeIdentity {
    read_identity(client, meta).await.unwrap_or_else(|error| {
        tracing::warn!(node = %meta.name.as_deref().unwrap_or_default(), %error, "recording the deleted Node by name and uid only");
        identity_of(meta, None)
    })
}

/// The `DeviceOffboard` for a deleted Node.
pub fn offboard_for(
    meta: &ObjectMeta,
    identity: &NodeIdentity,
    options: &NodeOptions,
    name: &str,
) -> Result<DeviceOffboard, String> {
    let node = identity.name.clone();
    let uid = identity.uid.clone();
    let device = options.device_name.render(&node)?;
    let since = meta
        .deletion_timestamp
        .as_ref()
        .map_or_else(|| "just now".to_string(), |t| t.0.to_string());
    let mut comment = format!(
        "Kubernetes Node {node} (uid {uid}) was deleted from the cluster at {since}; \
         its device is offboarded by defender-offboard node offboarding"
    );
    comment.truncate(MAX_COMMENT_LEN);
    let mut labels = BTreeMap::from([(NODE_UID_LABEL.to_string(), uid)]);
    if node.len() <= 63 {
        labels.insert(NODE_NAME_LABEL.to_string(), node.clone());
    }
    let mut resource = DeviceOffboard::new(
        name,
        DeviceOffboardSpec {
            machine_id: None,
            device_name: Some(device),
            comment,
            ttl_seconds_after_finished: options.ttl_seconds,
            connection_ref: None,
            node: Some(identity.clone()),
        },
    );
    resource.metadata.namespace = Some(options.namespace.clone());
    resource.metadata.labels = Some(labels);
    resource.metadata.annotations =
        Some(BTreeMap::from([(NODE_NAME_ANNOTATION.to_string(), node)]));
    Ok(resource)
}

/// How one deleted Node's record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Created,
    Exists,
}

impl Recorded {
    fn label(self) -> &'static str {
        match self {
            Recorded::Created => "created",
            Recorded::Exists => "exists",
        }
    }
}

/// Create the Node's `DeviceOffboard` unless it exists (a retry, or another
/// replica before a leader change): at most one per Node uid.
pub async fn ensure_offboard(
    client: &kube::Client,
    meta: &ObjectMeta,
    identity: &NodeIdentity,
    options: &NodeOptions,
) -> Result<Recorded, String> {
    let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), &options.namespace);
    let node = meta.name.clone().unwrap_or_default();
    let uid = meta.uid.clone().unwrap_or_default();
    for taken in [false, true] {
        let name = offboard_name(&node, &uid, taken);
        let resource = offboard_for(meta, identity, options, &name)?;
        match api.create(&PostParams::default(), &resource).await {
            Ok(_) => return Ok(Recorded::Created),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = api.get(&name).await.map_err(|e| e.to_string())?;
                if existing.labels().get(NODE_UID_LABEL) == Some(&uid) {
                    return Ok(Recorded::Exists);
                }
            }
            Err(error) => return Err(error.to_string()),
        }
    }
    Err(format!(
        "DeviceOffboards named {node} and {} exist for other Nodes",
        offboard_name(&node, &uid, true)
    ))
}

/// Replace the Node's finalizers, with its resourceVersion as a precondition.
async fn set_finalizers(
    api: &Api<Node>,
    meta: &ObjectMeta,
    finalizers: Vec<String>,
) -> Result<(), kube::Error> {
    let patch =
        json!({"metadata": {"resourceVersion": meta.resource_version, "finalizers": finalizers}});
    let params = PatchParams {
        field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch_metadata(
        &meta.name.clone().unwrap_or_default(),
        &params,
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

fn with_finalizer(meta: &ObjectMeta) -> Vec<String> {
    let mut list = meta.finalizers.clone().unwrap_or_default();
    list.push(NODE_FINALIZER.to_string());
    list
}

fn without_finalizer(meta: &ObjectMeta) -> Vec<String> {
    let mut list = meta.finalizers.clone().unwrap_or_default();
    list.retain(|f| f != NODE_FINALIZER);
    list
}

fn count(metrics: &Metrics, result: &str) {
    metrics
        .node_offboards
        .get_or_create(&ResultLabels {
            result: result.to_string(),
        })
        .inc();
}

/// Carry out the decision for one Node. Errors are logged; the next pass retries.
pub async fn handle(
    client: &kube::Client,
    meta: &ObjectMeta,
    options: &NodeOptions,
    metrics: &Metrics,
) {
    let api: Api<Node> = Api::all(client.clone());
    let node = meta.name.clone().unwrap_or_default();
    let written = match decide(meta, options, Timestamp::now()) {
        NodeStep::Nothing => return,
        NodeStep::AddFinalizer => set_finalizers(&api, meta, with_finalizer(meta)).await,
        NodeStep::RemoveFinalizer => set_finalizers(&api, meta, without_finalizer(meta)).await,
        NodeStep::Offboard { past_bound } => {
            let identity = match read_identity(client, meta).await {
                Ok(identity) => identity,
                // Past the bound the Node is not held for its identity either.
                Err(error) if past_bound => {
                    tracing::warn!(%node, %error, "could not read the deleted Node within the bound; recording it by name and uid only");
                    identity_of(meta, None)
                }
                Err(error) => {
                    tracing::warn!(%node, %error, "could not read the deleted Node; retrying");
                    count(metrics, "error");
                    return;
                }
            };
            match ensure_offboard(client, meta, &identity, options).await {
                Ok(recorded) => {
                    tracing::info!(%node, result = recorded.label(), namespace = %options.namespace, "deleted Node: its DeviceOffboard is recorded");
                    count(metrics, recorded.label());
                    set_finalizers(&api, meta, without_finalizer(meta)).await
                }
                Err(error) if past_bound => {
                    tracing::error!(%node, %error, bound = ?options.max_age, "could not record the deleted Node's DeviceOffboard within the bound; releasing the Node: offboard its device by hand");
                    count(metrics, "released");
                    set_finalizers(&api, meta, without_finalizer(meta)).await
                }
                Err(error) => {
                    tracing::warn!(%node, %error, "could not record the deleted Node's DeviceOffboard; retrying");
                    count(metrics, "error");
                    return;
                }
            }
        }
    };
    match written {
        Ok(()) => {}
        // Gone, or changed since read: the watch brings the new state.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(error) => {
            tracing::warn!(%node, %error, "could not update the Node's finalizers; retrying")
        }
    }
}

/// How often every Node is looked at again (retries, and the bound).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// Watch Nodes and handle each change, plus a pass over all of them every
/// `retry`, until dropped.
pub async fn run(
    client: kube::Client,
    options: NodeOptions,
    metrics: Arc<Metrics>,
    retry: Duration,
) {
    // Metadata only: a Node's status (images, conditions) is large and unused.
    let api: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
    let (reader, writer) = reflector::store::<PartialObjectMeta<Node>>();
    let mut changes = std::pin::pin!(
        reflector(
            writer,
            watcher(
                api,
                watcher::Config::default().page_size(crate::pages::FULL_OBJECT_PAGE)
            )
            // Node annotations are written by many agents and never read here.
            .modify(|node| {
                node.metadata.managed_fields = None;
                node.metadata.annotations = None;
            })
        )
        .default_backoff()
        .applied_objects()
    );
    let mut tick = tokio::time::interval(retry);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(node)) => handle(&client, node.meta(), &options, &metrics).await,
                Some(Err(error)) => tracing::warn!(%error, "watching Nodes failed; retrying"),
                None => return,
            },
            _ = tick.tick() => {
                for node in reader.state() {
                    handle(&client, node.meta(), &options, &metrics).await;
                }
            }
        }
    }
}

/// `run --remove-node-finalizers`: optionally stop the operator's Deployment,
/// record the offboards of Nodes already being deleted, then remove the
/// operator's finalizer from every Node. Returns how many Nodes were released.
pub async fn remove_finalizers(
    client: &kube::Client,
    options: &NodeOptions,
    stop: Option<(&str, &str)>,
    metrics: &Metrics,
) -> Result<usize, String> {
    if let Some((namespace, name)) = stop {
        stop_deployment(client, namespace, name).await?;
    }
    let api: Api<Node> = Api::all(client.clone());
    let mut released = 0;
    let mut pages = crate::pages::Pages::new(500);
    loop {
        let page = api
            .list_metadata(pages.params())
            .await
            .map_err(|e| format!("cannot list Nodes: {e}"))?;
        for node in &page.items {
            let meta = node.meta();
            if !meta
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == NODE_FINALIZER))
            {
                continue;
            }
            if meta.deletion_timestamp.is_some() {
                let identity = identity_or_name(client, meta).await;
                match ensure_offboard(client, meta, &identity, options).await {
                    Ok(recorded) => count(metrics, recorded.label()),
                    Err(error) => {
                        tracing::error!(node = %node.name_any(), %error, "uninstall: could not record the deleted Node's DeviceOffboard; offboard its device by hand");
                        count(metrics, "released");
                    }
                }
            }
            match set_finalizers(&api, meta, without_finalizer(meta)).await {
                Ok(()) => released += 1,
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    return Err(format!(
                        "cannot remove the finalizer of Node {}: {error}",
                        node.name_any()
                    ));
                }
            }
        }
        if !pages.advance(page.metadata.continue_) {
            return Ok(released);
        }
    }
}

/// Scale the operator's Deployment to zero and wait until no replica is left
/// (at most two minutes), so none adds a finalizer after they are removed.
async fn stop_deployment(client: &kube::Client, namespace: &str, name: &str) -> Result<(), String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"spec": {"replicas": 0}});
    match api
        .patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(error) => {
            return Err(format!(
                "cannot scale Deployment {namespace}/{name} to 0: {error}"
            ));
        }
    }
    for _ in 0..120 {
        match api.get(name).await {
            Ok(d) if d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0) == 0 => return Ok(()),
            Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(error) => {
                return Err(format!(
                    "cannot read Deployment {namespace}/{name}: {error}"
                ));
            }
        }
    }
    Err(format!(
        "Deployment {namespace}/{name} still has replicas after 2 minutes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn options() -> NodeOptions {
        NodeOptions {
            selector: NodeSelector::parse("kubernetes.io/os=windows").unwrap(),
            namespace: "defender-offboard".into(),
            device_name: DeviceNameTemplate::parse(NAME_PLACEHOLDER).unwrap(),
            ttl_seconds: Some(86400),
            max_age: Duration::from_secs(600),
        }
    }

    fn now() -> Timestamp {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    fn node(os: &str, held: bool, deleted_secs_ago: Option<i64>) -> ObjectMeta {
        ObjectMeta {
            name: Some("win-node-1".into()),
            uid: Some("0f3c2a1b-aaaa-bbbb-cccc-000000000001".into()),
            labels: Some(BTreeMap::from([("kubernetes.io/os".into(), os.into())])),
            finalizers: held.then(|| vec!["other/keep".into(), NODE_FINALIZER.into()]),
            deletion_timestamp: deleted_secs_ago
                .map(|s| Time(now() - jiff::SignedDuration::from_secs(s))),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn decisions() {
        use NodeStep::*;
        let o = options();
        let rows = [
            ("windows, new", node("windows", false, None), AddFinalizer),
            ("windows, held", node("windows", true, None), Nothing),
            ("linux", node("linux", false, None), Nothing),
            (
                "relabelled to linux, held",
                node("linux", true, None),
                RemoveFinalizer,
            ),
            (
                "deleted, held",
                node("windows", true, Some(5)),
                Offboard { past_bound: false },
            ),
            (
                "deleted long ago, held",
                node("windows", true, Some(600)),
                Offboard { past_bound: true },
            ),
            (
                "deleted, not ours",
                node("windows", false, Some(5)),
                Nothing,
            ),
            ("linux deleted", node("linux", false, Some(5)), Nothing),
        ];
        for (name, meta, expected) in rows {
            assert_eq!(decide(&meta, &o, now()), expected, "{name}");
        }
        // A Node without labels or finalizers at all.
        assert_eq!(decide(&ObjectMeta::default(), &o, now()), Nothing);
    }

    #[test]
    fn selectors_parse_and_match() {
        let s = NodeSelector::parse("kubernetes.io/os=windows, pool!=system,gpu,!spot").unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(s.matches(&labels(&[("kubernetes.io/os", "windows"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[
            ("kubernetes.io/os", "windows"),
            ("gpu", ""),
            ("spot", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("kubernetes.io/os", "windows"),
            ("gpu", ""),
            ("pool", "system")
        ])));
        assert!(!s.matches(&labels(&[("kubernetes.io/os", "linux"), ("gpu", "")])));
        for bad in ["", "os in (windows)", "a=b c", "=x", "!", "a,,b"] {
            assert!(NodeSelector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_names_follow_the_template() {
        let plain = DeviceNameTemplate::parse("{name}").unwrap();
        assert_eq!(plain.render("akswin000001").unwrap(), "akswin000001");
        let fqdn = DeviceNameTemplate::parse("{name}.corp.contoso.com").unwrap();
        assert_eq!(
            fqdn.render("win-node-1").unwrap(),
            "win-node-1.corp.contoso.com"
        );
        for bad in ["", "node", "{name}{name}", "{name} x", "-{name}", "{name}."] {
            assert!(DeviceNameTemplate::parse(bad).is_err(), "{bad:?}");
        }
        assert!(plain.render(&"a".repeat(300)).is_err());
        assert!(plain.render("").is_err());
    }

    #[test]
    fn the_offboard_names_the_node_and_links_to_it() {
        let meta = node("windows", true, Some(5));
        let r = offboard_for(&meta, &identity_of(&meta, None), &options(), "win-node-1").unwrap();
        assert_eq!(r.metadata.name.as_deref(), Some("win-node-1"));
        assert_eq!(r.metadata.namespace.as_deref(), Some("defender-offboard"));
        assert_eq!(r.spec.device_name.as_deref(), Some("win-node-1"));
        assert_eq!(r.spec.ttl_seconds_after_finished, Some(86400));
        assert!(
            r.spec.comment.contains("Node win-node-1"),
            "{}",
            r.spec.comment
        );
        assert!(r.spec.comment.contains("deleted"), "{}", r.spec.comment);
        let labels = r.metadata.labels.unwrap();
        assert_eq!(
            labels[NODE_UID_LABEL],
            "0f3c2a1b-aaaa-bbbb-cccc-000000000001"
        );
        assert_eq!(labels[NODE_NAME_LABEL], "win-node-1");
    }

    fn full_node(uid: &str, provider_id: Option<&str>, system_uuid: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "win-node-1", "uid": uid},
            "spec": {"providerID": provider_id},
            "status": {"nodeInfo": {
                "systemUUID": system_uuid, "architecture": "amd64", "bootID": "b",
                "containerRuntimeVersion": "containerd://1.7", "kernelVersion": "10.0",
                "kubeProxyVersion": "v1.30", "kubeletVersion": "v1.30", "machineID": "m",
                "operatingSystem": "windows", "osImage": "Windows Server 2022"
            }}
        }))
        .unwrap()
    }

    const UID: &str = "0f3c2a1b-aaaa-bbbb-cccc-000000000001";
    const PROVIDER_ID: &str = "azure:///subscriptions/0000/resourceGroups/mc_rg/providers/Microsoft.Compute/virtualMachineScaleSets/akswin/virtualMachines/0";
    const SYSTEM_UUID: &str = "5c4b1f1e-9d2a-4a8e-8f3b-0d6c2e7a9b41";

    #[test]
    fn the_identity_comes_from_the_full_node_of_the_same_uid() {
        let meta = node("windows", true, Some(5));
        let read = full_node(UID, Some(PROVIDER_ID), SYSTEM_UUID);
        assert_eq!(
            identity_of(&meta, Some(&read)),
            NodeIdentity {
                name: "win-node-1".into(),
                uid: UID.into(),
                provider_id: Some(PROVIDER_ID.into()),
                system_uuid: Some(SYSTEM_UUID.into()),
            }
        );
        let by_name = NodeIdentity {
            name: "win-node-1".into(),
            uid: UID.into(),
            provider_id: None,
            system_uuid: None,
        };
        assert_eq!(identity_of(&meta, None), by_name, "not found");
        // Another Node of the name (a new uid) says nothing about this one.
        let other = full_node("another-uid", Some(PROVIDER_ID), SYSTEM_UUID);
        assert_eq!(identity_of(&meta, Some(&other)), by_name);
        // Empty or longer than the CRD allows: left out, the record is still made.
        let odd = full_node(UID, Some(""), &"u".repeat(129));
        assert_eq!(identity_of(&meta, Some(&odd)), by_name);
    }

    #[test]
    fn the_offboard_records_the_nodes_identity() {
        let meta = node("windows", true, Some(5));
        let identity = identity_of(&meta, Some(&full_node(UID, Some(PROVIDER_ID), SYSTEM_UUID)));
        let r = offboard_for(&meta, &identity, &options(), "win-node-1").unwrap();
        assert_eq!(r.spec.node.as_ref(), Some(&identity));
        // As the API server stores it: the identity survives a round trip.
        let stored: DeviceOffboard =
            serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(stored.spec.node, Some(identity));
    }

    #[test]
    fn a_name_taken_by_an_earlier_node_gets_the_uid() {
        assert_eq!(
            offboard_name("win-node-1", "0f3c2a1b-aaaa", false),
            "win-node-1"
        );
        assert_eq!(
            offboard_name("win-node-1", "0f3c2a1b-aaaa", true),
            "win-node-1-0f3c2a1b"
        );
        let long = "n".repeat(253);
        assert_eq!(offboard_name(&long, "0f3c2a1b-aaaa", true).len(), 253);
    }
}
