//! `x-kubernetes-validations` rules evaluated with the `cel` crate.

use cel::objects::{Key, Map};
use cel::{Context, Program, Value as CelValue};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// JSON as a CEL value: integers stay `int` so `self.x == 1` compares like Kubernetes.
pub fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => CelValue::Int(i),
            None => match n.as_u64() {
                Some(u) => CelValue::UInt(u),
                None => CelValue::Float(n.as_f64().unwrap_or_default()),
            },
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let entries: HashMap<Key, CelValue> = map
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
                .collect();
            CelValue::Map(Map {
                map: Arc::new(entries),
            })
        }
    }
}

/// Whether a rule compares against the previous object (a transition rule).
pub fn is_transition_rule(rule: &str) -> bool {
    rule.contains("oldSelf")
}

/// The outcome of one rule.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleOutcome {
    Passed,
    Failed,
    /// The rule could not be compiled or evaluated; the text says why.
    Error(String),
}

/// Evaluate `rule` with `self` (and `oldSelf` for transition rules).
pub fn evaluate(rule: &str, this: &Value, old: Option<&Value>) -> RuleOutcome {
    let program = match Program::compile(rule) {
        Ok(p) => p,
        Err(e) => return RuleOutcome::Error(format!("compilation failed: {e}")),
    };
    let mut context = Context::default();
    context.add_variable_from_value("self", to_cel(this));
    if let Some(old) = old {
        context.add_variable_from_value("oldSelf", to_cel(old));
    }
    match program.execute(&context) {
        Ok(CelValue::Bool(true)) => RuleOutcome::Passed,
        Ok(CelValue::Bool(false)) => RuleOutcome::Failed,
        Ok(other) => RuleOutcome::Error(format!("rule did not evaluate to a bool: {other:?}")),
        Err(e) => RuleOutcome::Error(format!("rule evaluation error: {e}")),
    }
}

/// Evaluate a `messageExpression`; `None` when it fails or is not a string (kube then uses `message`).
pub fn message_expression(expression: &str, this: &Value, old: Option<&Value>) -> Option<String> {
    let program = Program::compile(expression).ok()?;
    let mut context = Context::default();
    context.add_variable_from_value("self", to_cel(this));
    if let Some(old) = old {
        context.add_variable_from_value("oldSelf", to_cel(old));
    }
    match program.execute(&context).ok()? {
        CelValue::String(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn self_and_old_self() {
        let spec = json!({"machineId": "a", "comment": "c"});
        assert_eq!(
            evaluate("self == oldSelf", &spec, Some(&spec)),
            RuleOutcome::Passed
        );
        let changed = json!({"machineId": "b", "comment": "c"});
        assert_eq!(
            evaluate("self == oldSelf", &changed, Some(&spec)),
            RuleOutcome::Failed
        );
        assert_eq!(
            evaluate("has(self.machineId) != has(self.deviceName)", &spec, None),
            RuleOutcome::Passed
        );
        assert_eq!(
            evaluate("size(self.comment) <= 1", &spec, None),
            RuleOutcome::Passed
        );
        assert_eq!(
            message_expression("'was ' + oldSelf.machineId", &changed, Some(&spec)).as_deref(),
            Some("was a")
        );
    }
}
