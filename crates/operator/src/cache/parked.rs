//! Resources that wait a long time leave the controller's cache until shortly
//! before their time. At MDE's 1,500 offboards an hour, most of a burst of
//! 10,000 waits hours for budget; holding each as a whole object (about 2 KB
//! in kube's reflector, plus the scheduler's entry) made memory grow with the
//! backlog. A waiting resource is parked instead: its key, wake time and
//! creation time stay here, and shortly before `status.nextRetryAt` it is read
//! again from the API server and fed back into the cache as if the watch had
//! just delivered it.
//!
//! Parking never changes a decision: a resource is parked only while the
//! decision for it ([`crate::offboard::decision::plan`]) can be nothing but "wait until
//! `nextRetryAt`" for as long as the object stays as it is. Any change to it
//! (a cancel annotation, a deletion, a new status) comes through the watch,
//! and a changed object is judged again. After a restart the watch's first
//! list parks what waits, from the status alone. A failed read keeps the
//! resource parked and tries again; nothing is dropped but what the API
//! server says is gone.
//!
//! Written by hand: kube-runtime's reflector keeps every watched object, and
//! its controller reconciles only what that cache holds, so the feed into the
//! cache is the only place to leave objects out.

use crate::crd::{DeviceOffboard, Phase};
use futures::{Stream, StreamExt};
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::runtime::watcher;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Only waits longer than this are parked: a shorter one costs less in the
/// cache than the read that brings it back.
pub(crate) const PARK_BEYOND: Duration = Duration::from_secs(3);

/// A parked resource is read back this long before its `nextRetryAt`, so it
/// is in the cache again when the reconcile's own requeue fires.
pub(crate) const WAKE_EARLY: Duration = Duration::from_secs(1);

/// A read that failed (API server away) is tried again after this long.
const REREAD_AFTER: Duration = Duration::from_secs(5);

/// How many parked resources are read back at once.
const READS_AT_ONCE: usize = 8;

/// Until when `obj` may wait outside the cache: a `Pending` resource with
/// nothing sent and nothing to cancel, whose `nextRetryAt` is more than
/// [`PARK_BEYOND`] away. For such a resource the decision is "wait until
/// `nextRetryAt`" whatever the process remembers; `Submitting` is never
/// parked, since its lookup clock starts when this process observes it.
pub(crate) fn parked_until(obj: &DeviceOffboard, now: Timestamp) -> Option<Timestamp> {
    let status = obj.status.as_ref()?;
    let cancel_asked = obj
        .annotations()
        .contains_key(crate::crd::CANCEL_ANNOTATION);
    let quiet = status.phase == Some(Phase::Pending)
        && status.machine_action_id.is_none()
        && status.cancel.is_none()
        && !cancel_asked
        && obj.metadata.deletion_timestamp.is_none();
    let at = status.next_retry_at.as_ref()?.0;
    let beyond = SignedDuration::try_from(PARK_BEYOND).unwrap_or(SignedDuration::MAX);
    (quiet && at.duration_since(now) > beyond).then_some(at)
}

/// A parked resource's `namespace/name`, shared by the lot's two indexes (one
/// allocation per resource: thousands may be parked).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key(Arc<str>);

impl Key {
    pub(crate) fn new(namespace: &str, name: &str) -> Self {
        Key(format!("{namespace}/{name}").into())
    }

    fn of(obj: &DeviceOffboard) -> Self {
        Key::new(&obj.namespace().unwrap_or_default(), &obj.name_any())
    }

    /// Neither part can hold a `/`: both are DNS names.
    pub(crate) fn namespace(&self) -> &str {
        self.0
            .split_once('/')
            .map_or("", |(namespace, _)| namespace)
    }

    pub(crate) fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, name)| name)
    }
}

#[derive(Default)]
struct Lot {
    /// Each parked resource's wake time and creation time.
    parked: HashMap<Key, (Timestamp, Option<Timestamp>)>,
    /// The same, ordered by wake time.
    due: BTreeSet<(Timestamp, Key)>,
}

/// The parked resources of this process.
#[derive(Default)]
pub(crate) struct ParkingLot {
    lot: Mutex<Lot>,
    /// Woken when a resource is parked, so the waker sees an earlier time.
    parked_one: Notify,
}

impl ParkingLot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lot> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.lot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Park `key` until `wake` (replacing an earlier time).
    pub(crate) fn park(&self, key: Key, wake: Timestamp, created: Option<Timestamp>) {
        let mut lot = self.lock();
        if let Some((old, _)) = lot.parked.insert(key.clone(), (wake, created)) {
            lot.due.remove(&(old, key.clone()));
        }
        lot.due.insert((wake, key));
        drop(lot);
        self.parked_one.notify_one();
    }

    /// `key` is in the cache again, or gone.
    pub(crate) fn unpark(&self, key: &Key) {
        let mut lot = self.lock();
        if let Some((wake, _)) = lot.parked.remove(key) {
            lot.due.remove(&(wake, key.clone()));
        }
    }

    /// Take every resource due by `by`, earliest first.
    pub(crate) fn take_due(&self, by: Timestamp) -> Vec<Key> {
        let mut lot = self.lock();
        let mut taken = Vec::new();
        while let Some((wake, _)) = lot.due.first()
            && *wake <= by
        {
            let Some((_, key)) = lot.due.pop_first() else {
                break;
            };
            lot.parked.remove(&key);
            taken.push(key);
        }
        taken
    }

    /// The earliest wake time.
    pub(crate) fn next_wake(&self) -> Option<Timestamp> {
        self.lock().due.first().map(|(wake, _)| *wake)
    }

    /// How many resources are parked.
    pub(crate) fn len(&self) -> usize {
        self.lock().parked.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The creation time of the oldest parked resource.
    pub(crate) fn oldest_created(&self) -> Option<Timestamp> {
        self.lock()
            .parked
            .values()
            .filter_map(|(_, created)| *created)
            .min()
    }
}

/// The watch events as the cache should see them: a resource that may wait
/// outside it is parked and, if the cache holds it, deleted from the cache;
/// one the watch lists again on a restart is left out of the new cache. The
/// controller reconciles only what the cache holds, so a parked resource is
/// not reconciled until it is read back.
pub(crate) fn park_events<S>(
    events: S,
    lot: Arc<ParkingLot>,
) -> impl Stream<Item = Result<watcher::Event<DeviceOffboard>, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<DeviceOffboard>, watcher::Error>>,
{
    events.filter_map(move |event| {
        let out = match event {
            // `park` also takes a resource that may not wait out of the
            // lot; such an Apply passes on unchanged (last arm).
            Ok(watcher::Event::Apply(obj)) if park(&lot, &obj) => {
                Some(Ok(watcher::Event::Delete(obj)))
            }
            Ok(watcher::Event::InitApply(obj)) => {
                (!park(&lot, &obj)).then_some(Ok(watcher::Event::InitApply(obj)))
            }
            Ok(watcher::Event::Delete(obj)) => {
                lot.unpark(&Key::of(&obj));
                Some(Ok(watcher::Event::Delete(obj)))
            }
            other => Some(other),
        };
        std::future::ready(out)
    })
}

/// Park `obj` if it may wait outside the cache, else take it out of the lot.
fn park(lot: &ParkingLot, obj: &DeviceOffboard) -> bool {
    let key = Key::of(obj);
    match parked_until(obj, Timestamp::now()) {
        Some(at) => {
            let early = SignedDuration::try_from(WAKE_EARLY).unwrap_or_default();
            let created = obj.metadata.creation_timestamp.as_ref().map(|t| t.0);
            lot.park(key, at.saturating_sub(early).unwrap_or(at), created);
            true
        }
        None => {
            lot.unpark(&key);
            false
        }
    }
}

/// How long the waker sleeps: until the next wake time, not at all if that
/// passed meanwhile (a negative wait is not "none": it is now), and a minute
/// with nothing parked (a new park wakes it sooner).
fn pause_until(next_wake: Option<Timestamp>, now: Timestamp) -> Duration {
    match next_wake {
        Some(at) => Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO),
        None => Duration::from_secs(60),
    }
}

/// Reads parked resources back when they are due and sends them into the
/// cache's feed (`revived`), until the receiver is gone.
pub(crate) async fn wake(
    lot: Arc<ParkingLot>,
    client: kube::Client,
    revived: mpsc::Sender<DeviceOffboard>,
) {
    loop {
        let due = lot.take_due(Timestamp::now());
        if due.is_empty() {
            let pause = pause_until(lot.next_wake(), Timestamp::now());
            // A resource parked meanwhile may be due earlier: the notify
            // cuts the sleep short.
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = lot.parked_one.notified() => {}
            }
            continue;
        }
        let reads = futures::stream::iter(due)
            .map(|key| {
                let client = client.clone();
                async move {
                    let api: kube::Api<DeviceOffboard> =
                        kube::Api::namespaced(client, key.namespace());
                    let read = api.get_opt(key.name()).await;
                    (key, read)
                }
            })
            .buffer_unordered(READS_AT_ONCE);
        futures::pin_mut!(reads);
        while let Some((key, read)) = reads.next().await {
            match read {
                // Labelled final meanwhile (another replica finished it while
                // this one was not leading): outside the watch, so it must
                // not enter the cache, where no watch event would remove it.
                Ok(Some(obj)) if super::final_label::is_labelled_final(&obj) => {}
                Ok(Some(obj)) => {
                    if revived.send(obj).await.is_err() {
                        return;
                    }
                }
                // Deleted while parked: nothing is left to do for it.
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(namespace = key.namespace(), name = key.name(), error = %error, "could not read a waiting resource back; trying again shortly");
                    let again = SignedDuration::try_from(REREAD_AFTER).unwrap_or_default();
                    lot.park(
                        key,
                        Timestamp::now()
                            .saturating_add(again)
                            .unwrap_or(Timestamp::MAX),
                        None,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CancelState, CancelStatus, DeviceOffboardStatus};
    use crate::test_kit;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn waiting(name: &str, retry_in_secs: i64, now: Timestamp) -> DeviceOffboard {
        test_kit::offboard(name)
            .machine_id("a".repeat(40))
            .comment("c")
            .namespace("ns")
            .status(DeviceOffboardStatus {
                phase: Some(Phase::Pending),
                next_retry_at: Some(Time(now + SignedDuration::from_secs(retry_in_secs))),
                ..Default::default()
            })
            .build()
    }

    #[test]
    fn only_a_quiet_pending_resource_with_a_long_wait_is_parked() {
        let now = Timestamp::now();
        let long = waiting("a", 600, now);
        assert_eq!(
            parked_until(&long, now),
            Some(now + SignedDuration::from_secs(600))
        );
        assert_eq!(parked_until(&waiting("a", 2, now), now), None, "short wait");
        assert_eq!(parked_until(&waiting("a", -5, now), now), None, "due");

        let mut no_time = long.clone();
        no_time.status.as_mut().unwrap().next_retry_at = None;
        assert_eq!(parked_until(&no_time, now), None);

        let mut submitting = long.clone();
        submitting.status.as_mut().unwrap().phase = Some(Phase::Submitting);
        assert_eq!(parked_until(&submitting, now), None, "lookup clock");

        let mut sent = long.clone();
        sent.status.as_mut().unwrap().machine_action_id = Some("act".into());
        assert_eq!(parked_until(&sent, now), None, "the poller reads it");

        let mut cancel_asked = long.clone();
        cancel_asked.metadata.annotations =
            Some([(crate::crd::CANCEL_ANNOTATION.to_string(), "no".to_string())].into());
        assert_eq!(parked_until(&cancel_asked, now), None, "a cancel acts now");

        let mut cancelling = long.clone();
        cancelling.status.as_mut().unwrap().cancel = Some(CancelStatus {
            reason: "no".into(),
            state: CancelState::Requesting,
            requested_at: None,
            attempts: 0,
        });
        assert_eq!(parked_until(&cancelling, now), None);

        let mut deleted = long.clone();
        deleted.metadata.deletion_timestamp = Some(Time(now));
        assert_eq!(parked_until(&deleted, now), None);

        let mut fresh = long.clone();
        fresh.status = None;
        assert_eq!(parked_until(&fresh, now), None, "never reconciled");
    }

    #[test]
    fn the_lot_hands_out_due_resources_earliest_first_and_once() {
        let lot = ParkingLot::default();
        let now = Timestamp::now();
        let key = |n: &str| Key::new("ns", n);
        assert_eq!((key("a").namespace(), key("a").name()), ("ns", "a"));
        let secs = |s: i64| now + SignedDuration::from_secs(s);
        lot.park(key("late"), secs(30), None);
        lot.park(key("early"), secs(10), Some(secs(-100)));
        lot.park(key("moved"), secs(5), None);
        // Parked again with a later time: only the later one counts.
        lot.park(key("moved"), secs(20), None);
        lot.park(key("gone"), secs(1), None);
        lot.unpark(&key("gone"));
        assert_eq!(lot.len(), 3);
        assert_eq!(lot.next_wake(), Some(secs(10)));
        assert_eq!(lot.oldest_created(), Some(secs(-100)));
        assert_eq!(lot.take_due(secs(9)), Vec::<Key>::new());
        assert_eq!(lot.take_due(secs(25)), vec![key("early"), key("moved")]);
        assert_eq!(lot.take_due(secs(25)), Vec::<Key>::new(), "handed out once");
        assert_eq!(lot.take_due(secs(30)), vec![key("late")]);
        assert!(lot.is_empty());
    }

    #[test]
    fn a_wake_time_that_passed_meanwhile_is_not_slept_over() {
        let now = Timestamp::now();
        let secs = |s: i64| now + SignedDuration::from_secs(s);
        assert_eq!(pause_until(Some(secs(5)), now), Duration::from_secs(5));
        assert_eq!(pause_until(Some(secs(-1)), now), Duration::ZERO);
        assert_eq!(pause_until(None, now), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn the_cache_never_sees_a_parked_resource_and_sees_it_again_when_due() {
        use watcher::Event;
        let now = Timestamp::now();
        let lot = Arc::new(ParkingLot::default());
        let events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(waiting("listed", 600, now))),
            Ok(Event::InitApply(waiting("soon", 1, now))),
            Ok(Event::InitDone),
            Ok(Event::Apply(waiting("written", 600, now))),
            // Its time came: read back, it goes into the cache.
            Ok(Event::Apply(waiting("listed", 0, now))),
            Ok(Event::Delete(waiting("written", 600, now))),
        ];
        let out: Vec<_> = park_events(futures::stream::iter(events), lot.clone())
            .map(|e| match e.unwrap() {
                Event::Init => "init".to_string(),
                Event::InitApply(o) => format!("init-apply {}", o.name_any()),
                Event::InitDone => "init-done".to_string(),
                Event::Apply(o) => format!("apply {}", o.name_any()),
                Event::Delete(o) => format!("delete {}", o.name_any()),
            })
            .collect()
            .await;
        assert_eq!(
            out,
            [
                "init",
                "init-apply soon",
                "init-done",
                "delete written",
                "apply listed",
                "delete written",
            ]
        );
        assert!(lot.is_empty(), "read back or deleted: nothing stays parked");
    }
}
