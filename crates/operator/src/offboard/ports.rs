//! The two edges of the reconcile: the MDE calls it makes ([`MdeCalls`]) and
//! the status writes and Events it makes ([`StatusStore`]). The controller
//! plugs in the MDE client and the Kubernetes API; the `offboard` command plugs
//! in the MDE client and a [`MemoryStore`]; unit tests plug in fakes, so the
//! whole step (budget → intent write → send → record) runs in milliseconds.

use super::decision::Note;
use crate::cache::final_label;
use crate::crd::{DeviceOffboard, DeviceOffboardStatus, NodeIdentity};
use crate::error::{Error, Result};
use crate::tenants::TenantClient;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use mde_client::limiter::Permit;
use mde_client::{DefenderClient, Machine, MachineAction, MdeError, RateLimits};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Mutex;

pub use crate::crd::FIELD_MANAGER;

/// The MDE calls of the reconcile and the poller.
/// The tenant's rate budget ([`TenantClient::budget`]) comes with it: the
/// offboard slot is reserved before the intent write.
pub trait MdeCalls: TenantClient {
    fn rate_limits(&self) -> &RateLimits;
    fn find_machines_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<Machine>, MdeError>> + Send;
    /// Make sure a token is at hand (cached, or fetched now), so the intent
    /// record is never written before a slow sign-in.
    fn sign_in(&self) -> impl Future<Output = Result<(), MdeError>> + Send;
    /// Every offboard action of the machine, oldest first, from a complete
    /// answer (every page read); any failure is an error, never "none".
    fn offboard_actions(
        &self,
        machine_id: &str,
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send;
    /// `POST /api/machines/{id}/offboard` in a reserved budget slot.
    fn offboard(
        &self,
        slot: Permit,
        machine_id: &str,
        comment: &str,
    ) -> impl Future<Output = Result<MachineAction, MdeError>> + Send;
    fn machine_actions_by_ids(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send;
    /// `GET /api/machineactions/{id}`: one action, for an id a batch left out.
    fn get_machine_action(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<MachineAction, MdeError>> + Send;
    /// `POST /api/machineactions/{id}/cancel` in a reserved budget slot.
    fn cancel_action(
        &self,
        slot: Permit,
        id: &str,
        comment: &str,
    ) -> impl Future<Output = Result<MachineAction, MdeError>> + Send;
    /// Every offboard action created since `since`, in pages of `top`: the
    /// poll of all actions in flight in one call per `top` actions.
    fn offboard_actions_since(
        &self,
        since: jiff::Timestamp,
        top: usize,
        expected: &[String],
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send;
    /// One page of [`Self::offboard_actions_since`] (`skip` actions in): the
    /// adopt index's fill reads page by page, each in its own budget slot.
    fn offboard_actions_page(
        &self,
        since: jiff::Timestamp,
        top: usize,
        skip: usize,
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send;
    /// `GET /api/machines/{id}`: the machine's `lastSeen`, read before a
    /// `Succeeded` offboard of another request is adopted.
    fn get_machine(&self, id: &str) -> impl Future<Output = Result<Machine, MdeError>> + Send;
}

impl MdeCalls for DefenderClient {
    fn rate_limits(&self) -> &RateLimits {
        DefenderClient::rate_limits(self)
    }

    fn find_machines_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<Machine>, MdeError>> + Send {
        DefenderClient::find_machines_by_name(self, name)
    }

    fn sign_in(&self) -> impl Future<Output = Result<(), MdeError>> + Send {
        self.check_sign_in()
    }

    fn offboard_actions(
        &self,
        machine_id: &str,
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send {
        DefenderClient::offboard_actions(self, machine_id)
    }

    fn offboard(
        &self,
        slot: Permit,
        machine_id: &str,
        comment: &str,
    ) -> impl Future<Output = Result<MachineAction, MdeError>> + Send {
        self.offboard_reserved(Some(slot), machine_id, comment)
    }

    fn machine_actions_by_ids(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send {
        DefenderClient::machine_actions_by_ids(self, ids)
    }

    fn get_machine_action(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<MachineAction, MdeError>> + Send {
        DefenderClient::get_machine_action(self, id)
    }

    fn cancel_action(
        &self,
        slot: Permit,
        id: &str,
        comment: &str,
    ) -> impl Future<Output = Result<MachineAction, MdeError>> + Send {
        DefenderClient::cancel_action(self, Some(slot), id, comment)
    }

    fn offboard_actions_since(
        &self,
        since: jiff::Timestamp,
        top: usize,
        expected: &[String],
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send {
        DefenderClient::offboard_actions_since(self, since, top, expected)
    }

    fn offboard_actions_page(
        &self,
        since: jiff::Timestamp,
        top: usize,
        skip: usize,
    ) -> impl Future<Output = Result<Vec<MachineAction>, MdeError>> + Send {
        DefenderClient::offboard_actions_page(self, since, top, skip)
    }

    fn get_machine(&self, id: &str) -> impl Future<Output = Result<Machine, MdeError>> + Send {
        DefenderClient::get_machine(self, id)
    }
}

/// Where the status lives, and where Events go.
pub trait StatusStore: Send + Sync {
    /// Write `status` with `current`'s resourceVersion as a precondition: a
    /// stale writer gets [`Error::Conflict`]. Returns the object as stored.
    fn write_status(
        &self,
        current: &DeviceOffboard,
        status: &DeviceOffboardStatus,
    ) -> impl Future<Output = Result<DeviceOffboard>> + Send;
    /// Label a final resource out of the controller's watch (see
    /// [`final_label`]), with `current`'s resourceVersion as a precondition.
    fn label_final(
        &self,
        current: &DeviceOffboard,
    ) -> impl Future<Output = Result<DeviceOffboard>> + Send;
    /// Tell a person (a Kubernetes Event; a line on stderr for the CLI).
    /// Never fails the reconcile: the status already carries the outcome.
    fn publish(&self, obj: &DeviceOffboard, note: &Note) -> impl Future<Output = ()> + Send;
    /// Why the deleted `node` counts as back (a Node of its name, or one
    /// with its cloud identity, exists now), or `None`: read before a
    /// deleted Node's device is resolved, never after a send.
    fn node_back(&self, node: &NodeIdentity)
    -> impl Future<Output = Result<Option<String>>> + Send;
}

/// Why the live Node `live` counts as the deleted `node` come back.
///
/// The deleted Node itself (same uid) is never "back": it stays, terminating,
/// until the Node handler has recorded its `DeviceOffboard` and removed the
/// finalizer, and a reconcile may read it in between. Nor is any other Node
/// that is being deleted: its device is leaving, not in use again.
pub fn node_is_back(node: &NodeIdentity, live: &Node) -> Option<String> {
    let name = live.metadata.name.as_deref().unwrap_or_default();
    let uid = live.metadata.uid.as_deref().unwrap_or_default();
    if uid == node.uid || live.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let same = |a: Option<&str>, b: Option<&str>| matches!((a, b), (Some(a), Some(b)) if !a.trim().is_empty() && a.eq_ignore_ascii_case(b));
    let provider_id = live.spec.as_ref().and_then(|s| s.provider_id.as_deref());
    let system_uuid = live
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.system_uuid.as_str());
    if name == node.name {
        Some(format!("a Node named {name:?} exists again (uid {uid})"))
    } else if same(provider_id, node.provider_id.as_deref()) {
        Some(format!(
            "Node {name:?} has the deleted Node's providerID {:?}",
            node.provider_id.as_deref().unwrap_or_default()
        ))
    } else if same(system_uuid, node.system_uuid.as_deref()) {
        Some(format!(
            "Node {name:?} has the deleted Node's systemUUID {:?}",
            node.system_uuid.as_deref().unwrap_or_default()
        ))
    } else {
        None
    }
}

/// Nodes are listed in pages of this many when a deleted Node's identity is
/// looked for (once per deleted Node, after its grace).
const NODE_PAGE: u32 = crate::pages::FULL_OBJECT_PAGE;

/// The Kubernetes API: status merge patches with a resourceVersion
/// precondition, Events through a recorder made for each one.
pub struct KubeStore {
    pub client: kube::Client,
    pub reporter: Reporter,
}

impl StatusStore for KubeStore {
    async fn write_status(
        &self,
        current: &DeviceOffboard,
        status: &DeviceOffboardStatus,
    ) -> Result<DeviceOffboard> {
        let api: Api<DeviceOffboard> = Api::namespaced(
            self.client.clone(),
            &current.namespace().unwrap_or_default(),
        );
        let old = current.status.clone().unwrap_or_default();
        let patch = status_patch(current.resource_version().as_deref(), &old, status);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        match api
            .patch_status(&current.name_any(), &params, &Patch::Merge(&patch))
            .await
        {
            Ok(updated) => Ok(updated),
            Err(kube::Error::Api(status)) if status.is_conflict() => Err(Error::Conflict),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    async fn label_final(&self, current: &DeviceOffboard) -> Result<DeviceOffboard> {
        match final_label::label(&self.client, current).await {
            Ok(labelled) => Ok(labelled),
            Err(kube::Error::Api(status)) if status.is_conflict() => Err(Error::Conflict),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    async fn publish(&self, obj: &DeviceOffboard, note: &Note) {
        let event = Event {
            type_: if note.reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.event_reason().to_string(),
            note: Some(truncate(&note.message, 1000)),
            action: "Offboard".to_string(),
            secondary: None,
        };
        // A recorder per Event: kube's `Recorder` caches every Event it sent
        // for six minutes and scans that cache on each publish, so one shared
        // recorder grows with every resource handled (and its scan with it).
        // The cost is that a repeated reason is a new Event, not a series.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(error) = recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %error, reason = note.reason.event_reason(), "could not publish event");
        }
    }

    async fn node_back(&self, node: &NodeIdentity) -> Result<Option<String>> {
        let api: Api<Node> = Api::all(self.client.clone());
        if let Some(live) = api.get_opt(&node.name).await.map_err(Error::Kube)? {
            return Ok(node_is_back(node, &live));
        }
        if node.provider_id.is_none() && node.system_uuid.is_none() {
            return Ok(None);
        }
        // No field selector finds a Node by providerID: read them page by page.
        let mut params = ListParams::default().limit(NODE_PAGE);
        loop {
            let page = api.list(&params).await.map_err(Error::Kube)?;
            if let Some(why) = page.items.iter().find_map(|live| node_is_back(node, live)) {
                return Ok(Some(why));
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(None),
            }
        }
    }
}

/// The status merge patch from `old` to `new`: removed fields become `null`
/// (a merge patch leaves absent keys alone), and the object's resourceVersion
/// makes it a precondition — a stale writer gets 409 Conflict.
pub fn status_patch(
    resource_version: Option<&str>,
    old: &DeviceOffboardStatus,
    new: &DeviceOffboardStatus,
) -> Value {
    let old = serde_json::to_value(old).unwrap_or(Value::Null);
    let mut new = serde_json::to_value(new).unwrap_or_else(|_| json!({}));
    if let (Value::Object(old), Value::Object(new)) = (&old, &mut new) {
        for key in old.keys() {
            new.entry(key.clone()).or_insert(Value::Null);
        }
    }
    json!({ "metadata": { "resourceVersion": resource_version }, "status": new })
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One resource held in memory: the `offboard` command's store (its key plays
/// the uid), and what the unit tests' store wraps. Writes check and bump the
/// resourceVersion like an API server, so a stale writer gets a conflict.
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    on_note: Box<dyn Fn(&Note) + Send + Sync>,
}

struct MemoryState {
    object: DeviceOffboard,
    notes: Vec<Note>,
    nodes: Vec<Node>,
}

impl MemoryStore {
    pub fn new(object: DeviceOffboard) -> Self {
        Self::with_notes(object, |_| {})
    }

    /// A store that hands every note to `on_note` as it is published.
    pub fn with_notes(
        object: DeviceOffboard,
        on_note: impl Fn(&Note) + Send + Sync + 'static,
    ) -> Self {
        let mut object = object;
        object
            .metadata
            .resource_version
            .get_or_insert_with(|| "1".into());
        MemoryStore {
            state: Mutex::new(MemoryState {
                object,
                notes: Vec::new(),
                nodes: Vec::new(),
            }),
            on_note: Box::new(on_note),
        }
    }

    /// The object as stored now.
    pub fn object(&self) -> DeviceOffboard {
        self.lock().object.clone()
    }

    pub fn notes(&self) -> Vec<Note> {
        self.lock().notes.clone()
    }

    /// A Node the cluster holds from now on (none at first: the `offboard`
    /// command runs without a cluster).
    pub fn add_node(&self, node: Node) {
        self.lock().nodes.push(node);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding the lock leaves plain data: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemoryState {
    /// A stale writer gets a conflict, as from an API server.
    fn check_version(&self, current: &DeviceOffboard) -> Result<()> {
        if current.metadata.resource_version != self.object.metadata.resource_version {
            return Err(Error::Conflict);
        }
        Ok(())
    }

    fn bump_version(&mut self) {
        let version: u64 = self
            .object
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.object.metadata.resource_version = Some((version + 1).to_string());
    }
}

impl StatusStore for MemoryStore {
    async fn write_status(
        &self,
        current: &DeviceOffboard,
        status: &DeviceOffboardStatus,
    ) -> Result<DeviceOffboard> {
        let mut state = self.lock();
        state.check_version(current)?;
        state.object.status = Some(status.clone());
        state.bump_version();
        Ok(state.object.clone())
    }

    /// The label lands like any metadata write: a new resourceVersion.
    async fn label_final(&self, current: &DeviceOffboard) -> Result<DeviceOffboard> {
        let mut state = self.lock();
        state.check_version(current)?;
        state
            .object
            .labels_mut()
            .insert(final_label::FINAL_LABEL.into(), "true".into());
        state.object.labels_mut().insert(
            final_label::FINAL_HOUR_LABEL.into(),
            final_label::final_hour(jiff::Timestamp::now()),
        );
        state.bump_version();
        Ok(state.object.clone())
    }

    async fn publish(&self, _obj: &DeviceOffboard, note: &Note) {
        (self.on_note)(note);
        self.lock().notes.push(note.clone());
    }

    async fn node_back(&self, node: &NodeIdentity) -> Result<Option<String>> {
        Ok(self
            .lock()
            .nodes
            .iter()
            .find_map(|live| node_is_back(node, live)))
    }
}

#[cfg(test)]
mod node_is_back_tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, NodeSystemInfo};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn live(name: &str, uid: &str, provider: Option<&str>, uuid: &str, terminating: bool) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.uid = Some(uid.into());
        n.metadata.deletion_timestamp = terminating.then(|| Time(jiff::Timestamp::now()));
        n.spec = Some(NodeSpec {
            provider_id: provider.map(Into::into),
            ..NodeSpec::default()
        });
        n.status = Some(NodeStatus {
            node_info: Some(NodeSystemInfo {
                system_uuid: uuid.into(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        });
        n
    }

    /// The rule, as a table: (live Node, is it the deleted Node come back).
    #[test]
    fn which_live_nodes_count_as_the_deleted_node_back() {
        let deleted = NodeIdentity {
            name: "win-1".into(),
            uid: "uid-old".into(),
            provider_id: Some("azure:///vm-1".into()),
            system_uuid: Some("UUID-1".into()),
        };
        let cases = [
            // The deleted Node itself, still held by the finalizer.
            (
                live("win-1", "uid-old", Some("azure:///vm-1"), "UUID-1", true),
                false,
            ),
            // The deleted Node itself, read before the deletion shows.
            (
                live("win-1", "uid-old", Some("azure:///vm-1"), "UUID-1", false),
                false,
            ),
            // A new Node of the same name.
            (live("win-1", "uid-new", None, "other", false), true),
            // A new Node of the same name, itself being deleted.
            (live("win-1", "uid-new", None, "other", true), false),
            // Another name, the same cloud VM.
            (
                live("win-2", "uid-new", Some("AZURE:///VM-1"), "other", false),
                true,
            ),
            // Another name, the same machine.
            (live("win-2", "uid-new", None, "uuid-1", false), true),
            // Unrelated.
            (
                live("win-2", "uid-new", Some("azure:///vm-2"), "UUID-2", false),
                false,
            ),
            // Blank identities never match.
            (live("win-2", "uid-new", Some(" "), " ", false), false),
        ];
        for (i, (node, back)) in cases.iter().enumerate() {
            assert_eq!(node_is_back(&deleted, node).is_some(), *back, "case {i}");
        }
        let blank = NodeIdentity {
            provider_id: Some(" ".into()),
            system_uuid: Some(" ".into()),
            ..deleted.clone()
        };
        assert!(node_is_back(&blank, &cases[7].0).is_none());
    }
}
