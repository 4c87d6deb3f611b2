//! What sits behind the server's lock, and small helpers that both the write
//! path (`ops`) and object lifecycles (`lifecycle`) read, so neither has to
//! import the other's internals.

use super::registry::Registry;
use super::store::Store;
use serde_json::Value;

/// Everything behind the server's lock.
#[derive(Debug)]
pub struct State {
    pub registry: Registry,
    pub store: Store,
}

/// Now, in whole seconds like kube's `metav1.Time`.
pub fn now() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

pub fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"][field].as_str().filter(|s| !s.is_empty())
}
