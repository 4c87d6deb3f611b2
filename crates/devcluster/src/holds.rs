//! Lists held back until a test lets them go. Not kube-apiserver's: a
//! test's stand-in for a list that takes very long (a cluster's years of
//! finished objects), and deterministic where a delay is not: whatever a
//! client does before a held list answers, it did without that list.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

/// Which lists wait: a resource's plural and the exact `labelSelector`
/// the client sent (empty: a list without one).
#[derive(Debug, Default)]
pub struct ListHolds {
    held: Mutex<HashSet<(String, String)>>,
    released: Notify,
    waited: AtomicU64,
}

impl ListHolds {
    pub fn hold(&self, plural: &str, label_selector: &str) {
        self.lock()
            .insert((plural.to_string(), label_selector.to_string()));
    }

    /// Let every held list answer, and hold no more.
    pub fn release_all(&self) {
        self.lock().clear();
        self.released.notify_waiters();
    }

    /// How many list requests have been held so far.
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }

    /// Returns once a list of `plural` with `label_selector` may answer.
    pub async fn pass(&self, plural: &str, label_selector: &str) {
        let key = (plural.to_string(), label_selector.to_string());
        let mut counted = false;
        loop {
            // Created before the check: `notify_waiters` wakes it even if
            // the release comes between the check and the await.
            let released = self.released.notified();
            if !self.lock().contains(&key) {
                return;
            }
            if !counted {
                counted = true;
                self.waited.fetch_add(1, Ordering::Relaxed);
            }
            released.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_held_list_waits_for_its_release_and_others_do_not() {
        let holds = Arc::new(ListHolds::default());
        holds.hold("things", "a=b");
        holds.pass("things", "").await;
        holds.pass("others", "a=b").await;
        let waiting = tokio::spawn({
            let holds = holds.clone();
            async move { holds.pass("things", "a=b").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "held until released");
        assert_eq!(holds.waited(), 1);
        holds.release_all();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released")
            .unwrap();
    }
}
