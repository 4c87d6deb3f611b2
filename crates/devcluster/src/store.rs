//! Objects by storage, the global resourceVersion, and per-storage watch history.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One committed write, kept for watches that resume from a resourceVersion.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub kind: ChangeType,
    pub namespace: String,
    pub object: Arc<Value>,
    /// The object before the write, so a filtered watch can tell when it left the selection.
    pub previous: Option<Arc<Value>>,
}

#[derive(Debug, Default)]
struct History {
    changes: VecDeque<Change>,
    /// The resourceVersion of the newest change dropped from the history.
    compacted: u64,
}

/// The key of an object inside one storage: (namespace, name); cluster-scoped objects use "".
pub type Key = (String, String);

#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: HashMap<String, BTreeMap<Key, Value>>,
    histories: HashMap<String, History>,
    history_limit: usize,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 0,
            objects: HashMap::new(),
            histories: HashMap::new(),
            history_limit: history_limit.max(1),
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    /// Claim the resourceVersion of the next write.
    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, storage: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(storage)?
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// Objects of a storage, ordered by namespace then name; `None` means all namespaces.
    pub fn list(&self, storage: &str, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .get(storage)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(_, v)| v)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Store `object` (whose resourceVersion is `rv`) and record the change.
    pub fn put(&mut self, storage: &str, key: Key, object: Value, rv: u64) {
        let previous = self
            .objects
            .entry(storage.to_string())
            .or_default()
            .insert(key.clone(), object.clone());
        let kind = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(storage, kind, key.0, object, previous, rv);
    }

    /// Remove an object; `last` is its final state carrying the deletion's resourceVersion.
    pub fn remove(&mut self, storage: &str, key: &Key, last: Value, rv: u64) {
        let previous = self.objects.get_mut(storage).and_then(|o| o.remove(key));
        self.record(
            storage,
            ChangeType::Deleted,
            key.0.clone(),
            last,
            previous,
            rv,
        );
    }

    fn record(
        &mut self,
        storage: &str,
        kind: ChangeType,
        namespace: String,
        object: Value,
        previous: Option<Value>,
        rv: u64,
    ) {
        let history = self.histories.entry(storage.to_string()).or_default();
        history.changes.push_back(Change {
            rv,
            kind,
            namespace,
            object: Arc::new(object),
            previous: previous.map(Arc::new),
        });
        while history.changes.len() > self.history_limit {
            if let Some(dropped) = history.changes.pop_front() {
                history.compacted = dropped.rv;
            }
        }
    }

    /// Objects of a storage as they were at `rv` (ordered like [`Store::list`]), rebuilt from
    /// the history; `Err(oldest)` when changes after `rv` were already dropped.
    pub fn list_at(
        &self,
        storage: &str,
        namespace: Option<&str>,
        rv: u64,
    ) -> Result<Vec<(Key, Value)>, u64> {
        let mut objects: BTreeMap<Key, Value> = self
            .objects
            .get(storage)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // Undo the changes after `rv`, newest first, so each key ends as it was at `rv`.
        for change in self.changes_since(storage, rv)?.into_iter().rev() {
            if namespace.is_some_and(|want| want != change.namespace) {
                continue;
            }
            let name = change.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = (change.namespace.clone(), name);
            match change.previous {
                Some(previous) => objects.insert(key, Value::clone(&previous)),
                None => objects.remove(&key),
            };
        }
        Ok(objects.into_iter().collect())
    }

    /// Changes of a storage after `rv`, or `Err(oldest)` when some were already dropped.
    pub fn changes_since(&self, storage: &str, rv: u64) -> Result<Vec<Change>, u64> {
        let Some(history) = self.histories.get(storage) else {
            return Ok(Vec::new());
        };
        if rv < history.compacted {
            return Err(history.compacted + 1);
        }
        // Changes are in resourceVersion order: find the first newer one without scanning.
        let start = history.changes.partition_point(|c| c.rv <= rv);
        Ok(history.changes.range(start..).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn history_is_bounded_and_reports_expiry() {
        let mut store = Store::new(2);
        for i in 0..4 {
            let rv = store.next_rv();
            store.put("s", (String::new(), format!("o{i}")), json!({}), rv);
        }
        assert_eq!(store.changes_since("s", 1).err(), Some(3));
        let kept = store.changes_since("s", 2).expect("rv 2 is still covered");
        assert_eq!(kept.iter().map(|c| c.rv).collect::<Vec<_>>(), vec![3, 4]);
        assert!(store.changes_since("s", 4).expect("current").is_empty());
    }

    #[test]
    fn lists_as_of_a_kept_version() {
        let mut store = Store::new(3);
        let key = |name: &str| (String::new(), name.to_string());
        let object = |name: &str, v: u64| json!({"metadata": {"name": name}, "v": v});
        for name in ["a", "b"] {
            let rv = store.next_rv();
            store.put("s", key(name), object(name, rv), rv);
        }
        let at = store.current_rv();
        let rv = store.next_rv();
        store.put("s", key("a"), object("a", rv), rv);
        let rv = store.next_rv();
        store.remove("s", &key("b"), object("b", rv), rv);
        let rv = store.next_rv();
        store.put("s", key("c"), object("c", rv), rv);
        let then: Vec<(String, Value)> = store
            .list_at("s", None, at)
            .expect("kept")
            .into_iter()
            .map(|((_, name), v)| (name, v["v"].clone()))
            .collect();
        assert_eq!(then, vec![("a".into(), json!(1)), ("b".into(), json!(2))]);
        assert_eq!(store.list_at("s", None, 1).err(), Some(3));
    }
}
