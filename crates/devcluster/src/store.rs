//! Objects by storage, the global resourceVersion, and per-storage watch history.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{Bound, ControlFlow};
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
    /// Versions up to this one were compacted away in every storage.
    floor: u64,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 0,
            objects: HashMap::new(),
            histories: HashMap::new(),
            history_limit: history_limit.max(1),
            floor: 0,
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

    /// Walk the objects of a storage as they were at `rv`, in key order, starting
    /// after `after`, until `visit` breaks; `Err(oldest)` when changes after `rv`
    /// were already dropped.
    ///
    /// A page of a list costs the page and the changes since `rv`, not the whole
    /// storage: the current objects are read in place, and only keys written
    /// since `rv` are taken from the history (as they were before their first
    /// later change). Cloning every object per page made paging through a large
    /// storage quadratic and held the lock long enough to stall every write.
    pub fn visit_at(
        &self,
        storage: &str,
        namespace: Option<&str>,
        rv: u64,
        after: Option<&Key>,
        mut visit: impl FnMut(&Key, &Value) -> ControlFlow<()>,
    ) -> Result<(), u64> {
        // Each key changed after `rv` as it was at `rv` (`None`: absent then).
        let mut then: BTreeMap<Key, Option<Arc<Value>>> = BTreeMap::new();
        for change in self.changes_since(storage, rv)? {
            let name = change.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            then.entry((change.namespace, name))
                .or_insert(change.previous);
        }
        let lower = match (after, namespace) {
            (Some(after), Some(ns)) if after.0.as_str() >= ns => Bound::Excluded(after.clone()),
            (_, Some(ns)) => Bound::Included((ns.to_string(), String::new())),
            (Some(after), None) => Bound::Excluded(after.clone()),
            (None, None) => Bound::Unbounded,
        };
        let range = (lower, Bound::Unbounded);
        let empty = BTreeMap::new();
        let mut current = self
            .objects
            .get(storage)
            .unwrap_or(&empty)
            .range::<Key, _>(range.clone())
            .filter(|(key, _)| !then.contains_key(*key))
            .peekable();
        let mut earlier = then
            .range::<Key, _>(range)
            .filter_map(|(key, value)| value.as_deref().map(|v| (key, v)))
            .peekable();
        loop {
            let next = match (current.peek(), earlier.peek()) {
                (Some((a, _)), Some((b, _))) if b < a => earlier.next(),
                (Some(_), _) => current.next(),
                (None, _) => earlier.next(),
            };
            let Some((key, object)) = next else {
                return Ok(());
            };
            if namespace.is_some_and(|want| want != key.0) {
                return Ok(());
            }
            if visit(key, object).is_break() {
                return Ok(());
            }
        }
    }

    /// Drop every kept change, as etcd's compaction does: only the current version stays valid.
    pub fn compact(&mut self) {
        self.floor = self.rv;
        for history in self.histories.values_mut() {
            history.changes.clear();
            history.compacted = self.rv;
        }
    }

    /// Changes of a storage after `rv`, or `Err(oldest)` when some were already dropped.
    pub fn changes_since(&self, storage: &str, rv: u64) -> Result<Vec<Change>, u64> {
        let history = self.histories.get(storage);
        let compacted = history.map_or(0, |h| h.compacted).max(self.floor);
        if rv < compacted {
            return Err(compacted + 1);
        }
        let Some(history) = history else {
            return Ok(Vec::new());
        };
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
        let then: Vec<(String, Value)> = at_version(&store, None, at, None)
            .expect("kept")
            .into_iter()
            .map(|((_, name), v)| (name, v["v"].clone()))
            .collect();
        assert_eq!(then, vec![("a".into(), json!(1)), ("b".into(), json!(2))]);
        assert_eq!(at_version(&store, None, 1, None).err(), Some(3));
    }

    fn at_version(
        store: &Store,
        namespace: Option<&str>,
        rv: u64,
        after: Option<&Key>,
    ) -> Result<Vec<(Key, Value)>, u64> {
        let mut seen = Vec::new();
        store.visit_at("s", namespace, rv, after, |key, object| {
            seen.push((key.clone(), object.clone()));
            ControlFlow::Continue(())
        })?;
        Ok(seen)
    }

    #[test]
    fn a_page_at_an_old_version_keeps_namespace_order_and_starts_after_the_token() {
        let mut store = Store::new(10);
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        let object = |name: &str, v: u64| json!({"metadata": {"name": name}, "v": v});
        for (ns, name) in [("a", "x"), ("b", "m"), ("b", "p"), ("c", "x")] {
            let rv = store.next_rv();
            store.put("s", key(ns, name), object(name, rv), rv);
        }
        let at = store.current_rv();
        // After `at`: "b/m" deleted, "b/n" added, "b/p" changed twice.
        let rv = store.next_rv();
        store.remove("s", &key("b", "m"), object("m", rv), rv);
        for name in ["n", "p", "p"] {
            let rv = store.next_rv();
            store.put("s", key("b", name), object(name, rv), rv);
        }
        let names = |found: Vec<(Key, Value)>| -> Vec<(String, u64)> {
            found
                .into_iter()
                .map(|((ns, name), v)| (format!("{ns}/{name}"), v["v"].as_u64().unwrap_or(0)))
                .collect()
        };
        let old = at_version(&store, Some("b"), at, None).expect("kept");
        assert_eq!(names(old), vec![("b/m".into(), 2), ("b/p".into(), 3)]);
        let rest = at_version(&store, Some("b"), at, Some(&key("b", "m"))).expect("kept");
        assert_eq!(names(rest), vec![("b/p".into(), 3)]);
        let now = at_version(&store, None, store.current_rv(), Some(&key("a", "x")));
        assert_eq!(
            names(now.expect("current")),
            vec![("b/n".into(), 6), ("b/p".into(), 8), ("c/x".into(), 4)]
        );
        // A token from another namespace's range does not leak into this one.
        let before = at_version(&store, Some("b"), at, Some(&key("a", "z"))).expect("kept");
        assert_eq!(before.len(), 2);
        let past = at_version(&store, Some("b"), at, Some(&key("c", "a"))).expect("kept");
        assert!(past.is_empty());
    }
}
