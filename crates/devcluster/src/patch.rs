//! PATCH bodies: JSON merge patch, JSON patch, strategic merge (treated as a
//! merge patch), and an approximation of server-side apply.
//!
//! Server-side apply approximation: the applied configuration is merged into
//! the live object (maps merge recursively, lists and scalars are replaced
//! whole, `null` removes). Field ownership is tracked in
//! `metadata.managedFields` (`fieldsV1`) at leaf granularity, lists counting
//! as one atomic field: apply records the manager's applied fields, other
//! writes move the fields they change to their manager (an `Update` entry).
//! Applying a value different from the live one to a field another manager
//! owns is a `409 Conflict` unless `force` is set (which takes ownership), and
//! a field this manager applied before but omits now is removed unless another
//! manager also owns it. Not modelled: per-key merging of
//! `x-kubernetes-list-type: map` lists and defaulting.

use super::status::ApiError;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// The kind of PATCH, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    StrategicMerge,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }
}

/// Apply a JSON merge patch (RFC 7386) or a strategic merge patch (as merge) to `doc`.
pub fn merge(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "the merge patch must be a JSON object",
        ));
    }
    json_patch::merge(doc, patch);
    Ok(())
}

/// Apply a JSON patch (RFC 6902) to `doc`.
pub fn json(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let operations: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
    json_patch::patch(doc, &operations.0).map_err(|e| {
        ApiError::new(
            422,
            "Invalid",
            format!("the JSON patch could not be applied: {e}"),
        )
    })
}

/// Metadata that identifies the object rather than being owned by a manager.
fn is_identity(path: &[String]) -> bool {
    match path {
        [top] => top == "apiVersion" || top == "kind",
        [meta, field, ..] if meta == "metadata" => !matches!(
            field.as_str(),
            "labels" | "annotations" | "finalizers" | "ownerReferences"
        ),
        _ => false,
    }
}

/// Leaf field paths of an applied configuration (lists are atomic leaves).
pub fn leaf_paths(value: &Value) -> BTreeSet<Vec<String>> {
    fn walk(value: &Value, path: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    path.push(k.clone());
                    walk(v, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() && !is_identity(path) {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

fn encode_fields(paths: &BTreeSet<Vec<String>>) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut node = &mut root;
        for segment in path {
            node = node
                .entry(format!("f:{segment}"))
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("fieldsV1 nodes are objects");
        }
    }
    Value::Object(root)
}

fn decode_fields(fields: &Value) -> BTreeSet<Vec<String>> {
    fn walk(node: &Value, path: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        let Some(map) = node.as_object() else { return };
        if map.is_empty() && !path.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, v) in map {
            if let Some(name) = k.strip_prefix("f:") {
                path.push(name.to_string());
                walk(v, path, out);
                path.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(fields, &mut Vec::new(), &mut out);
    out
}

fn remove_path(doc: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = doc;
    for segment in parents {
        match node.get_mut(segment) {
            Some(next) => node = next,
            None => return,
        }
    }
    if let Some(map) = node.as_object_mut() {
        map.remove(last);
    }
}

fn entry_matches(entry: &Value, manager: &str, operation: &str, subresource: &str) -> bool {
    entry["manager"] == manager
        && entry["operation"] == operation
        && entry["subresource"].as_str().unwrap_or_default() == subresource
}

fn value_at<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |node, segment| node.get(segment))
}

fn managed_entries(doc: &Value) -> Vec<Value> {
    doc["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn new_entry(
    manager: &str,
    operation: &str,
    subresource: &str,
    api_version: &str,
    now: &str,
    fields: &BTreeSet<Vec<String>>,
) -> Value {
    let mut entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": encode_fields(fields),
    });
    if !subresource.is_empty() {
        entry["subresource"] = subresource.into();
    }
    entry
}

/// Remove `paths` from every entry but the excluded one; entries left empty are dropped.
fn disown(
    entries: Vec<Value>,
    paths: &BTreeSet<Vec<String>>,
    keep: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    entries
        .into_iter()
        .filter_map(|mut entry| {
            if keep(&entry) {
                return Some(entry);
            }
            let fields = decode_fields(&entry["fieldsV1"]);
            if fields.is_disjoint(paths) {
                return Some(entry);
            }
            let left: BTreeSet<Vec<String>> = fields.difference(paths).cloned().collect();
            if left.is_empty() {
                return None;
            }
            entry["fieldsV1"] = encode_fields(&left);
            Some(entry)
        })
        .collect()
}

/// A field another manager owns with a different value than the one applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyConflict {
    pub manager: String,
    pub api_version: String,
    pub field: String,
}

/// kube-apiserver's `409 Conflict` for an apply without `force`.
pub fn conflict_error(conflicts: &[ApplyConflict]) -> ApiError {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|c| {
            format!(
                "conflict with \"{}\" using {}: {}",
                c.manager, c.api_version, c.field
            )
        })
        .collect();
    let plural = if conflicts.len() == 1 { "" } else { "s" };
    let message = if lines.len() == 1 {
        format!("Apply failed with 1 conflict: {}", lines[0])
    } else {
        format!(
            "Apply failed with {} conflict{plural}: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    let mut error = ApiError::new(409, "Conflict", message);
    error.details = Some(json!({"causes": conflicts.iter().map(|c| json!({
        "reason": "FieldManagerConflict",
        "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
        "field": c.field,
    })).collect::<Vec<_>>()}));
    error
}

/// Server-side apply of `applied` by `manager` onto `live` (or onto nothing when creating).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    subresource: &str,
    api_version: &str,
    now: &str,
    force: bool,
) -> Result<Value, Vec<ApplyConflict>> {
    let mut result = live.cloned().unwrap_or_else(|| json!({}));
    let is_mine = |e: &Value| entry_matches(e, manager, "Apply", subresource);
    let entries = managed_entries(&result);
    let previous: BTreeSet<Vec<String>> = entries
        .iter()
        .find(|e| is_mine(e))
        .map(|e| decode_fields(&e["fieldsV1"]))
        .unwrap_or_default();
    let owned = leaf_paths(applied);

    let mut conflicts = Vec::new();
    let mut contested = BTreeSet::new();
    for entry in entries.iter().filter(|e| !is_mine(e)) {
        let fields = decode_fields(&entry["fieldsV1"]);
        for path in owned.intersection(&fields) {
            if value_at(applied, path) != value_at(&result, path) {
                contested.insert(path.clone());
                conflicts.push(ApplyConflict {
                    manager: entry["manager"].as_str().unwrap_or_default().to_string(),
                    api_version: entry["apiVersion"].as_str().unwrap_or_default().to_string(),
                    field: format!(".{}", path.join(".")),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let entries = disown(entries, &contested, is_mine);
    let others: BTreeSet<Vec<String>> = entries
        .iter()
        .filter(|e| !is_mine(e))
        .flat_map(|e| decode_fields(&e["fieldsV1"]))
        .collect();

    let mut applied_clean = applied.clone();
    if let Some(meta) = applied_clean
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
    {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    json_patch::merge(&mut result, &applied_clean);
    for path in previous.difference(&owned) {
        if !others.contains(path) {
            remove_path(&mut result, path);
        }
    }

    let mut new_entries: Vec<Value> = entries.into_iter().filter(|e| !is_mine(e)).collect();
    new_entries.push(new_entry(
        manager,
        "Apply",
        subresource,
        api_version,
        now,
        &owned,
    ));
    result["metadata"]["managedFields"] = Value::Array(new_entries);
    Ok(result)
}

/// Record a non-apply write by `manager`: the fields it changed become its own (an `Update` entry).
pub fn record_update(
    old: &Value,
    new: &mut Value,
    manager: &str,
    subresource: &str,
    api_version: &str,
    now: &str,
) {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        v
    };
    let (before, after) = (strip(old), strip(new));
    let mut all = leaf_paths(&before);
    all.extend(leaf_paths(&after));
    let changed: BTreeSet<Vec<String>> = all
        .into_iter()
        .filter(|p| value_at(&before, p) != value_at(&after, p))
        .collect();
    if changed.is_empty() {
        return;
    }
    let is_mine = |e: &Value| entry_matches(e, manager, "Update", subresource);
    let entries = managed_entries(new);
    let mine: BTreeSet<Vec<String>> = entries
        .iter()
        .find(|e| is_mine(e))
        .map(|e| decode_fields(&e["fieldsV1"]))
        .unwrap_or_default();
    let present: BTreeSet<Vec<String>> = leaf_paths(&after);
    let mut fields: BTreeSet<Vec<String>> = mine.union(&changed).cloned().collect();
    fields.retain(|p| present.contains(p));
    let mut entries: Vec<Value> = disown(entries, &changed, is_mine)
        .into_iter()
        .filter(|e| !is_mine(e))
        .collect();
    if !fields.is_empty() {
        entries.push(new_entry(
            manager,
            "Update",
            subresource,
            api_version,
            now,
            &fields,
        ));
    }
    new["metadata"]["managedFields"] = Value::Array(entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_removes_fields_the_manager_stopped_applying() {
        let first = apply(
            None,
            &json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": {"phase": "Pending", "nextRetryAt": "t"}}),
            "ctl",
            "status",
            "v1",
            "now",
            false,
        )
        .unwrap();
        assert_eq!(first["status"]["nextRetryAt"], "t");
        let mut live = first.clone();
        live["status"]["other"] = json!("kept");
        let second = apply(
            Some(&live),
            &json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": {"phase": "Submitting"}}),
            "ctl",
            "status",
            "v1",
            "now",
            false,
        )
        .unwrap();
        assert_eq!(second["status"]["phase"], "Submitting");
        assert!(second["status"].get("nextRetryAt").is_none());
        assert_eq!(second["status"]["other"], "kept");
        assert_eq!(
            second["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn apply_conflicts_with_other_owners_unless_forced() {
        let lease = |holder: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": {"holderIdentity": holder}});
        let held = apply(None, &lease("a"), "mgr-a", "", "v1", "now", false).unwrap();
        let conflicts =
            apply(Some(&held), &lease("b"), "mgr-b", "", "v1", "now", false).unwrap_err();
        assert_eq!(
            conflicts,
            vec![ApplyConflict {
                manager: "mgr-a".into(),
                api_version: "v1".into(),
                field: ".spec.holderIdentity".into()
            }]
        );
        assert!(
            conflict_error(&conflicts)
                .message
                .starts_with("Apply failed with 1 conflict: conflict with \"mgr-a\"")
        );
        // Same value: shared ownership, no conflict.
        assert!(apply(Some(&held), &lease("a"), "mgr-b", "", "v1", "now", false).is_ok());
        let forced = apply(Some(&held), &lease("b"), "mgr-b", "", "v1", "now", true).unwrap();
        assert_eq!(forced["spec"]["holderIdentity"], "b");
        let mut updated = forced.clone();
        updated["spec"]["holderIdentity"] = json!("c");
        record_update(&forced, &mut updated, "mgr-c", "", "v1", "now");
        let owners: Vec<&str> = updated["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(owners, vec!["mgr-c"]);
    }

    #[test]
    fn merge_and_json_patches() {
        let mut doc = json!({"spec": {"a": 1, "b": 2}});
        merge(&mut doc, &json!({"spec": {"a": null, "c": 3}})).unwrap();
        assert_eq!(doc, json!({"spec": {"b": 2, "c": 3}}));
        json(
            &mut doc,
            &json!([{"op": "replace", "path": "/spec/b", "value": 5}]),
        )
        .unwrap();
        assert_eq!(doc["spec"]["b"], 5);
        assert!(
            json(
                &mut doc,
                &json!([{"op": "test", "path": "/spec/b", "value": 1}])
            )
            .is_err()
        );
    }
}
