//! Object lifecycles kube-apiserver and its controllers take care of: defaults
//! on create, CRD status, deletion with finalizers, and the namespace and CRD
//! cascades.

use super::registry::ResourceType;
use super::state::{State, meta_str, now};
use super::status::{ApiError, Cause};
use super::store::Key;
use serde_json::{Value, json};
use std::sync::Arc;

/// Kind-specific defaults the real API server fills in.
pub(super) fn defaults_on_create(rt: &ResourceType, object: &mut Value) {
    if rt.is_namespaces() {
        object["status"] = json!({"phase": "Active"});
    }
    if rt.is_crd() {
        crd_status(object);
    }
    if rt.kind == "Secret" && object["type"].as_str().is_none_or(str::is_empty) {
        object["type"] = "Opaque".into();
    }
}

pub(super) fn crd_status(crd: &mut Value) {
    let names = crd["spec"]["names"].clone();
    let now = now();
    crd["status"] = json!({
        "acceptedNames": names,
        "storedVersions": crd["spec"]["versions"].as_array().map(|vs| vs.iter()
            .filter(|v| v["storage"].as_bool() == Some(true)).map(|v| v["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    });
}

pub(super) fn validate_crd(crd: &Value) -> Result<(), ApiError> {
    let name = meta_str(crd, "name").unwrap_or_default();
    let group = crd["spec"]["group"].as_str().unwrap_or_default();
    let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    let mut require = |field: &str, present: bool| {
        if !present {
            causes.push(Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field: field.into(),
            });
        }
    };
    require("spec.group", !group.is_empty());
    require("spec.names.plural", !plural.is_empty());
    require("spec.names.kind", crd["spec"]["names"]["kind"].is_string());
    require(
        "spec.versions",
        crd["spec"]["versions"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
    );
    if causes.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ),
            field: "metadata.name".into(),
        });
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "apiextensions.k8s.io",
            "CustomResourceDefinition",
            name,
            causes,
        ))
    }
}

/// Delete (or mark for deletion when finalizers remain); returns the object's last state.
pub(super) fn delete_locked(
    state: &mut State,
    rt: &ResourceType,
    k: &Key,
    old: Value,
) -> (Value, u64) {
    let has_finalizers = old["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    // Namespaces terminate first; the namespace cascade removes them once empty.
    let held = has_finalizers || rt.is_namespaces();
    if held && old["metadata"].get("deletionTimestamp").is_some() {
        return (old, state.store.current_rv());
    }
    let rv = state.store.next_rv();
    let mut last = old;
    last["metadata"]["resourceVersion"] = rv.to_string().into();
    if held {
        last["metadata"]["deletionTimestamp"] = now().into();
        last["metadata"]["deletionGracePeriodSeconds"] = 0.into();
        // Like kube's markAsDeleting: terminating is a change of desired state.
        if let Some(generation) = last["metadata"]["generation"].as_i64().filter(|g| *g > 0) {
            last["metadata"]["generation"] = (generation + 1).into();
        }
        if rt.is_namespaces() {
            last["status"]["phase"] = "Terminating".into();
        }
        state.store.put(&rt.storage, k.clone(), last.clone(), rv);
        return (last, rv);
    }
    state.store.remove(&rt.storage, k, last.clone(), rv);
    after_removal(state, rt, &last);
    (last, rv)
}

/// Storages of namespaced resources (each once).
fn namespaced_types(state: &State) -> Vec<Arc<ResourceType>> {
    let mut seen: Vec<String> = Vec::new();
    state
        .registry
        .types()
        .iter()
        .filter(|t| t.namespaced)
        .filter(|t| {
            let first = !seen.contains(&t.storage);
            seen.push(t.storage.clone());
            first
        })
        .cloned()
        .collect()
}

pub(super) fn terminating_namespace(state: &State, ns: &str) -> bool {
    state
        .store
        .get("core/namespaces", "", ns)
        .is_some_and(|n| n["metadata"].get("deletionTimestamp").is_some())
}

/// What kube's namespace controller does: delete the namespace's objects, then the namespace once empty.
pub(super) fn finish_namespace(state: &mut State, ns: &str) -> Option<u64> {
    if !terminating_namespace(state, ns) {
        return None;
    }
    for t in namespaced_types(state) {
        let objects: Vec<Value> = state
            .store
            .list(&t.storage, Some(ns))
            .into_iter()
            .cloned()
            .collect();
        for object in objects {
            let name = meta_str(&object, "name").unwrap_or_default().to_string();
            delete_locked(state, &t, &(ns.to_string(), name), object);
        }
    }
    remove_namespace_if_empty(state, ns);
    Some(state.store.current_rv())
}

fn remove_namespace_if_empty(state: &mut State, ns: &str) {
    if !terminating_namespace(state, ns) {
        return;
    }
    let empty = namespaced_types(state)
        .iter()
        .all(|t| state.store.list(&t.storage, Some(ns)).is_empty());
    if !empty {
        return;
    }
    let Some(mut namespace) = state.store.get("core/namespaces", "", ns).cloned() else {
        return;
    };
    let rv = state.store.next_rv();
    namespace["metadata"]["resourceVersion"] = rv.to_string().into();
    state.store.remove(
        "core/namespaces",
        &(String::new(), ns.to_string()),
        namespace,
        rv,
    );
}

/// Cascade what kube's controllers would: a terminating namespace, a CRD's resources.
pub(super) fn after_removal(state: &mut State, rt: &ResourceType, removed: &Value) {
    if rt.namespaced
        && let Some(ns) = meta_str(removed, "namespace")
    {
        let ns = ns.to_string();
        remove_namespace_if_empty(state, &ns);
    }
    if rt.is_crd() {
        let storage = format!(
            "{}/{}",
            removed["spec"]["group"].as_str().unwrap_or_default(),
            removed["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default()
        );
        if let Some(t) = state.registry.by_storage(&storage) {
            let objects: Vec<Value> = state
                .store
                .list(&storage, None)
                .into_iter()
                .cloned()
                .collect();
            for mut object in objects {
                let k = (
                    meta_str(&object, "namespace")
                        .unwrap_or_default()
                        .to_string(),
                    meta_str(&object, "name").unwrap_or_default().to_string(),
                );
                let rv = state.store.next_rv();
                object["metadata"]["resourceVersion"] = rv.to_string().into();
                state.store.remove(&t.storage, &k, object, rv);
            }
        }
        state.registry.remove_crd(removed);
    }
}
