//! OpenAPI documents derived from the served resources: enough for kubectl to
//! see that the server validates fields itself (`fieldValidation` on PATCH
//! operations tagged with `x-kubernetes-group-version-kind`) and to find each
//! kind's schema.

use super::registry::{Registry, ResourceType};
use serde_json::{Map, Value, json};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// `/openapi/v3/{prefix}` path keys, e.g. `api/v1`, `apis/defender.offboard.dev/v1alpha1`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn schema_name(rt: &ResourceType) -> String {
    let group = if rt.group.is_empty() {
        "io.k8s.api.core"
    } else {
        rt.group.as_str()
    };
    format!("{group}.{}.{}", rt.version, rt.kind)
}

/// The index kubectl reads first.
pub fn v3_index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (group, versions) in registry.groups() {
        for version in versions {
            let hash = v3_hash(registry, &group, &version);
            let key = gv_path(&group, &version);
            paths.insert(
                key.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn v3_hash(registry: &Registry, group: &str, version: &str) -> String {
    let doc = v3_document(registry, group, version).unwrap_or_default();
    let mut hasher = DefaultHasher::new();
    doc.to_string().hash(&mut hasher);
    format!("{:016X}", hasher.finish())
}

fn gvk(rt: &ResourceType) -> Value {
    json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}])
}

fn query(name: &str, type_: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": type_, "uniqueItems": true}})
}

fn operation(rt: &ResourceType, action: &str, with_body: bool) -> Value {
    let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(rt))});
    let mut op = json!({
        "operationId": format!("{action}{}", rt.kind),
        "tags": [rt.group],
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(rt)[0],
        "parameters": [query("dryRun", "string"), query("fieldManager", "string"), query("fieldValidation", "string")],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}},
    });
    if action == "patch" {
        op["parameters"]
            .as_array_mut()
            .expect("array")
            .push(query("force", "boolean"));
        let mut content = json!({
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
        });
        // kubectl sends a strategic merge patch only where the document offers one;
        // custom resources have no patch strategies, so kube-apiserver does not.
        if !rt.custom {
            content["application/strategic-merge-patch+json"] =
                json!({"schema": {"type": "object"}});
        }
        op["requestBody"] = json!({"content": content});
    } else if with_body {
        op["requestBody"] = json!({"content": {"application/json": {"schema": reference}}});
    }
    op
}

fn resource_paths(rt: &ResourceType, paths: &mut Map<String, Value>) {
    let base = if rt.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.group, rt.version)
    };
    let collection = if rt.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
    } else {
        format!("{base}/{}", rt.plural)
    };
    let get = |action: &str| {
        json!({"operationId": format!("{action}{}", rt.kind), "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk(rt)[0],
            "responses": {"200": {"description": "OK"}}})
    };
    paths.insert(
        collection.clone(),
        json!({"get": get("list"), "post": operation(rt, "post", true), "delete": get("deletecollection")}),
    );
    paths.insert(
        format!("{collection}/{{name}}"),
        json!({"get": get("get"), "put": operation(rt, "put", true), "patch": operation(rt, "patch", false), "delete": get("delete")}),
    );
    if rt.status_subresource {
        paths.insert(
            format!("{collection}/{{name}}/status"),
            json!({"get": get("get"), "put": operation(rt, "put", true), "patch": operation(rt, "patch", false)}),
        );
    }
    if rt.serves_token() {
        paths.insert(
            format!("{collection}/{{name}}/token"),
            json!({"post": {
                "operationId": format!("create{}Token", rt.kind),
                "x-kubernetes-action": "post",
                "x-kubernetes-group-version-kind": {"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"},
                "parameters": [query("dryRun", "string"), query("fieldManager", "string"), query("fieldValidation", "string")],
                "responses": {"201": {"description": "Created"}},
            }}),
        );
    }
}

fn object_meta_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "uid": {"type": "string"}, "resourceVersion": {"type": "string"}, "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "format": "date-time"}, "deletionTimestamp": {"type": "string", "format": "date-time"},
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
        "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
    }})
}

fn kind_schema(rt: &ResourceType) -> Value {
    let mut schema = rt
        .schema
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    let properties = schema
        .as_object_mut()
        .expect("schemas are objects")
        .entry("properties")
        .or_insert_with(|| json!({}));
    properties["apiVersion"] = json!({"type": "string"});
    properties["kind"] = json!({"type": "string"});
    properties["metadata"] =
        json!({"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"});
    schema["x-kubernetes-group-version-kind"] = gvk(rt);
    schema
}

/// The OpenAPI v3 document of one group/version.
pub fn v3_document(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types = registry.types_in(group, version);
    if types.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into(),
        object_meta_schema(),
    );
    for rt in types {
        resource_paths(rt, &mut paths);
        schemas.insert(schema_name(rt), kind_schema(rt));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": super::discovery::GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// A minimal valid Swagger 2.0 document (kubectl only falls back to it).
pub fn v2_document(registry: &Registry) -> Value {
    let mut definitions = Map::new();
    for rt in registry.types() {
        let mut schema = kind_schema(rt);
        schema["properties"]["metadata"] = object_meta_schema();
        definitions.insert(schema_name(rt), schema);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": super::discovery::GIT_VERSION},
        "paths": {},
        "definitions": definitions,
    })
}
