//! Validation of custom resources against their CRD's `openAPIV3Schema`:
//! pruning of unknown fields, structural checks and CEL rules.

mod cel;
mod schema;

pub use schema::show;

use super::registry::ResourceType;
use super::status::{ApiError, Cause};
use serde_json::Value;

/// How unknown fields are treated (`fieldValidation` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(raw: Option<&str>) -> Self {
        match raw {
            Some("Strict") => Self::Strict,
            Some("Ignore") => Self::Ignore,
            _ => Self::Warn,
        }
    }
}

/// Prune and validate `object` (a custom resource) in place; `old` is the live object on updates.
/// Returns the pruned unknown field paths (for warnings).
pub fn validate_custom(
    rt: &ResourceType,
    object: &mut Value,
    old: Option<&Value>,
    fields: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = &rt.schema else {
        return Ok(Vec::new());
    };
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut unknown = Vec::new();
    schema::prune(schema, object, "", true, &mut unknown);
    if fields == FieldValidation::Strict && !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            list.join(", "),
            kind = rt.kind,
            version = rt.version,
        )));
    }
    let mut errors: Vec<Cause> = Vec::new();
    schema::validate(schema, object, old, "", &mut errors);
    dedupe(&mut errors);
    if errors.is_empty() {
        Ok(unknown)
    } else {
        Err(ApiError::invalid(&rt.group, &rt.kind, &name, errors))
    }
}

fn dedupe(errors: &mut Vec<Cause>) {
    let mut seen = Vec::new();
    errors.retain(|e| {
        if seen.contains(e) {
            false
        } else {
            seen.push(e.clone());
            true
        }
    });
}

/// kube's name rule for most resources: a lowercase RFC 1123 subdomain.
pub fn validate_name(rt: &ResourceType, name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        return Ok(());
    }
    let cause = if name.is_empty() {
        Cause {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        }
    } else {
        Cause {
            reason: "FieldValueInvalid",
            message: format!(
                "Invalid value: {}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
                show(&Value::String(name.into()))
            ),
            field: "metadata.name".into(),
        }
    };
    Err(ApiError::invalid(&rt.group, &rt.kind, name, vec![cause]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doff() -> ResourceType {
        let crd = json!({
            "spec": {"group": "defender.offboard.dev", "scope": "Namespaced",
              "names": {"kind": "DeviceOffboard", "plural": "deviceoffboards"},
              "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                  "spec": {"type": "object", "required": ["comment"],
                    "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "spec is immutable"}],
                    "oneOf": [{"required": ["machineId"]}, {"required": ["deviceName"]}],
                    "properties": {
                      "machineId": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                      "deviceName": {"type": "string"},
                      "comment": {"type": "string", "minLength": 1, "maxLength": 10}}},
                  "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}
        });
        super::super::registry::from_crd(&crd).remove(0)
    }

    fn errors(object: Value, old: Option<Value>) -> Vec<(String, String)> {
        let mut object = object;
        match validate_custom(&doff(), &mut object, old.as_ref(), FieldValidation::Warn) {
            Ok(_) => Vec::new(),
            Err(e) => e.details.unwrap()["causes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["field"].as_str().unwrap().to_string(),
                        c["message"].as_str().unwrap().to_string(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn kube_style_field_errors() {
        let meta = json!({"name": "x"});
        let bad = errors(
            json!({"metadata": meta, "spec": {"machineId": "abc", "comment": "c"}}),
            None,
        );
        assert_eq!(
            bad,
            vec![(
                "spec.machineId".into(),
                "Invalid value: \"abc\": spec.machineId in body should match '^[0-9a-f]{40}$'"
                    .into()
            )]
        );
        let missing = errors(
            json!({"metadata": meta, "spec": {"deviceName": "pc"}}),
            None,
        );
        assert_eq!(
            missing,
            vec![("spec.comment".into(), "Required value".into())]
        );
        let both = errors(
            json!({"metadata": meta, "spec": {"deviceName": "pc", "machineId": "a".repeat(40), "comment": "c"}}),
            None,
        );
        assert_eq!(both.len(), 1);
        assert!(both[0].1.contains("Found 2 valid alternatives"), "{both:?}");
        let neither = errors(json!({"metadata": meta, "spec": {"comment": "c"}}), None);
        assert!(
            neither
                .iter()
                .any(|(f, m)| f == "spec.machineId" && m == "Required value"),
            "{neither:?}"
        );
        assert!(
            neither
                .iter()
                .any(|(f, m)| f == "spec" && m.contains("Found none valid")),
            "{neither:?}"
        );
        let long = errors(
            json!({"metadata": meta, "spec": {"deviceName": "pc", "comment": "01234567890"}}),
            None,
        );
        assert_eq!(
            long,
            vec![(
                "spec.comment".into(),
                "Too long: may not be more than 10 bytes".into()
            )]
        );
        let old = json!({"metadata": meta, "spec": {"deviceName": "pc", "comment": "c"}});
        let edit = errors(
            json!({"metadata": meta, "spec": {"deviceName": "pc2", "comment": "c"}}),
            Some(old.clone()),
        );
        assert_eq!(
            edit,
            vec![(
                "spec".into(),
                "Invalid value: \"object\": spec is immutable".into()
            )]
        );
        assert!(errors(old.clone(), Some(old)).is_empty());
    }

    #[test]
    fn prunes_unknown_fields_and_rejects_them_when_strict() {
        let mut object = json!({"metadata": {"name": "x", "bogus": 1}, "spec": {"deviceName": "pc", "comment": "c", "extra": 1}, "status": {"anything": 1}});
        let unknown = validate_custom(&doff(), &mut object, None, FieldValidation::Warn).unwrap();
        assert_eq!(
            unknown,
            vec!["metadata.bogus".to_string(), "spec.extra".to_string()]
        );
        assert!(object["spec"].get("extra").is_none());
        assert_eq!(object["status"]["anything"], 1);
        let mut strict = json!({"metadata": {"name": "x"}, "spec": {"deviceName": "pc", "comment": "c", "extra": 1}});
        let err = validate_custom(&doff(), &mut strict, None, FieldValidation::Strict).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message.contains("unknown field \"spec.extra\""),
            "{}",
            err.message
        );
    }
}
