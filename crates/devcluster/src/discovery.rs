//! Discovery documents: legacy (`/api`, `/apis`, APIResourceLists), aggregated
//! (`apidiscovery.k8s.io/v2`, which kubectl and kube-rs prefer) and `/version`.

use super::registry::{ALL_VERBS, Registry, ResourceType};
use serde_json::{Value, json};

/// The Kubernetes version this API presents itself as.
pub const GIT_VERSION: &str = "v1.32.0-defender-offboard-dev";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

pub fn group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, versions)| group_json(&g, &versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(registry: &Registry, name: &str) -> Option<Value> {
    registry
        .groups()
        .into_iter()
        .find(|(g, _)| g == name && !g.is_empty())
        .map(|(g, versions)| {
            let mut doc = group_json(&g, &versions);
            doc["kind"] = "APIGroup".into();
            doc["apiVersion"] = "v1".into();
            doc
        })
}

fn resource_json(rt: &ResourceType) -> Value {
    let mut doc = json!({
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": ALL_VERBS,
    });
    if !rt.short_names.is_empty() {
        doc["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        doc["categories"] = json!(rt.categories);
    }
    doc
}

/// The APIResourceList of one group/version, or `None` if nothing is served there.
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types = registry.types_in(group, version);
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        resources.push(resource_json(t));
        if t.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if t.scale.is_some() {
            resources.push(json!({
                "name": format!("{}/scale", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        if t.serves_token() {
            resources.push(json!({
                "name": format!("{}/token", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The media type of aggregated discovery, asked for in `Accept` and answered in `Content-Type`.
pub const AGGREGATED_V2: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether an `Accept` header asks for aggregated discovery v2 (kube-apiserver 1.32 serves v2 only).
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
}

fn gvk_json(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "version": version, "kind": kind})
}

fn resource_discovery(rt: &ResourceType) -> Value {
    let mut subresources = Vec::new();
    if rt.status_subresource {
        subresources.push(json!({"subresource": "status",
            "responseKind": gvk_json(&rt.group, &rt.version, &rt.kind),
            "verbs": ["get", "patch", "update"]}));
    }
    if rt.scale.is_some() {
        subresources.push(json!({"subresource": "scale",
            "responseKind": gvk_json("autoscaling", "v1", "Scale"),
            "verbs": ["get", "patch", "update"]}));
    }
    if rt.serves_token() {
        subresources.push(json!({"subresource": "token",
            "responseKind": gvk_json("authentication.k8s.io", "v1", "TokenRequest"),
            "verbs": ["create"]}));
    }
    let mut doc = json!({
        "resource": rt.plural,
        "responseKind": gvk_json(&rt.group, &rt.version, &rt.kind),
        "scope": if rt.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": rt.singular,
        "verbs": ALL_VERBS,
    });
    if !rt.short_names.is_empty() {
        doc["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        doc["categories"] = json!(rt.categories);
    }
    if !subresources.is_empty() {
        doc["subresources"] = json!(subresources);
    }
    doc
}

/// The `APIGroupDiscoveryList` of `/api` (`core`) or `/apis` (every named group).
pub fn aggregated(registry: &Registry, core: bool) -> Value {
    let items: Vec<Value> = registry
        .groups()
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = registry
                        .types_in(&group, v)
                        .into_iter()
                        .map(resource_discovery)
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let mut metadata = json!({"creationTimestamp": null});
            if !group.is_empty() {
                metadata["name"] = group.into();
            }
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {}, "items": items})
}

/// The answer to every `SelfSubjectAccessReview`: this API does not authorize.
pub fn access_allowed() -> Value {
    json!({
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {},
        "spec": {},
        "status": {"allowed": true, "reason": "the development API has no authorization"},
    })
}
