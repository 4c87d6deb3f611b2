//! The `meta.k8s.io/v1` `Table` form kubectl asks for, with the CRD's printer columns.

use super::registry::{PrinterColumn, ResourceType};
use serde_json::{Value, json};

/// kube's `duration.HumanDuration`: "45s", "3m20s", "5h2m", "12d".
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(timestamp: &Value) -> Value {
    let Some(parsed) = timestamp
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    else {
        return "<unknown>".into();
    };
    let seconds = jiff::Timestamp::now().as_second() - parsed.as_second();
    human_duration(seconds).into()
}

/// Evaluate a simple JSONPath (`.a.b`, `.a[0]`, `.a[?(@.type=="Ready")].status`).
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut current = object;
    let mut rest = path.trim_start_matches('.');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let inner = &after[..end];
            rest = after[end + 1..].trim_start_matches('.');
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                current = current
                    .as_array()?
                    .iter()
                    .find(|item| item[field.trim()].as_str() == Some(want))?;
            } else {
                current = current.get(inner.parse::<usize>().ok()?)?;
            }
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        current = current.get(&rest[..end])?;
        rest = rest[end..].trim_start_matches('.');
    }
    Some(current)
}

fn cell(column: &PrinterColumn, object: &Value) -> Value {
    let Some(value) = json_path(object, &column.json_path) else {
        return Value::Null;
    };
    match column.type_.as_str() {
        "date" => age(value),
        "integer" | "number" | "boolean" => value.clone(),
        _ => match value {
            Value::String(s) => s.clone().into(),
            Value::Null => Value::Null,
            other => other.to_string().into(),
        },
    }
}

/// How a column's cells are computed.
#[derive(Debug, Clone)]
enum Source {
    /// A CRD printer column (or a built-in one that is a plain JSONPath).
    Path(PrinterColumn),
    /// The number of entries of a map or list, e.g. a Secret's `data`, a ServiceAccount's `secrets`.
    Count(&'static str),
    /// An event's last occurrence as an age, as `kubectl get events` shows it.
    EventLastSeen,
    /// An event's object as `kind/name`.
    EventObject,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_: String,
    format: String,
    description: String,
    priority: i64,
    source: Source,
}

fn path(name: &str, type_: &str, json_path: &str, priority: i64) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        source: Source::Path(PrinterColumn {
            name: name.into(),
            type_: type_.into(),
            format: String::new(),
            description: String::new(),
            priority,
            json_path: json_path.into(),
        }),
    }
}

fn computed(name: &str, type_: &str, source: Source, priority: i64) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        source,
    }
}

fn name_column(priority: i64) -> Column {
    let mut name = path("Name", "string", ".metadata.name", priority);
    name.format = "name".into();
    name.description = "Name must be unique within a namespace.".into();
    name
}

fn age_column() -> Column {
    let mut age = path("Age", "date", ".metadata.creationTimestamp", 0);
    age.type_ = "string".into();
    age.format = "date".into();
    age
}

/// The columns a resource is shown with: a CRD's printer columns, or the built-in kind's usual ones.
fn columns(rt: &ResourceType) -> Vec<Column> {
    if rt.custom {
        let mut columns = vec![name_column(0)];
        if rt.printer_columns.is_empty() {
            columns.push(age_column());
        }
        columns.extend(rt.printer_columns.iter().map(|c| Column {
            name: c.name.clone(),
            type_: c.type_.clone(),
            format: c.format.clone(),
            description: if c.description.is_empty() {
                format!(
                    "Custom resource definition column (in JSONPath format): {}",
                    c.json_path
                )
            } else {
                c.description.clone()
            },
            priority: c.priority,
            source: Source::Path(c.clone()),
        }));
        return columns;
    }
    match rt.kind.as_str() {
        "Namespace" => vec![
            name_column(0),
            path("Status", "string", ".status.phase", 0),
            age_column(),
        ],
        "Secret" => vec![
            name_column(0),
            path("Type", "string", ".type", 0),
            computed("Data", "string", Source::Count("data"), 0),
            age_column(),
        ],
        "ServiceAccount" => vec![
            name_column(0),
            computed("Secrets", "string", Source::Count("secrets"), 0),
            age_column(),
        ],
        "ConfigMap" => vec![
            name_column(0),
            computed("Data", "string", Source::Count("data"), 0),
            age_column(),
        ],
        "Service" => vec![
            name_column(0),
            path("Type", "string", ".spec.type", 0),
            path("Cluster-IP", "string", ".spec.clusterIP", 0),
            age_column(),
        ],
        "Node" => vec![
            name_column(0),
            path("Version", "string", ".status.nodeInfo.kubeletVersion", 0),
            age_column(),
        ],
        "Lease" => vec![
            name_column(0),
            path("Holder", "string", ".spec.holderIdentity", 0),
            age_column(),
        ],
        "CustomResourceDefinition" => vec![
            name_column(0),
            path("Created At", "date", ".metadata.creationTimestamp", 0),
        ],
        "Event" => vec![
            computed("Last Seen", "string", Source::EventLastSeen, 0),
            path("Type", "string", ".type", 0),
            path("Reason", "string", ".reason", 0),
            computed("Object", "string", Source::EventObject, 0),
            path("Source", "string", ".source.component", 1),
            path("Message", "string", ".message", 0),
            path("Count", "integer", ".count", 1),
            name_column(1),
        ],
        _ => vec![name_column(0), age_column()],
    }
}

fn column_cell(column: &Column, object: &Value) -> Value {
    match &column.source {
        Source::Path(c)
            if c.json_path == ".metadata.creationTimestamp" && column.format == "date" =>
        {
            age(&object["metadata"]["creationTimestamp"])
        }
        Source::Path(c) if c.type_ == "date" && column.name == "Created At" => {
            object["metadata"]["creationTimestamp"].clone()
        }
        Source::Path(c) => cell(c, object),
        Source::Count(field) => match &object[*field] {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        }
        .into(),
        Source::EventLastSeen => {
            let last = [
                &object["series"]["lastObservedTime"],
                &object["lastTimestamp"],
                &object["eventTime"],
            ]
            .into_iter()
            .find(|v| v.is_string())
            .cloned()
            .unwrap_or(Value::Null);
            age(&last)
        }
        Source::EventObject => format!(
            "{}/{}",
            object["involvedObject"]["kind"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase(),
            object["involvedObject"]["name"]
                .as_str()
                .unwrap_or_default()
        )
        .into(),
    }
}

/// A Table of `objects`; `include` is the `includeObject` option (`None`, `Metadata`, `Object`).
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    resource_version: Option<u64>,
    include: &str,
) -> Value {
    let columns = columns(rt);
    let definitions: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.type_, "format": c.format,
                "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let cells: Vec<Value> = columns.iter().map(|c| column_cell(c, object)).collect();
            let mut row = json!({"cells": cells});
            match include {
                "None" => {}
                "Object" => row["object"] = object.clone(),
                _ => row["object"] = partial_metadata(object),
            }
            row
        })
        .collect();
    let mut metadata = json!({});
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = rv.to_string().into();
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata,
        "columnDefinitions": definitions, "rows": rows})
}

/// An object as `PartialObjectMetadata` (metadata-only requests and Table rows).
pub fn partial_metadata(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

/// A list as `PartialObjectMetadataList`.
pub fn partial_metadata_list(objects: &[Value], resource_version: u64) -> Value {
    json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": objects.iter().map(partial_metadata).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_kube() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600 * 5 + 120), "5h2m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }

    #[test]
    fn crd_columns_and_event_columns() {
        let crd = json!({"spec": {"group": "g", "scope": "Namespaced", "names": {"kind": "K", "plural": "ks"},
            "versions": [{"name": "v1", "served": true, "additionalPrinterColumns": [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]}]}});
        let rt = super::super::registry::from_crd(&crd).remove(0);
        let object = json!({"metadata": {"name": "a", "creationTimestamp": jiff::Timestamp::now().to_string()}, "status": {"phase": "Pending"}});
        let t = table(&rt, &[object], Some(3), "Metadata");
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Phase", "Age"]);
        assert_eq!(t["rows"][0]["cells"], json!(["a", "Pending", "0s"]));
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");

        let events = super::super::registry::builtins()
            .into_iter()
            .find(|t| t.kind == "Event")
            .unwrap();
        let event = json!({"metadata": {"name": "e"}, "type": "Normal", "reason": "Submitted", "message": "sent",
            "involvedObject": {"kind": "DeviceOffboard", "name": "x"}, "eventTime": jiff::Timestamp::now().to_string()});
        let t = table(&events, &[event], None, "None");
        assert_eq!(t["rows"][0]["cells"][0], "0s");
        assert_eq!(t["rows"][0]["cells"][3], "deviceoffboard/x");
    }

    #[test]
    fn json_paths() {
        let o = json!({"status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}});
        assert_eq!(json_path(&o, ".status.phase"), Some(&json!("Pending")));
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("False"))
        );
        assert_eq!(
            json_path(&o, ".status.conditions[0].type"),
            Some(&json!("Ready"))
        );
        assert_eq!(json_path(&o, ".status.machineId"), None);
    }
}
