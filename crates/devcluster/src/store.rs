//! Objects by storage, the global resourceVersion, and per-storage watch history.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{Bound, ControlFlow};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How many changes per resource the API keeps for watches (and continued
/// lists) that resume from a resourceVersion; a version older than the kept
/// ones is answered `410 Expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchHistory {
    /// The newest changes kept however old they are.
    pub min_changes: usize,
    /// Changes younger than this are kept beyond `min_changes`.
    pub fresh_for: Duration,
    /// Never more than this many, however young.
    pub max_changes: usize,
}

impl WatchHistory {
    /// What kube-apiserver's watch cache keeps per resource type: the newest
    /// 100 changes however old, and every change of the last 75 s (a minute of
    /// bookmarks plus slack, so a watcher resuming from its last bookmark is
    /// still covered), up to 102,400. Its ring starts at 100, doubles while
    /// its oldest change is younger than 75 s and halves once a quarter of it
    /// is older; this keeps the same changes without the power-of-two steps.
    /// (etcd's own history, compacted every 5 minutes, is longer, but watches
    /// and continued lists are answered from the cache.)
    pub const KUBE_WATCH_CACHE: Self = Self {
        min_changes: 100,
        fresh_for: Duration::from_secs(75),
        max_changes: 100 * 1024,
    };

    /// Exactly `n` changes per resource, however recent: small values make
    /// watches expire and clients relist often.
    pub fn changes(n: usize) -> Self {
        let n = n.max(1);
        Self {
            min_changes: n,
            fresh_for: Duration::ZERO,
            max_changes: n,
        }
    }
}

impl Default for WatchHistory {
    fn default() -> Self {
        Self::KUBE_WATCH_CACHE
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
    /// Each change with the moment it was recorded, oldest first.
    changes: VecDeque<(Change, Instant)>,
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
    history: WatchHistory,
    /// Versions up to this one were compacted away in every storage.
    floor: u64,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 0,
            objects: HashMap::new(),
            histories: HashMap::new(),
            history: WatchHistory::changes(history_limit),
            floor: 0,
        }
    }

    /// Set how much history each resource keeps from the next write on.
    pub fn set_history(&mut self, history: WatchHistory) {
        self.history = WatchHistory {
            min_changes: history.min_changes.max(1),
            fresh_for: history.fresh_for,
            max_changes: history.max_changes.max(history.min_changes).max(1),
        };
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
        self.put_at(storage, key, object, rv, Instant::now());
    }

    /// [`Store::put`] as recorded at `at`.
    pub fn put_at(&mut self, storage: &str, key: Key, object: Value, rv: u64, at: Instant) {
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
        let change = Change {
            rv,
            kind,
            namespace: key.0,
            object: Arc::new(object),
            previous: previous.map(Arc::new),
        };
        self.record(storage, change, at);
    }

    /// Remove an object; `last` is its final state carrying the deletion's resourceVersion.
    pub fn remove(&mut self, storage: &str, key: &Key, last: Value, rv: u64) {
        let previous = self.objects.get_mut(storage).and_then(|o| o.remove(key));
        let change = Change {
            rv,
            kind: ChangeType::Deleted,
            namespace: key.0.clone(),
            object: Arc::new(last),
            previous: previous.map(Arc::new),
        };
        self.record(storage, change, Instant::now());
    }

    /// Keep `change` (made at `at`) and drop what the history no longer holds.
    fn record(&mut self, storage: &str, change: Change, at: Instant) {
        let history = self.histories.entry(storage.to_string()).or_default();
        history.changes.push_back((change, at));
        // Changes leave only when a write comes, as from kube's ring: a quiet
        // resource keeps its history however old.
        let limit = self.history;
        while let Some((oldest, recorded)) = history.changes.front() {
            let len = history.changes.len();
            let stale = at.saturating_duration_since(*recorded) > limit.fresh_for;
            if len <= limit.min_changes || (len <= limit.max_changes && !stale) {
                break;
            }
            history.compacted = oldest.rv;
            history.changes.pop_front();
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
        let start = history.changes.partition_point(|(c, _)| c.rv <= rv);
        Ok(history
            .changes
            .range(start..)
            .map(|(c, _)| c.clone())
            .collect())
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

    /// Puts `n` objects into storage "s" recorded at `at`.
    fn writes(store: &mut Store, n: usize, at: Instant) {
        for _ in 0..n {
            let rv = store.next_rv();
            store.put_at("s", (String::new(), format!("o{rv}")), json!({}), rv, at);
        }
    }

    #[test]
    fn the_default_history_forgets_what_kubes_watch_cache_forgets() {
        let mut store = Store::new(1);
        store.set_history(WatchHistory::default());
        let start = Instant::now();
        writes(&mut store, 150, start);
        // A burst younger than 75 s is kept whole, beyond the newest 100.
        assert!(store.changes_since("s", 0).is_ok());
        // 76 s later the burst is stale: one write keeps the newest 100 only.
        writes(&mut store, 1, start + Duration::from_secs(76));
        assert_eq!(store.changes_since("s", 50).err(), Some(52));
        let kept = store.changes_since("s", 51).expect("the newest 100 stay");
        assert_eq!(kept.len(), 100);
    }

    #[test]
    fn the_default_history_holds_at_most_102_400_changes_however_young() {
        let mut store = Store::new(1);
        store.set_history(WatchHistory::default());
        writes(&mut store, 102_401, Instant::now());
        assert_eq!(store.changes_since("s", 0).err(), Some(2));
        assert_eq!(store.changes_since("s", 1).map(|c| c.len()), Ok(102_400));
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
