//! The write and read semantics of kube-apiserver over the in-memory store:
//! metadata ownership, resourceVersion preconditions, generation, the status
//! subresource split, finalizers, validation, and the events conversion.

use super::events;
use super::holds::ListHolds;
use super::lifecycle::{
    after_removal, crd_status, defaults_on_create, delete_locked, finish_namespace,
    terminating_namespace, validate_crd,
};
use super::paging::{self, Continue, Page, PageRequest};
use super::patch::{self, PatchKind};
use super::registry::{Registry, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
pub use super::state::{State, meta_str, now};
use super::status::{ApiError, Cause};
use super::store::{Key, Store};
use super::validation::{self, FieldValidation};
use serde_json::{Value, json};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// State shared by the handlers and watch streams.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    /// Carries the newest resourceVersion; watch streams wake on every change.
    pub changed: watch::Sender<u64>,
    pub bookmark_interval: Duration,
    /// Ends every open watch stream when the server shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Bumped by a compaction: open watch streams end, as at a server-side timeout.
    pub compactions: watch::Sender<u64>,
    /// Watches answered with the in-stream `410 Expired`, for `/metrics`.
    pub expired_watches: AtomicU64,
    /// Lists a test holds back (see [`ListHolds`]).
    pub holds: ListHolds,
}

impl Shared {
    pub fn new(registry: Registry, history: usize, bookmark_interval: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                registry,
                store: Store::new(history),
            }),
            changed: watch::channel(0).0,
            bookmark_interval,
            shutdown: tokio_util::sync::CancellationToken::new(),
            compactions: watch::channel(0).0,
            expired_watches: AtomicU64::new(0),
            holds: ListHolds::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A handler panicking mid-write must not take the whole API down with poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, rv: u64) {
        self.changed.send_replace(rv);
    }

    /// Forget the watch history and end open watches: a client resuming from the
    /// version it last saw is told `410 Expired` and has to list again.
    pub fn compact(&self) {
        self.lock().store.compact();
        self.compactions.send_modify(|n| *n += 1);
    }

    /// What `/metrics` shows (Prometheus text format).
    pub fn metrics(&self) -> String {
        format!(
            "# HELP devcluster_watch_expired_total Watches answered with the in-stream 410 Expired.\n\
             # TYPE devcluster_watch_expired_total counter\n\
             devcluster_watch_expired_total {}\n",
            self.expired_watches.load(Ordering::Relaxed)
        )
    }
}

/// Query parameters that shape a write.
#[derive(Debug, Clone, Default)]
pub struct WriteParams {
    pub dry_run: bool,
    pub field_manager: Option<String>,
    /// `force` of an apply patch.
    pub force: bool,
    /// The manager of non-apply writes without `fieldManager` (kube takes it from the User-Agent).
    pub default_manager: String,
    pub field_validation: FieldValidation,
}

impl WriteParams {
    fn manager(&self) -> &str {
        self.field_manager
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or(if self.default_manager.is_empty() {
                "unknown"
            } else {
                &self.default_manager
            })
    }
}

/// The result of a write: the object, whether it was created (`201`; an apply
/// patch may create), and the unknown fields pruned from it, which kube-apiserver
/// reports as `Warning` headers under the default `fieldValidation`.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// A stored object as the given resource version presents it.
pub fn to_external(rt: &ResourceType, stored: &Value) -> Value {
    if rt.is_events() && rt.group == "events.k8s.io" {
        return events::to_events_v1(stored);
    }
    let mut out = if rt.is_events() {
        events::present_core(stored)
    } else {
        stored.clone()
    };
    out["apiVersion"] = rt.api_version().into();
    out["kind"] = rt.kind.clone().into();
    out
}

fn to_storage(rt: &ResourceType, external: Value) -> Value {
    if rt.is_events() && rt.group == "events.k8s.io" {
        return events::to_core(&external);
    }
    let mut out = external;
    if out.is_object() {
        out["apiVersion"] = rt.api_version().into();
        out["kind"] = rt.kind.clone().into();
    }
    if rt.storage == "core/secrets" {
        merge_string_data(&mut out);
    }
    out
}

/// A Secret's `stringData` is write-only: the API server base64-encodes each
/// entry into `data` (overriding a `data` key of the same name) and never
/// stores or returns `stringData` itself.
fn merge_string_data(secret: &mut Value) {
    use base64::Engine as _;
    let Some(string_data) = secret.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let Value::Object(entries) = string_data else {
        return;
    };
    if !secret["data"].is_object() {
        secret["data"] = json!({});
    }
    for (key, value) in entries {
        let text = value.as_str().unwrap_or_default();
        secret["data"][key] = base64::engine::general_purpose::STANDARD
            .encode(text)
            .into();
    }
}

/// A create or update body as written, before conversion to the stored shape.
fn validated_storage(rt: &ResourceType, external: Value) -> Result<Value, ApiError> {
    if rt.is_events() && rt.group == "events.k8s.io" {
        events::validate_v1(&external)?;
    }
    Ok(to_storage(rt, external))
}

fn check_body(rt: &ResourceType, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON or YAML object",
        ));
    }
    if let Some(kind) = body["kind"].as_str()
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the provided object ({kind}) does not match the resource ({})",
            rt.kind
        )));
    }
    Ok(())
}

fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Whether the change from `old` to `new` is one that bumps `metadata.generation`.
pub fn bumps_generation(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    if rt.has_spec() {
        return old.get("spec") != new.get("spec");
    }
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("metadata");
            map.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}

/// Objects compared for a no-op write: the resourceVersion and managedFields times do not count.
fn same_content(a: &Value, b: &Value) -> bool {
    let normalise = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
            if let Some(entries) = meta.get_mut("managedFields").and_then(Value::as_array_mut) {
                for entry in entries {
                    if let Some(e) = entry.as_object_mut() {
                        e.remove("time");
                    }
                }
            }
        }
        v
    };
    normalise(a) == normalise(b)
}

fn key(rt: &ResourceType, namespace: Option<&str>, name: &str) -> Key {
    let ns = if rt.namespaced {
        namespace.unwrap_or_default()
    } else {
        ""
    };
    (ns.to_string(), name.to_string())
}

fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::not_found(&rt.group, &rt.plural, name)
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::conflict(&rt.group, &rt.plural, name)
}

fn missing_resource_version(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::invalid(
        &rt.group,
        &rt.kind,
        name,
        vec![Cause {
            reason: "FieldValueInvalid",
            message: "Invalid value: 0x0: must be specified for an update".into(),
            field: "metadata.resourceVersion".into(),
        }],
    )
}

fn validate_object(
    rt: &ResourceType,
    object: &mut Value,
    old: Option<&Value>,
    params: &WriteParams,
) -> Result<Vec<String>, ApiError> {
    let mut warnings = Vec::new();
    if rt.custom {
        let pruned = validation::validate_custom(rt, object, old, params.field_validation)?;
        if params.field_validation == FieldValidation::Warn {
            warnings = pruned
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
        }
    }
    if rt.is_crd() {
        validate_crd(object)?;
    }
    Ok(warnings)
}

impl Shared {
    pub fn get(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let state = self.lock();
        let (ns, name) = key(rt, namespace, name);
        state
            .store
            .get(&rt.storage, &ns, &name)
            .map(|o| to_external(rt, o))
            .ok_or_else(|| not_found(rt, &name))
    }

    /// Matching objects (storage form) and the resourceVersion of the snapshot.
    pub fn list_stored(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let state = self.lock();
        let ns = if rt.namespaced { namespace } else { None };
        let items = state
            .store
            .list(&rt.storage, ns)
            .into_iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
            .cloned()
            .collect();
        (items, state.store.current_rv())
    }

    /// One page of matching objects (storage form), read at the version the first page saw.
    pub fn list_page(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        request: PageRequest<'_>,
    ) -> Result<Page, ApiError> {
        let from = request.token.map(Continue::decode).transpose()?;
        let state = self.lock();
        let ns = if rt.namespaced { namespace } else { None };
        let rv = from.as_ref().map_or(state.store.current_rv(), |c| c.rv);
        let filtered = !(labels.is_empty() && fields.is_empty());
        let after = from.as_ref().map(Continue::key);
        let (mut taken, mut following) = (Vec::new(), 0usize);
        state
            .store
            .visit_at(&rt.storage, ns, rv, after.as_ref(), |key, object| {
                if !(labels.matches(object) && fields.matches(object)) {
                    return ControlFlow::Continue(());
                }
                if request.limit == 0 || taken.len() < request.limit {
                    taken.push((key.clone(), object.clone()));
                    return ControlFlow::Continue(());
                }
                following += 1;
                // A filtered list only says whether more follow; an unfiltered one counts them.
                if filtered {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .map_err(|_| paging::expired_token())?;
        drop(state);
        Ok(paging::page(taken, following, rv, filtered))
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        body: Value,
        params: &WriteParams,
    ) -> Result<Written, ApiError> {
        check_body(rt, &body)?;
        let mut object = validated_storage(rt, body)?;
        let mut state = self.lock();
        let (stored, rv, warnings) = create_locked(&mut state, rt, namespace, &mut object, params)?;
        drop(state);
        if !params.dry_run {
            self.notify(rv);
        }
        Ok(Written {
            object: to_external(rt, &stored),
            created: true,
            warnings,
        })
    }

    pub fn update(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: Value,
        params: &WriteParams,
    ) -> Result<Written, ApiError> {
        check_body(rt, &body)?;
        if let Some(body_name) = meta_str(&body, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let new = validated_storage(rt, body)?;
        let mut state = self.lock();
        let k = key(rt, namespace, name);
        let old = state
            .store
            .get(&rt.storage, &k.0, &k.1)
            .cloned()
            .ok_or_else(|| not_found(rt, name))?;
        match meta_str(&new, "resourceVersion") {
            // Custom resources allow no unconditional update (built-ins mostly do).
            None if rt.custom => return Err(missing_resource_version(rt, name)),
            Some(rv) if Some(rv) != meta_str(&old, "resourceVersion") => {
                return Err(conflict(rt, name));
            }
            _ => {}
        }
        let (stored, rv, warnings) =
            commit_update(&mut state, rt, &k, &old, new, subresource, params, false)?;
        drop(state);
        if let Some(rv) = rv {
            self.notify(rv);
        }
        Ok(Written {
            object: to_external(rt, &stored),
            created: false,
            warnings,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        kind: PatchKind,
        body: &Value,
        params: &WriteParams,
    ) -> Result<Written, ApiError> {
        if kind == PatchKind::StrategicMerge && rt.custom {
            return Err(ApiError::strategic_merge_unsupported());
        }
        let mut state = self.lock();
        let k = key(rt, namespace, name);
        let old = state.store.get(&rt.storage, &k.0, &k.1).cloned();
        let wanted_rv = match kind {
            PatchKind::Json => None,
            _ => meta_str(body, "resourceVersion").map(String::from),
        };
        if kind == PatchKind::Apply {
            check_body(rt, body)?;
            if body["apiVersion"].as_str().is_none() || body["kind"].as_str().is_none() {
                return Err(ApiError::bad_request(
                    "apiVersion and kind must be set in an apply patch",
                ));
            }
            if let Some(body_name) = meta_str(body, "name")
                && body_name != name
            {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
        }
        let manager = params.field_manager.clone().unwrap_or_default();
        if kind == PatchKind::Apply && manager.is_empty() {
            return Err(ApiError::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        let Some(old) = old else {
            if kind == PatchKind::Apply && subresource.is_empty() {
                if wanted_rv.is_some() {
                    return Err(conflict(rt, name));
                }
                let applied = patch::apply(
                    None,
                    &split_applied(rt, body, ""),
                    &manager,
                    "",
                    &rt.api_version(),
                    &now(),
                    params.force,
                )
                .map_err(|c| patch::conflict_error(&c))?;
                let mut object = to_storage(rt, applied);
                object["metadata"]["name"] = name.into();
                let (stored, rv, warnings) =
                    create_locked(&mut state, rt, namespace, &mut object, params)?;
                drop(state);
                if !params.dry_run {
                    self.notify(rv);
                }
                return Ok(Written {
                    object: to_external(rt, &stored),
                    created: true,
                    warnings,
                });
            }
            return Err(not_found(rt, name));
        };
        if let Some(rv) = &wanted_rv
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        let mut doc = to_external(rt, &old);
        match kind {
            PatchKind::Merge | PatchKind::StrategicMerge => patch::merge(&mut doc, body)?,
            PatchKind::Json => {
                patch::json(&mut doc, body)?;
                if meta_str(&doc, "resourceVersion") != meta_str(&old, "resourceVersion")
                    && meta_str(&doc, "resourceVersion").is_some()
                {
                    return Err(conflict(rt, name));
                }
            }
            PatchKind::Apply => {
                let body = &split_applied(rt, body, subresource);
                doc = patch::apply(
                    Some(&doc),
                    body,
                    &manager,
                    subresource,
                    &rt.api_version(),
                    &now(),
                    params.force,
                )
                .map_err(|c| patch::conflict_error(&c))?;
            }
        }
        let new = to_storage(rt, doc);
        let applied = kind == PatchKind::Apply;
        let (stored, rv, warnings) =
            commit_update(&mut state, rt, &k, &old, new, subresource, params, applied)?;
        drop(state);
        if let Some(rv) = rv {
            self.notify(rv);
        }
        Ok(Written {
            object: to_external(rt, &stored),
            created: false,
            warnings,
        })
    }

    pub fn delete(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        options: &Value,
        params: &WriteParams,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let k = key(rt, namespace, name);
        let old = state
            .store
            .get(&rt.storage, &k.0, &k.1)
            .cloned()
            .ok_or_else(|| not_found(rt, name))?;
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(wanted) = options
                .pointer(&format!("/preconditions/{field}"))
                .and_then(Value::as_str)
                && Some(wanted) != meta_str(&old, field)
            {
                return Err(ApiError::conflict_with(
                    &rt.group,
                    &rt.plural,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {}",
                        meta_str(&old, field).unwrap_or_default()
                    ),
                ));
            }
        }
        if params.dry_run {
            return Ok(to_external(rt, &old));
        }
        let (result, rv) = delete_locked(&mut state, rt, &k, old);
        drop(state);
        self.notify(rv);
        Ok(to_external(rt, &result))
    }

    /// Run the namespace cascade for a terminating namespace (called shortly after its deletion).
    pub fn finish_namespace(&self, ns: &str) {
        let rv = finish_namespace(&mut self.lock(), ns);
        if let Some(rv) = rv {
            self.notify(rv);
        }
    }

    /// The newest resourceVersion (for list metadata and bookmarks).
    pub fn current_rv(&self) -> u64 {
        self.lock().store.current_rv()
    }

    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    /// Put an object straight into the store (startup objects such as namespaces).
    pub fn seed(&self, rt: &ResourceType, object: Value) -> Result<Value, ApiError> {
        self.create(rt, None, object, &WriteParams::default())
            .map(|written| written.object)
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }
}

fn create_locked(
    state: &mut State,
    rt: &ResourceType,
    namespace: Option<&str>,
    object: &mut Value,
    params: &WriteParams,
) -> Result<(Value, u64, Vec<String>), ApiError> {
    let ns = if rt.namespaced {
        let url_ns = namespace.unwrap_or("default");
        if let Some(body_ns) = meta_str(object, "namespace")
            && body_ns != url_ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if state.store.get("core/namespaces", "", url_ns).is_none() {
            return Err(ApiError::not_found("", "namespaces", url_ns));
        }
        if terminating_namespace(state, url_ns) {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {url_ns} because it is being terminated",
                    rt.group_resource_name(),
                    meta_str(object, "name")
                        .or(meta_str(object, "generateName"))
                        .unwrap_or_default()
                ),
            ));
        }
        url_ns.to_string()
    } else {
        String::new()
    };
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if meta_str(object, "name").is_none()
        && let Some(prefix) = meta_str(object, "generateName")
    {
        object["metadata"]["name"] = format!("{prefix}{}", random_suffix()).into();
    }
    let name = meta_str(object, "name").unwrap_or_default().to_string();
    validation::validate_name(rt, &name)?;
    if state.store.get(&rt.storage, &ns, &name).is_some() {
        return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
    }
    {
        let meta = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        for field in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(field);
        }
        meta.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        meta.insert("creationTimestamp".into(), now().into());
        if rt.namespaced {
            meta.insert("namespace".into(), ns.clone().into());
        } else {
            meta.remove("namespace");
        }
        if rt.is_events() {
            meta.remove("generation");
        } else {
            meta.insert("generation".into(), 1.into());
        }
    }
    // A kubelet registers its Node with its status (the API server's node
    // strategy keeps status on create); every other kind drops it.
    if rt.status_subresource
        && rt.kind != "Node"
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    defaults_on_create(rt, object);
    if object["metadata"].get("managedFields").is_none() {
        let mut created = object.clone();
        patch::record_update(
            &json!({}),
            &mut created,
            params.manager(),
            "",
            &rt.api_version(),
            &now(),
        );
        *object = created;
    }
    let warnings = validate_object(rt, object, None, params)?;
    if params.dry_run {
        return Ok((object.clone(), state.store.current_rv(), warnings));
    }
    let rv = state.store.next_rv();
    object["metadata"]["resourceVersion"] = rv.to_string().into();
    state.store.put(&rt.storage, (ns, name), object.clone(), rv);
    if rt.is_crd() {
        state.registry.set_crd(object);
    }
    Ok((object.clone(), rv, warnings))
}

/// The part of an applied configuration a write to `subresource` can change, so that
/// ownership is recorded only for fields the write keeps (kube resets the others).
fn split_applied(rt: &ResourceType, applied: &Value, subresource: &str) -> Value {
    if !rt.status_subresource {
        return applied.clone();
    }
    let mut kept = applied.clone();
    let Some(map) = kept.as_object_mut() else {
        return kept;
    };
    if subresource == "status" {
        map.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| matches!(k.as_str(), "name" | "namespace" | "resourceVersion"));
        }
    } else {
        map.remove("status");
    }
    kept
}

/// Metadata a client cannot change through an update.
const SYSTEM_META: &[&str] = &[
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "namespace",
    "name",
];

#[allow(clippy::too_many_arguments)]
/// Finish an update: returns the stored result and the resourceVersion written (None for a no-op).
fn commit_update(
    state: &mut State,
    rt: &ResourceType,
    k: &Key,
    old: &Value,
    new: Value,
    subresource: &str,
    params: &WriteParams,
    applied: bool,
) -> Result<(Value, Option<u64>, Vec<String>), ApiError> {
    let mut next = if subresource == "status" {
        // Status writes change only status (and managedFields kept by apply).
        let mut next = old.clone();
        match new.get("status") {
            Some(status) => next["status"] = status.clone(),
            None => {
                next.as_object_mut().map(|m| m.remove("status"));
            }
        }
        if let Some(managed) = new["metadata"].get("managedFields") {
            next["metadata"]["managedFields"] = managed.clone();
        }
        next
    } else {
        let mut next = new;
        if !next["metadata"].is_object() {
            next["metadata"] = json!({});
        }
        if rt.status_subresource {
            match old.get("status") {
                Some(status) => next["status"] = status.clone(),
                None => {
                    next.as_object_mut().map(|m| m.remove("status"));
                }
            }
        }
        let meta = next["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        for field in SYSTEM_META {
            match old["metadata"].get(*field) {
                Some(v) => {
                    meta.insert((*field).into(), v.clone());
                }
                None => {
                    meta.remove(*field);
                }
            }
        }
        if !meta.contains_key("managedFields")
            && let Some(m) = old["metadata"].get("managedFields")
        {
            meta.insert("managedFields".into(), m.clone());
        }
        next
    };
    if old["metadata"].get("deletionTimestamp").is_some() {
        let before: Vec<&Value> = old["metadata"]["finalizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let added = next["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|after| after.iter().any(|f| !before.contains(&f)));
        if added {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                &k.1,
                vec![Cause {
                    reason: "FieldValueForbidden",
                    message:
                        "Forbidden: no new finalizers can be added if the object is being deleted"
                            .into(),
                    field: "metadata.finalizers".into(),
                }],
            ));
        }
    }
    if !rt.is_events() && bumps_generation(rt, old, &next) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        next["metadata"]["generation"] = generation.into();
    }
    if rt.is_crd() && subresource.is_empty() {
        next["status"] = old["status"].clone();
        crd_status(&mut next);
        next["status"]["conditions"] = old["status"]["conditions"].clone();
    }
    if !applied {
        patch::record_update(
            old,
            &mut next,
            params.manager(),
            subresource,
            &rt.api_version(),
            &now(),
        );
    }
    let warnings = validate_object(rt, &mut next, Some(old), params)?;
    if same_content(old, &next) || params.dry_run {
        let mut result = if params.dry_run { next } else { old.clone() };
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        return Ok((result, None, warnings));
    }
    let rv = state.store.next_rv();
    next["metadata"]["resourceVersion"] = rv.to_string().into();
    let finalized = next["metadata"].get("deletionTimestamp").is_some()
        && next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
    if finalized {
        state.store.remove(&rt.storage, k, next.clone(), rv);
        after_removal(state, rt, &next);
    } else {
        state.store.put(&rt.storage, k.clone(), next.clone(), rv);
        if rt.is_crd() {
            state.registry.set_crd(&next);
        }
    }
    Ok((next, Some(rv), warnings))
}
