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

fn column(name: &str, type_: &str, format: &str, path: &str) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: format.into(),
        description: String::new(),
        priority: 0,
        json_path: path.into(),
    }
}

/// The columns after Name: a CRD's printer columns, or the built-in kind's usual ones.
fn columns(rt: &ResourceType) -> Vec<PrinterColumn> {
    if rt.custom {
        if rt.printer_columns.is_empty() {
            return vec![column("Age", "date", "", ".metadata.creationTimestamp")];
        }
        return rt.printer_columns.clone();
    }
    let age = column("Age", "date", "", ".metadata.creationTimestamp");
    match rt.kind.as_str() {
        "Namespace" => vec![column("Status", "string", "", ".status.phase"), age],
        "Secret" => vec![column("Type", "string", "", ".type"), age],
        "Lease" => vec![column("Holder", "string", "", ".spec.holderIdentity"), age],
        "Event" => vec![
            column("Type", "string", "", ".type"),
            column("Reason", "string", "", ".reason"),
            column("Object", "string", "", ".involvedObject.name"),
            column("Message", "string", "", ".message"),
        ],
        _ => vec![age],
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
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    definitions.extend(columns.iter().map(|c| {
        json!({"name": c.name, "type": c.type_, "format": c.format,
            "description": if c.description.is_empty() { format!("Custom resource definition column (in JSONPath format): {}", c.json_path) } else { c.description.clone() },
            "priority": c.priority})
    }));
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            cells.extend(columns.iter().map(|c| cell(c, object)));
            let mut row = json!({"cells": cells});
            match include {
                "None" => {}
                "Object" => row["object"] = object.clone(),
                _ => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": object["metadata"]});
                }
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
