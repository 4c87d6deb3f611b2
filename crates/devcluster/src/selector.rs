//! Label and field selectors with kube-apiserver's syntax.

use super::status::ApiError;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Split on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, ch) in input.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&input[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(raw: &str, selector: &str) -> Result<Vec<String>, ApiError> {
    let inner = raw
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: found '{raw}', expected: '(' in label selector {selector:?}"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in split_top_level(selector) {
            let requirement = if let Some(key) = part.strip_prefix('!') {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::DoesNotExist,
                }
            } else if let Some((key, value)) = part.split_once("!=") {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::NotEquals(value.trim().to_string()),
                }
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::Equals(value.trim().to_string()),
                }
            } else if let Some((key, set)) = part.split_once(" notin ") {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::NotIn(parse_set(set, selector)?),
                }
            } else if let Some((key, set)) = part.split_once(" in ") {
                LabelRequirement {
                    key: key.trim().to_string(),
                    op: LabelOp::In(parse_set(set, selector)?),
                }
            } else if part.contains(char::is_whitespace) || part.contains('(') {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?} in label selector {selector:?}"
                )));
            } else {
                LabelRequirement {
                    key: part.to_string(),
                    op: LabelOp::Exists,
                }
            };
            if requirement.key.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: empty key in label selector {selector:?}"
                )));
            }
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key).and_then(Value::as_str);
            match &r.op {
                LabelOp::Equals(want) => value == Some(want.as_str()),
                LabelOp::NotEquals(want) => value != Some(want.as_str()),
                LabelOp::In(set) => value.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => value.is_none_or(|v| !set.iter().any(|s| s == v)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// A parsed `fieldSelector` over the fields a resource supports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    /// (field path in the stored object, wanted value, equal?)
    terms: Vec<(String, String, bool)>,
}

/// Fields events can be selected by, as kube-apiserver allows (`regarding.*` is accepted too).
const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

impl FieldSelector {
    /// `events` enables the event fields; `extra` lists other supported fields (e.g. `type` of secrets).
    pub fn parse(selector: &str, events: bool, extra: &[&str]) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in split_top_level(selector) {
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{selector}'; can't understand '{part}'"
                )));
            };
            let mut field = field.trim().to_string();
            if events {
                if let Some(rest) = field.strip_prefix("regarding.") {
                    field = format!("involvedObject.{rest}");
                } else if field == "reportingController" {
                    field = "reportingComponent".into();
                } else if field == "deprecatedSource" {
                    field = "source".into();
                }
            }
            let known = field == "metadata.name"
                || field == "metadata.namespace"
                || (events && EVENT_FIELDS.contains(&field.as_str()))
                || extra.contains(&field.as_str());
            if !known {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field, value.trim().to_string(), equal));
        }
        Ok(Self { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(field, want, equal)| {
            let actual = field_value(object, field);
            (actual == *want) == *equal
        })
    }
}

fn field_value(object: &Value, field: &str) -> String {
    if field == "source" {
        return object["source"]["component"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    let mut current = object;
    for segment in field.split('.') {
        current = &current[segment];
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({"env": "prod", "tier": "web"}));
        for (sel, want) in [
            ("env=prod", true),
            ("env==prod", true),
            ("env!=prod", false),
            ("env in (dev, prod)", true),
            ("env notin (dev,prod)", false),
            ("tier,env=prod", true),
            ("!tier", false),
            ("!team", true),
            ("team", false),
            ("team!=x", true),
            ("team notin (x)", true),
            ("env in (dev)", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("env in dev").is_err());
    }

    #[test]
    fn field_selector_for_events() {
        let event = json!({"metadata": {"name": "e", "namespace": "ns"},
            "involvedObject": {"kind": "DeviceOffboard", "name": "x", "uid": "u1"}});
        let sel = FieldSelector::parse(
            "involvedObject.name=x,involvedObject.kind=DeviceOffboard,involvedObject.uid=u1,metadata.namespace=ns",
            true,
            &[],
        )
        .unwrap();
        assert!(sel.matches(&event));
        let regarding = FieldSelector::parse("regarding.name=y", true, &[]).unwrap();
        assert!(!regarding.matches(&event));
        assert!(FieldSelector::parse("spec.x=1", false, &[]).is_err());
    }
}
