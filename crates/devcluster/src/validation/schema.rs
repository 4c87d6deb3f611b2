//! OpenAPI v3 structural-schema validation and pruning, with kube-apiserver's messages.

use super::super::status::Cause;
use super::cel::{self, RuleOutcome};
use regex::Regex;
use serde_json::Value;

/// How kube-apiserver shows a value in `Invalid value: ...`.
pub fn show(value: &Value) -> String {
    match value {
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        Value::Null => "\"null\"".into(),
        other => other.to_string(),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn invalid(path: &str, value: &Value, detail: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {}: {detail}", show(value)),
        field: path.to_string(),
    }
}

/// Validate `value` at `path` against `schema`, appending every error to `errors`.
/// `old` is the previous value at the same path (for CEL transition rules).
pub fn validate(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<Cause>,
) {
    let shown_path = if path.is_empty() { "<root>" } else { path };
    if value.is_null() && schema["nullable"].as_bool() == Some(true) {
        return;
    }
    // Type.
    if let Some(want) = schema["type"].as_str() {
        let got = json_type(value);
        let int_or_string = schema["x-kubernetes-int-or-string"].as_bool() == Some(true);
        let ok = got == want
            || (want == "number" && got == "integer")
            || (int_or_string && (got == "integer" || got == "string"));
        if !ok {
            errors.push(Cause {
                reason: "FieldValueTypeInvalid",
                message: format!(
                    "Invalid value: \"{got}\": {shown_path} in body must be of type {want}: \"{got}\""
                ),
                field: path.to_string(),
            });
            return;
        }
    }
    validate_value(schema, value, path, shown_path, errors);

    match value {
        Value::Object(map) => {
            if let Some(required) = schema["required"].as_array() {
                for name in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(name) {
                        errors.push(Cause {
                            reason: "FieldValueRequired",
                            message: "Required value".into(),
                            field: child(path, name),
                        });
                    }
                }
            }
            let properties = schema["properties"].as_object();
            for (key, item) in map {
                if path.is_empty() && (key == "metadata" || key == "apiVersion" || key == "kind") {
                    continue;
                }
                let old_item = old.and_then(|o| o.get(key));
                if let Some(sub) = properties.and_then(|p| p.get(key)) {
                    validate(sub, item, old_item, &child(path, key), errors);
                } else if let Some(sub) =
                    schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    validate(sub, item, old_item, &child(path, key), errors);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter().enumerate() {
                    validate(sub, item, None, &format!("{path}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
    validate_rules(schema, value, old, path, errors);
}

/// Value validations that do not depend on the type's children: formats, bounds, enum, logic.
fn validate_value(
    schema: &Value,
    value: &Value,
    path: &str,
    shown_path: &str,
    errors: &mut Vec<Cause>,
) {
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(max) = schema["maxLength"].as_u64()
            && len > max
        {
            errors.push(Cause {
                reason: "FieldValueTooLong",
                message: format!("Too long: may not be more than {max} bytes"),
                field: path.to_string(),
            });
        }
        if let Some(min) = schema["minLength"].as_u64()
            && len < min
        {
            errors.push(invalid(
                path,
                value,
                format!("{shown_path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && let Ok(re) = Regex::new(pattern)
            && !re.is_match(s)
        {
            errors.push(invalid(
                path,
                value,
                format!("{shown_path} in body should match '{pattern}'"),
            ));
        }
    }
    if let Some(n) = value.as_f64() {
        let exclusive_min = schema["exclusiveMinimum"].as_bool() == Some(true);
        let exclusive_max = schema["exclusiveMaximum"].as_bool() == Some(true);
        if let Some(min) = schema["minimum"].as_f64()
            && (n < min || (exclusive_min && n == min))
        {
            let relation = if exclusive_min {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(invalid(
                path,
                value,
                format!(
                    "{shown_path} in body should be {relation} {}",
                    schema["minimum"]
                ),
            ));
        }
        if let Some(max) = schema["maximum"].as_f64()
            && (n > max || (exclusive_max && n == max))
        {
            let relation = if exclusive_max {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(invalid(
                path,
                value,
                format!(
                    "{shown_path} in body should be {relation} {}",
                    schema["maximum"]
                ),
            ));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(max) = schema["maxItems"].as_u64()
            && items.len() as u64 > max
        {
            errors.push(Cause {
                reason: "FieldValueTooMany",
                message: format!("Too many: {}: must have at most {max} items", items.len()),
                field: path.to_string(),
            });
        }
        if let Some(min) = schema["minItems"].as_u64()
            && (items.len() as u64) < min
        {
            errors.push(invalid(
                path,
                value,
                format!("{shown_path} in body should have at least {min} items"),
            ));
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(show).collect();
        errors.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {}: supported values: {}",
                show(value),
                list.join(", ")
            ),
            field: path.to_string(),
        });
    }
    if let Some(all) = schema["allOf"].as_array() {
        for sub in all {
            validate(sub, value, None, path, errors);
        }
    }
    if let Some(any) = schema["anyOf"].as_array() {
        let results: Vec<Vec<Cause>> = any.iter().map(|sub| branch(sub, value, path)).collect();
        if !results.iter().any(Vec::is_empty) {
            errors.extend(results.into_iter().flatten());
            errors.push(invalid(
                path,
                value,
                format!("{shown_path} in body must validate at least one schema (anyOf)"),
            ));
        }
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let results: Vec<Vec<Cause>> = one.iter().map(|sub| branch(sub, value, path)).collect();
        let valid = results.iter().filter(|r| r.is_empty()).count();
        if valid == 0 {
            errors.extend(results.into_iter().flatten());
            errors.push(invalid(
                path,
                value,
                format!(
                    "{shown_path} must validate one and only one schema (oneOf). Found none valid"
                ),
            ));
        } else if valid > 1 {
            errors.push(invalid(
                path,
                value,
                format!(
                    "{shown_path} must validate one and only one schema (oneOf). Found {valid} valid alternatives"
                ),
            ));
        }
    }
    if let Some(not) = schema.get("not").filter(|s| s.is_object())
        && branch(not, value, path).is_empty()
    {
        errors.push(invalid(
            path,
            value,
            format!("{shown_path} in body must not validate the schema (not)"),
        ));
    }
}

fn branch(schema: &Value, value: &Value, path: &str) -> Vec<Cause> {
    let mut errors = Vec::new();
    validate(schema, value, None, path, &mut errors);
    errors
}

fn validate_rules(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<Cause>,
) {
    let Some(rules) = schema["x-kubernetes-validations"].as_array() else {
        return;
    };
    for rule in rules {
        let Some(expression) = rule["rule"].as_str() else {
            continue;
        };
        let transition = cel::is_transition_rule(expression);
        if transition && old.is_none() {
            // Transition rules only apply to updates of an existing value.
            continue;
        }
        let outcome = cel::evaluate(expression, value, if transition { old } else { None });
        let field = match rule["fieldPath"].as_str() {
            Some(extra) => format!("{path}{}", extra),
            None => path.to_string(),
        };
        let detail = match outcome {
            RuleOutcome::Passed => continue,
            RuleOutcome::Error(why) => why,
            RuleOutcome::Failed => rule["messageExpression"]
                .as_str()
                .and_then(|e| cel::message_expression(e, value, old))
                .or_else(|| rule["message"].as_str().map(String::from))
                .unwrap_or_else(|| format!("failed rule: {expression}")),
        };
        let (reason, message) = match rule["reason"].as_str() {
            Some("FieldValueForbidden") => ("FieldValueForbidden", format!("Forbidden: {detail}")),
            Some("FieldValueRequired") => {
                ("FieldValueRequired", format!("Required value: {detail}"))
            }
            Some("FieldValueDuplicate") => {
                ("FieldValueDuplicate", format!("Duplicate value: {detail}"))
            }
            _ => (
                "FieldValueInvalid",
                format!("Invalid value: {}: {detail}", show(value)),
            ),
        };
        errors.push(Cause {
            reason,
            message,
            field,
        });
    }
}

/// Fields of `metadata` kube keeps; others are pruned like kube-apiserver does.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Drop fields the structural schema does not know (recording their paths) and
/// `null`s of non-nullable fields, as kube-apiserver does before validation.
pub fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true);
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|s| s.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if root && (key == "apiVersion" || key == "kind") {
                    continue;
                }
                if root && key == "metadata" {
                    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                        let fields: Vec<String> = meta.keys().cloned().collect();
                        for field in fields {
                            if !OBJECT_META_FIELDS.contains(&field.as_str()) {
                                meta.remove(&field);
                                unknown.push(format!("metadata.{field}"));
                            }
                        }
                    }
                    continue;
                }
                let sub = properties.and_then(|p| p.get(&key)).or(additional);
                match sub {
                    Some(sub) => {
                        let item = map.get_mut(&key).expect("key listed above");
                        if item.is_null() && sub["nullable"].as_bool() != Some(true) {
                            map.remove(&key);
                            continue;
                        }
                        prune(sub, item, &child(path, &key), false, unknown);
                    }
                    None if preserve
                        || schema.get("additionalProperties") == Some(&Value::Bool(true)) => {}
                    None => {
                        map.remove(&key);
                        unknown.push(child(path, &key));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(sub, item, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}
