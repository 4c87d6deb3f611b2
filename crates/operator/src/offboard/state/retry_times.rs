//! The `nextRetryAt` times this process wrote. Only those are waited for: a
//! time another replica wrote (before a failover, or a restart) counts on
//! that replica's clock and budget, so this process plans such a resource
//! against its own budget instead, which writes a time of its own.

use jiff::Timestamp;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long after its time an entry is kept: a resource deleted while it
/// waited leaves one behind, swept out this long after it was due.
const KEEP_AFTER_DUE: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Times {
    by_uid: HashMap<String, Timestamp>,
    swept: Option<Timestamp>,
}

#[derive(Clone, Default)]
pub(crate) struct RetryTimes(Arc<Mutex<Times>>);

impl RetryTimes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Times> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process wrote `at` (or no time) as `uid`'s `nextRetryAt`.
    pub(crate) fn wrote(&self, uid: &str, at: Option<Timestamp>, now: Timestamp) {
        let mut times = self.lock();
        match at {
            Some(at) => times.by_uid.insert(uid.to_string(), at),
            None => times.by_uid.remove(uid),
        };
        let keep = jiff::SignedDuration::try_from(KEEP_AFTER_DUE).unwrap_or_default();
        let due = times
            .swept
            .is_none_or(|swept| now.duration_since(swept) >= keep);
        if due {
            times.by_uid.retain(|_, at| now.duration_since(*at) < keep);
            times.by_uid.shrink_to_fit();
            times.swept = Some(now);
        }
    }

    /// Whether `at` is the `nextRetryAt` this process last wrote for `uid`.
    pub(crate) fn is_own(&self, uid: &str, at: Timestamp) -> bool {
        self.lock().by_uid.get(uid) == Some(&at)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_uid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_time_this_process_wrote_is_its_own_and_old_ones_are_swept() {
        let times = RetryTimes::default();
        let now: Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        let later = now + jiff::SignedDuration::from_secs(600);
        assert!(!times.is_own("a", later), "another replica's time");
        times.wrote("a", Some(later), now);
        assert!(times.is_own("a", later));
        assert!(
            !times.is_own("a", later + jiff::SignedDuration::from_secs(1)),
            "a time rewritten elsewhere since"
        );
        times.wrote("a", None, now);
        assert!(!times.is_own("a", later));
        // A deleted waiter's entry goes an hour after it was due.
        times.wrote("gone", Some(later), now);
        let much_later = later + jiff::SignedDuration::from_hours(2);
        times.wrote("b", Some(much_later), much_later);
        assert_eq!(times.len(), 1);
    }
}
