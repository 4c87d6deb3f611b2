//! The `scale` subresource of custom resources: an `autoscaling/v1` `Scale`
//! read from and written to the paths the CRD names.

use super::ops::{Shared, WriteParams};
use super::patch::{self, PatchKind};
use super::registry::{ResourceType, ScalePaths};
use super::status::ApiError;
use serde_json::{Value, json};

/// `.spec.replicas` → `["spec", "replicas"]`.
fn segments(path: &str) -> Vec<&str> {
    path.split('.').filter(|s| !s.is_empty()).collect()
}

fn read<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    segments(path)
        .into_iter()
        .try_fold(object, |v, key| v.get(key))
}

fn write(object: &mut Value, path: &str, value: Value) {
    let mut target = object;
    for key in segments(path) {
        if !target.is_object() {
            *target = json!({});
        }
        target = &mut target[key];
    }
    *target = value;
}

fn paths(rt: &ResourceType) -> Result<&ScalePaths, ApiError> {
    rt.scale.as_ref().ok_or_else(ApiError::path_not_found)
}

/// The `Scale` an object shows.
pub fn to_scale(paths: &ScalePaths, object: &Value) -> Value {
    let meta = &object["metadata"];
    let mut status = json!({
        "replicas": read(object, &paths.status_replicas).cloned().unwrap_or(json!(0)),
    });
    if let Some(selector) = paths
        .label_selector
        .as_deref()
        .and_then(|p| read(object, p))
    {
        status["selector"] = selector.clone();
    }
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": read(object, &paths.spec_replicas).cloned().unwrap_or(json!(0))},
        "status": status,
    })
}

pub fn get(
    shared: &Shared,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
) -> Result<Value, ApiError> {
    Ok(to_scale(paths(rt)?, &shared.get(rt, ns, name)?))
}

/// Write `scale.spec.replicas` into the object, guarded by the scale's resourceVersion if it has one.
pub fn update(
    shared: &Shared,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    scale: &Value,
    params: &WriteParams,
) -> Result<Value, ApiError> {
    let paths = paths(rt)?;
    let replicas = scale["spec"]["replicas"].clone();
    if !replicas.is_i64() && !replicas.is_u64() {
        return Err(ApiError::bad_request("spec.replicas must be an integer"));
    }
    let mut object = shared.get(rt, ns, name)?;
    if let Some(rv) = scale["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
    {
        object["metadata"]["resourceVersion"] = rv.into();
    }
    write(&mut object, &paths.spec_replicas, replicas);
    let stored = shared.update(rt, ns, name, "", object, params)?;
    Ok(to_scale(paths, &stored.object))
}

/// A merge or JSON patch of the `Scale`, then written as an update.
pub fn patch(
    shared: &Shared,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    kind: PatchKind,
    body: &Value,
    params: &WriteParams,
) -> Result<Value, ApiError> {
    let mut scale = get(shared, rt, ns, name)?;
    let wanted_rv = body["metadata"]["resourceVersion"].clone();
    match kind {
        // `Scale` is a built-in type: a strategic merge patch is a merge patch here.
        PatchKind::Merge | PatchKind::StrategicMerge => patch::merge(&mut scale, body)?,
        PatchKind::Json => patch::json(&mut scale, body)?,
        PatchKind::Apply => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "apply patches of the scale subresource are not supported here",
            ));
        }
    }
    // The read's version guards the write unless the patch named one itself.
    if wanted_rv.is_string() {
        scale["metadata"]["resourceVersion"] = wanted_rv;
    }
    update(shared, rt, ns, name, &scale, params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_dotted_paths() {
        let mut object = json!({"spec": {"replicas": 2}});
        assert_eq!(read(&object, ".spec.replicas"), Some(&json!(2)));
        write(&mut object, ".status.replicas", json!(1));
        assert_eq!(object["status"]["replicas"], 1);
    }
}
