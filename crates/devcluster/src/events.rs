//! Events are stored once (in core/v1 shape) and served as both `v1` and
//! `events.k8s.io/v1`, converted field by field like kube-apiserver does.

use super::state::meta_str;
use super::status::{ApiError, Cause};
use serde_json::{Map, Value};

/// (events.k8s.io/v1 field, core/v1 field) pairs that are renamed one to one.
const RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// Fields both versions share unchanged.
const SHARED: &[&str] = &[
    "metadata",
    "related",
    "reason",
    "action",
    "type",
    "reportingInstance",
    "series",
    "eventTime",
];

/// What kube-apiserver requires of an event written through `events.k8s.io/v1`
/// (core/v1 writes stay lenient, as there).
pub fn validate_v1(event: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let blank = |field: &str| event[field].as_str().is_none_or(str::is_empty);
    if blank("eventTime") {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: "eventTime".into(),
        });
    }
    let kind = event["type"].as_str().unwrap_or_default();
    if kind != "Normal" && kind != "Warning" {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"\": has invalid value: {kind}"),
            field: "type".into(),
        });
    }
    if blank("reportingController") {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: "reportingController".into(),
        });
    }
    if causes.is_empty() {
        return Ok(());
    }
    let name = meta_str(event, "name").unwrap_or_default();
    Err(ApiError::invalid("events.k8s.io", "Event", name, causes))
}

/// An `events.k8s.io/v1` event in its stored (core/v1) shape.
pub fn to_core(event: &Value) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), "v1".into());
    out.insert("kind".into(), "Event".into());
    for field in SHARED {
        if let Some(v) = event.get(*field) {
            out.insert((*field).into(), v.clone());
        }
    }
    for (new, old) in RENAMES {
        if let Some(v) = event.get(*new) {
            out.insert((*old).into(), v.clone());
        }
    }
    if let Some(count) = event.pointer("/series/count") {
        out.insert("count".into(), count.clone());
        if let Some(last) = event.pointer("/series/lastObservedTime") {
            out.insert("lastTimestamp".into(), last.clone());
        }
    }
    Value::Object(out)
}

/// A stored event as core/v1 presents it: kubectl describe shows `source.component` as
/// "From", and kube-rs's Recorder sets only `reportingController`.
pub fn present_core(event: &Value) -> Value {
    let mut out = event.clone();
    if event.get("source").is_none_or(Value::is_null)
        && let Some(component) = event.get("reportingComponent").and_then(Value::as_str)
    {
        out["source"] = serde_json::json!({"component": component});
    }
    out
}

/// A stored (core/v1) event in `events.k8s.io/v1` shape.
pub fn to_events_v1(event: &Value) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), "events.k8s.io/v1".into());
    out.insert("kind".into(), "Event".into());
    for field in SHARED {
        if let Some(v) = event.get(*field) {
            out.insert((*field).into(), v.clone());
        }
    }
    for (new, old) in RENAMES {
        if let Some(v) = event.get(*old) {
            out.insert((*new).into(), v.clone());
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_keeps_every_field() {
        let v1 = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "DeviceOffboard", "name": "x", "uid": "u"},
            "note": "sent", "reason": "Submitted", "action": "Offboard", "type": "Normal",
            "reportingController": "defender-offboard", "reportingInstance": "pod-1",
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "series": {"count": 3, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}
        });
        let core = to_core(&v1);
        assert_eq!(core["involvedObject"]["name"], "x");
        assert_eq!(core["message"], "sent");
        assert_eq!(core["reportingComponent"], "defender-offboard");
        assert!(core.get("source").is_none());
        assert_eq!(
            present_core(&core)["source"]["component"],
            "defender-offboard"
        );
        assert_eq!(core["count"], 3);
        let back = to_events_v1(&core);
        assert!(back.get("deprecatedSource").is_none());
        for field in [
            "regarding",
            "note",
            "reason",
            "action",
            "type",
            "reportingController",
            "series",
            "eventTime",
        ] {
            assert_eq!(back[field], v1[field], "{field}");
        }
    }
}
