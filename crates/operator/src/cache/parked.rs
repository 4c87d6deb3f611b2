//! Resources that wait a long time leave the controller's cache until shortly
//! before their time. At MDE's 1,500 offboards an hour, most of a burst of
//! 10,000 waits hours for budget; holding each as a whole object (about 2 KB
//! in kube's reflector, plus the scheduler's entry) made memory grow with the
//! backlog. A waiting resource is parked instead: its key, wake time,
//! creation time and resourceVersion stay here, and shortly before
//! `status.nextRetryAt` it is read again from the API server and fed back
//! into the cache as if the watch had just delivered it.
//!
//! Parking never changes a decision: a resource is parked only while the
//! decision for it ([`crate::offboard::decision::plan`]) can be nothing but
//! "wait until `nextRetryAt`" for as long as the object stays as it is. Any
//! change to it (a cancel annotation, a deletion, a new status) comes through
//! the watch, and a changed object is judged again. After a restart the
//! watch's first list parks what waits, from the status alone. A failed read
//! keeps the resource parked and tries again; nothing is dropped but what the
//! API server says is gone.
//!
//! The cache never goes back in resourceVersion and never takes in a deleted
//! object. kube's reflector stores whatever it is fed, without comparing
//! versions, and a read-back copy travels beside the watch: a copy read
//! before a newer event (a cancel annotation, a deletion) can reach the feed
//! after it. So the lot keeps the resourceVersion each resource was parked
//! at, the version of the newest watch event for it (resourceVersions are
//! opaque: only ever compared for equality, never ordered). A copy is fed
//! only if it is still that version and no watch event for the resource came
//! after the waker took it (a newer version, a deletion or a new list);
//! otherwise it is dropped, and the watch's own event is what the cache
//! judges. A copy read at a newer version than the watch has delivered is
//! dropped too: the watch delivers that version itself, in order.
//!
//! A wake time is another process's word on its own clock: `nextRetryAt` is
//! wall-clock time written by whichever replica wrote the status, and after
//! a failover a predecessor's clock may be hours ahead. No resource is
//! parked for more than [`MAX_PARK`] (the budget's longest window) past this
//! process's now: a longer wait is read back within the hour and parked again
//! from what it says then, so the cache never holds a resource unseen for
//! longer than an hour of this process's clock. How long it waits is the
//! decision's, which follows `nextRetryAt`. The lot is born with each
//! leadership (the controller's watch starts only once the lease is held, and
//! a lost lease ends the process), so a new leader holds nothing parked by
//! its predecessor: it parks from the statuses as it lists them.
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
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Only waits longer than this are parked: a shorter one costs less in the
/// cache than the read that brings it back.
pub(crate) const PARK_BEYOND: Duration = Duration::from_secs(3);

/// A parked resource is read back this long before its `nextRetryAt`, so it
/// is in the cache again when the reconcile's own requeue fires.
pub(crate) const WAKE_EARLY: Duration = Duration::from_secs(1);

/// The longest a resource stays parked, whatever its `nextRetryAt` says: the
/// budget's longest window (MDE's hourly limit). A longer wait (a deep budget
/// queue, or a time written on a clock far ahead of this one) is read back
/// and judged again after this long.
pub(crate) const MAX_PARK: Duration = Duration::from_secs(3600);

/// A read that failed (API server away) is tried again after this long.
const REREAD_AFTER: Duration = Duration::from_secs(5);

/// How many parked resources are read back at once.
const READS_AT_ONCE: usize = 8;

/// Until when `obj` may wait outside the cache: a `Pending` resource with
/// nothing sent and nothing to cancel, whose `nextRetryAt` is more than
/// [`PARK_BEYOND`] away; at most [`MAX_PARK`] from `now`, since
/// `nextRetryAt` may come from another replica's clock. For such a resource
/// the decision is "wait until `nextRetryAt`" whatever the process
/// remembers; `Submitting` is never parked, since its lookup clock starts
/// when this process observes it.
pub(crate) fn parked_until(obj: &DeviceOffboard, now: Timestamp) -> Option<Timestamp> {
    let status = obj.status.as_ref()?;
    let cancel_asked = obj
        .annotations()
        .contains_key(crate::crd::CANCEL_ANNOTATION);
    // A breaker hold released by its annotation is sent now.
    let released = crate::crd::SafetyMarks::of(obj.metadata.annotations.as_ref()).release_breaker;
    let quiet = status.phase == Some(Phase::Pending)
        && status.machine_action_id.is_none()
        && status.cancel.is_none()
        && !cancel_asked
        && !released
        && obj.metadata.deletion_timestamp.is_none();
    let at = status.next_retry_at.as_ref()?.0;
    let beyond = SignedDuration::try_from(PARK_BEYOND).unwrap_or(SignedDuration::MAX);
    let longest = SignedDuration::try_from(MAX_PARK).unwrap_or(SignedDuration::MAX);
    let latest = now.saturating_add(longest).unwrap_or(Timestamp::MAX);
    (quiet && at.duration_since(now) > beyond).then_some(at.min(latest))
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

/// A resourceVersion as the API server wrote it: opaque, only ever compared
/// for equality.
type Version = Option<Box<str>>;

fn version_of(obj: &DeviceOffboard) -> Version {
    obj.metadata.resource_version.as_deref().map(Box::from)
}

/// One parked resource: its wake time, creation time, and the version of the
/// newest watch event for it.
struct Parked {
    wake: Timestamp,
    created: Option<Timestamp>,
    version: Version,
}

/// A resource the waker took from the lot, not yet fed back or dropped.
struct Waking {
    ticket: u64,
    version: Version,
    /// The copy is on its way into the feed.
    sent: bool,
    /// A watch event for the resource came after the waker took it: the copy
    /// is not the newest word on it.
    superseded: bool,
}

/// What the waker took from the lot: what it needs to read the resource back
/// and to judge the copy it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) key: Key,
    ticket: u64,
    version: Version,
    created: Option<Timestamp>,
}

#[derive(Default)]
struct Lot {
    parked: HashMap<Key, Parked>,
    /// The same, ordered by wake time.
    due: BTreeSet<(Timestamp, Key)>,
    /// Taken by the waker. Nearly always one entry per key; two only when a
    /// resource is parked again and due again before its first copy is back.
    waking: HashMap<Key, Vec<Waking>>,
    next_ticket: u64,
}

impl Lot {
    fn park(&mut self, key: Key, parked: Parked) {
        let wake = parked.wake;
        if let Some(old) = self.parked.insert(key.clone(), parked) {
            self.due.remove(&(old.wake, key.clone()));
        }
        self.due.insert((wake, key));
    }

    /// Take `taken`'s entry out of `waking`; whether a watch event came
    /// after the waker took it (`None`: already gone, which counts as such).
    fn take_waking(&mut self, taken: &Taken) -> Option<bool> {
        let entries = self.waking.get_mut(&taken.key)?;
        let i = entries.iter().position(|w| w.ticket == taken.ticket)?;
        let entry = entries.swap_remove(i);
        if entries.is_empty() {
            self.waking.remove(&taken.key);
        }
        Some(entry.superseded)
    }
}

/// How an `Apply` in the feed relates to the lot.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// A watch event: judged as it is.
    Watched,
    /// A copy the waker read back, still the newest version: judged.
    Current,
    /// A copy overtaken by a watch event: dropped.
    Stale,
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

    /// Park `key`, last seen at `version`, until `wake` (replacing an
    /// earlier time).
    fn park(&self, key: Key, wake: Timestamp, created: Option<Timestamp>, version: Version) {
        self.lock().park(
            key,
            Parked {
                wake,
                created,
                version,
            },
        );
        self.parked_one.notify_one();
    }

    /// `key` is in the cache again, or gone.
    pub(crate) fn unpark(&self, key: &Key) {
        let mut lot = self.lock();
        if let Some(parked) = lot.parked.remove(key) {
            lot.due.remove(&(parked.wake, key.clone()));
        }
    }

    /// Take every resource due by `by`, earliest first. Each stays known as
    /// being woken until its copy is back in the feed or dropped.
    pub(crate) fn take_due(&self, by: Timestamp) -> Vec<Taken> {
        let mut lot = self.lock();
        let mut taken = Vec::new();
        while let Some((wake, _)) = lot.due.first()
            && *wake <= by
        {
            let Some((_, key)) = lot.due.pop_first() else {
                break;
            };
            let Some(parked) = lot.parked.remove(&key) else {
                continue;
            };
            let ticket = lot.next_ticket;
            lot.next_ticket += 1;
            lot.waking.entry(key.clone()).or_default().push(Waking {
                ticket,
                version: parked.version.clone(),
                sent: false,
                superseded: false,
            });
            taken.push(Taken {
                key,
                ticket,
                version: parked.version,
                created: parked.created,
            });
        }
        taken
    }

    /// What to feed of the read of `taken`: the copy read, only if it is the
    /// version parked and nothing came from the watch since. A failed read
    /// parks it again, to be read shortly.
    fn read_back<E: Display>(
        &self,
        taken: Taken,
        read: Result<Option<DeviceOffboard>, E>,
    ) -> Option<DeviceOffboard> {
        let mut lot = self.lock();
        match read {
            Ok(Some(obj))
                if version_of(&obj) == taken.version
                    // Labelled final meanwhile (another replica finished it
                    // while this one was not leading): outside the watch, so
                    // it must not enter the cache, where no watch event would
                    // remove it.
                    && !super::final_label::is_labelled_final(&obj) =>
            {
                let entry = lot
                    .waking
                    .get_mut(&taken.key)
                    .and_then(|entries| entries.iter_mut().find(|w| w.ticket == taken.ticket));
                match entry {
                    Some(entry) if !entry.superseded => {
                        entry.sent = true;
                        Some(obj)
                    }
                    _ => {
                        lot.take_waking(&taken);
                        None
                    }
                }
            }
            // Changed since it was parked: the watch delivers (or has
            // delivered) the newer version, and that is what the cache
            // judges. Deleted: nothing is left to do for it.
            Ok(_) => {
                lot.take_waking(&taken);
                None
            }
            Err(error) => {
                tracing::warn!(namespace = taken.key.namespace(), name = taken.key.name(), error = %error, "could not read a waiting resource back; trying again shortly");
                // A watch event meanwhile said what becomes of it.
                if lot.take_waking(&taken) == Some(false) {
                    let again = SignedDuration::try_from(REREAD_AFTER).unwrap_or_default();
                    let wake = Timestamp::now()
                        .saturating_add(again)
                        .unwrap_or(Timestamp::MAX);
                    lot.park(
                        taken.key,
                        Parked {
                            wake,
                            created: taken.created,
                            version: taken.version,
                        },
                    );
                    drop(lot);
                    self.parked_one.notify_one();
                }
                None
            }
        }
    }

    /// An `Apply` for `obj` is in the feed: a copy the waker sent (a version
    /// the watch already delivered, which it never delivers again), or a
    /// watch event, which overtakes every copy of the resource not yet back.
    fn arrived(&self, obj: &DeviceOffboard) -> Arrival {
        let key = Key::of(obj);
        let version = version_of(obj);
        let mut lot = self.lock();
        let Some(entries) = lot.waking.get_mut(&key) else {
            return Arrival::Watched;
        };
        let Some(i) = entries.iter().position(|w| w.sent && w.version == version) else {
            entries.iter_mut().for_each(|w| w.superseded = true);
            return Arrival::Watched;
        };
        let copy = entries.swap_remove(i);
        if entries.is_empty() {
            lot.waking.remove(&key);
        }
        if copy.superseded {
            Arrival::Stale
        } else {
            Arrival::Current
        }
    }

    /// A watch event other than an `Apply` for `key` (listed again, deleted):
    /// every copy of it not yet back is overtaken.
    fn watched(&self, key: &Key) {
        if let Some(entries) = self.lock().waking.get_mut(key) {
            entries.iter_mut().for_each(|w| w.superseded = true);
        }
    }

    /// The watch lists everything again: the list overtakes every copy.
    fn relisting(&self) {
        for entries in self.lock().waking.values_mut() {
            entries.iter_mut().for_each(|w| w.superseded = true);
        }
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
            .filter_map(|parked| parked.created)
            .min()
    }
}

/// The watch events as the cache should see them: a resource that may wait
/// outside it is parked and, if the cache holds it, deleted from the cache;
/// one the watch lists again on a restart is left out of the new cache; a
/// read-back copy overtaken by a watch event is dropped. The controller
/// reconciles only what the cache holds, so a parked resource is not
/// reconciled until it is read back.
pub(crate) fn park_events<S>(
    events: S,
    lot: Arc<ParkingLot>,
) -> impl Stream<Item = Result<watcher::Event<DeviceOffboard>, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<DeviceOffboard>, watcher::Error>>,
{
    events.filter_map(move |event| {
        let out = match event {
            Ok(watcher::Event::Apply(obj)) => match lot.arrived(&obj) {
                Arrival::Stale => None,
                // `park` also takes a resource that may not wait out of the
                // lot; such an Apply passes on unchanged.
                Arrival::Watched | Arrival::Current if park(&lot, &obj) => {
                    Some(Ok(watcher::Event::Delete(obj)))
                }
                Arrival::Watched | Arrival::Current => Some(Ok(watcher::Event::Apply(obj))),
            },
            Ok(watcher::Event::InitApply(obj)) => {
                lot.watched(&Key::of(&obj));
                (!park(&lot, &obj)).then_some(Ok(watcher::Event::InitApply(obj)))
            }
            Ok(watcher::Event::Delete(obj)) => {
                let key = Key::of(&obj);
                lot.watched(&key);
                lot.unpark(&key);
                Some(Ok(watcher::Event::Delete(obj)))
            }
            Ok(watcher::Event::Init) => {
                lot.relisting();
                Some(Ok(watcher::Event::Init))
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
            lot.park(
                key,
                at.saturating_sub(early).unwrap_or(at),
                created,
                version_of(obj),
            );
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

/// The feed's receiver is gone: the controller stopped.
struct FeedClosed;

/// Read back every resource due by `by` with `read`, [`READS_AT_ONCE`] at a
/// time, and send the copies that may enter the cache into `revived`. How
/// many were due.
async fn wake_due<R, F, E>(
    lot: &ParkingLot,
    by: Timestamp,
    read: R,
    revived: &mpsc::Sender<DeviceOffboard>,
) -> Result<usize, FeedClosed>
where
    R: Fn(Key) -> F,
    F: Future<Output = Result<Option<DeviceOffboard>, E>>,
    E: Display,
{
    let due = lot.take_due(by);
    let count = due.len();
    let reads = futures::stream::iter(due)
        .map(|taken| {
            let read = read(taken.key.clone());
            async move { (taken, read.await) }
        })
        .buffer_unordered(READS_AT_ONCE);
    futures::pin_mut!(reads);
    while let Some((taken, read)) = reads.next().await {
        if let Some(obj) = lot.read_back(taken, read) {
            revived.send(obj).await.map_err(|_| FeedClosed)?;
        }
    }
    Ok(count)
}

/// Reads parked resources back when they are due and sends them into the
/// cache's feed (`revived`), until the receiver is gone.
pub(crate) async fn wake(
    lot: Arc<ParkingLot>,
    client: kube::Client,
    revived: mpsc::Sender<DeviceOffboard>,
) {
    let read = |key: Key| {
        let api: kube::Api<DeviceOffboard> = kube::Api::namespaced(client.clone(), key.namespace());
        async move { api.get_opt(key.name()).await }
    };
    loop {
        match wake_due(&lot, Timestamp::now(), read, &revived).await {
            Err(FeedClosed) => return,
            Ok(0) => {
                let pause = pause_until(lot.next_wake(), Timestamp::now());
                // A resource parked meanwhile may be due earlier: the notify
                // cuts the sleep short.
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = lot.parked_one.notified() => {}
                }
            }
            Ok(_) => {}
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

        let mut released = long.clone();
        released.metadata.annotations = Some(
            [(
                crate::crd::RELEASE_BREAKER_ANNOTATION.to_string(),
                "true".to_string(),
            )]
            .into(),
        );
        assert_eq!(
            parked_until(&released, now),
            None,
            "a released hold sends now"
        );

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

    /// After a failover, `nextRetryAt` may come from a clock far ahead of
    /// this one: parked an hour at most, then judged again here.
    #[test]
    fn no_resource_is_parked_longer_than_the_budgets_longest_window() {
        let now = Timestamp::now();
        let max = SignedDuration::try_from(MAX_PARK).unwrap();
        let skewed = waiting("a", 30 * 24 * 3600, now);
        assert_eq!(parked_until(&skewed, now), Some(now + max));
        let within = waiting("a", 1800, now);
        assert_eq!(
            parked_until(&within, now),
            Some(now + SignedDuration::from_secs(1800)),
            "a wait within the window is kept as written"
        );
    }

    #[test]
    fn the_lot_hands_out_due_resources_earliest_first_and_once() {
        let lot = ParkingLot::default();
        let now = Timestamp::now();
        let key = |n: &str| Key::new("ns", n);
        assert_eq!((key("a").namespace(), key("a").name()), ("ns", "a"));
        let secs = |s: i64| now + SignedDuration::from_secs(s);
        let keys = |taken: Vec<Taken>| taken.into_iter().map(|t| t.key).collect::<Vec<_>>();
        lot.park(key("late"), secs(30), None, None);
        lot.park(key("early"), secs(10), Some(secs(-100)), None);
        lot.park(key("moved"), secs(5), None, None);
        // Parked again with a later time: only the later one counts.
        lot.park(key("moved"), secs(20), None, None);
        lot.park(key("gone"), secs(1), None, None);
        lot.unpark(&key("gone"));
        assert_eq!(lot.len(), 3);
        assert_eq!(lot.next_wake(), Some(secs(10)));
        assert_eq!(lot.oldest_created(), Some(secs(-100)));
        assert_eq!(keys(lot.take_due(secs(9))), Vec::<Key>::new());
        assert_eq!(
            keys(lot.take_due(secs(25))),
            vec![key("early"), key("moved")]
        );
        assert_eq!(
            keys(lot.take_due(secs(25))),
            Vec::<Key>::new(),
            "handed out once"
        );
        assert_eq!(keys(lot.take_due(secs(30))), vec![key("late")]);
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
    /// The reflector's view of the feed: the last object fed per name.
    #[derive(Default)]
    struct Cache(HashMap<String, DeviceOffboard>);

    impl Cache {
        fn feed(&mut self, event: watcher::Event<DeviceOffboard>) {
            match event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                    self.0.insert(o.name_any(), o);
                }
                watcher::Event::Delete(o) => {
                    self.0.remove(&o.name_any());
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
        }

        fn version(&self, name: &str) -> Option<&str> {
            self.0.get(name)?.metadata.resource_version.as_deref()
        }
    }

    /// One event through `park_events` into the cache.
    async fn deliver(
        lot: &Arc<ParkingLot>,
        cache: &mut Cache,
        event: watcher::Event<DeviceOffboard>,
    ) {
        let passed: Vec<_> = park_events(futures::stream::iter([Ok(event)]), lot.clone())
            .collect()
            .await;
        for event in passed {
            cache.feed(event.unwrap());
        }
    }

    /// Every copy the waker sent, into the cache.
    async fn deliver_copies(
        lot: &Arc<ParkingLot>,
        cache: &mut Cache,
        copies: &mut mpsc::Receiver<DeviceOffboard>,
    ) {
        while let Ok(copy) = copies.try_recv() {
            deliver(lot, cache, watcher::Event::Apply(copy)).await;
        }
    }

    fn at_version(mut obj: DeviceOffboard, version: &str) -> DeviceOffboard {
        obj.metadata.resource_version = Some(version.into());
        obj
    }

    /// `obj` as the waker reads it back at its time: the same version, now
    /// due (the test moves its `nextRetryAt` to now instead of waiting for
    /// the clock to reach it).
    fn at_its_time(obj: &DeviceOffboard) -> DeviceOffboard {
        let mut obj = obj.clone();
        if let Some(status) = obj.status.as_mut() {
            status.next_retry_at = Some(Time(Timestamp::now()));
        }
        obj
    }

    /// The waker's read, answered with `answer` (a copy read at some moment
    /// before the events that follow it in a test); counts the reads.
    fn answering(
        answer: Option<DeviceOffboard>,
        reads: &std::sync::atomic::AtomicUsize,
    ) -> impl Fn(Key) -> std::future::Ready<Result<Option<DeviceOffboard>, String>> + '_ {
        move |_| {
            reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok(answer.clone()))
        }
    }

    fn far_future() -> Timestamp {
        Timestamp::now() + SignedDuration::from_hours(48)
    }

    /// A copy read before a newer watch event (here the cancel annotation)
    /// must not replace that event in the cache: fed last, the old copy would
    /// hide the cancel, and every status write from it would meet a 409.
    #[tokio::test]
    async fn a_copy_read_before_a_newer_event_never_replaces_it() {
        use watcher::Event;
        let now = Timestamp::now();
        let lot = Arc::new(ParkingLot::default());
        let mut cache = Cache::default();
        let (tx, mut copies) = mpsc::channel(8);
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let v1 = at_version(waiting("a", 600, now), "v1");
        let mut v2 = at_version(waiting("a", 600, now), "v2");
        v2.metadata.annotations = Some(
            [(
                crate::crd::CANCEL_ANNOTATION.to_string(),
                "stop".to_string(),
            )]
            .into(),
        );

        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        assert_eq!(cache.version("a"), None, "parked");
        // Its time comes: the waker reads v1 back…
        let due = wake_due(
            &lot,
            far_future(),
            answering(Some(at_its_time(&v1)), &reads),
            &tx,
        )
        .await;
        assert!(matches!(due, Ok(1)));
        // …and before that copy is in the feed, the watch brings v2.
        deliver(&lot, &mut cache, Event::Apply(v2.clone())).await;
        deliver_copies(&lot, &mut cache, &mut copies).await;
        assert_eq!(cache.version("a"), Some("v2"), "the newest version stays");

        // The same when v2 came before the read's answer was judged.
        let lot = Arc::new(ParkingLot::default());
        let mut cache = Cache::default();
        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        let taken = lot.take_due(far_future());
        deliver(&lot, &mut cache, Event::Apply(v2.clone())).await;
        for taken in taken {
            assert!(
                lot.read_back(taken, Ok::<_, String>(Some(at_its_time(&v1))))
                    .is_none()
            );
        }
        assert_eq!(cache.version("a"), Some("v2"));
        assert!(
            lot.is_empty() && lot.lock().waking.is_empty(),
            "nothing left behind"
        );
    }

    /// A copy read before the resource was deleted must not bring it back: a
    /// ghost in the cache would be reconciled against a 404 forever.
    #[tokio::test]
    async fn a_deleted_resource_is_never_put_back_into_the_cache() {
        use watcher::Event;
        let now = Timestamp::now();
        let v1 = at_version(waiting("a", 600, now), "v1");
        let reads = std::sync::atomic::AtomicUsize::new(0);

        // Deleted while parked: never read back, never in the cache.
        let lot = Arc::new(ParkingLot::default());
        let mut cache = Cache::default();
        let (tx, mut copies) = mpsc::channel(8);
        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        deliver(&lot, &mut cache, Event::Delete(v1.clone())).await;
        let due = wake_due(
            &lot,
            far_future(),
            answering(Some(at_its_time(&v1)), &reads),
            &tx,
        )
        .await;
        assert!(matches!(due, Ok(0)));
        assert_eq!(
            reads.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no read"
        );
        deliver_copies(&lot, &mut cache, &mut copies).await;
        assert!(cache.0.is_empty());

        // Read back just before the deletion: the copy arrives after it.
        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        let due = wake_due(
            &lot,
            far_future(),
            answering(Some(at_its_time(&v1)), &reads),
            &tx,
        )
        .await;
        assert!(matches!(due, Ok(1)));
        deliver(&lot, &mut cache, Event::Delete(v1.clone())).await;
        deliver_copies(&lot, &mut cache, &mut copies).await;
        assert!(cache.0.is_empty(), "no ghost: {:?}", cache.0.keys());
        assert!(lot.lock().waking.is_empty());
    }

    /// A copy still at the version parked enters the cache; one read at a
    /// version the watch has not delivered yet waits for the watch's event,
    /// so the cache never holds a version and then an older one; a failed
    /// read parks it again at the version parked.
    #[tokio::test]
    async fn a_copy_enters_the_cache_only_as_the_newest_version_the_watch_gave() {
        use watcher::Event;
        let now = Timestamp::now();
        let lot = Arc::new(ParkingLot::default());
        let mut cache = Cache::default();
        let (tx, mut copies) = mpsc::channel(8);
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let v1 = at_version(waiting("a", 600, now), "v1");
        let due_now =
            |obj: &DeviceOffboard, version: &str| at_its_time(&at_version(obj.clone(), version));

        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        // The read fails: parked again, at the same version.
        let failing = |_: Key| std::future::ready(Err::<Option<DeviceOffboard>, _>("away"));
        assert!(matches!(
            wake_due(&lot, far_future(), failing, &tx).await,
            Ok(1)
        ));
        assert_eq!(lot.len(), 1);
        // Unchanged when read back: into the cache.
        let unchanged = at_its_time(&v1);
        assert!(matches!(
            wake_due(&lot, far_future(), answering(Some(unchanged), &reads), &tx).await,
            Ok(1)
        ));
        deliver_copies(&lot, &mut cache, &mut copies).await;
        assert_eq!(cache.version("a"), Some("v1"));

        // Parked at v3; the read already sees v5 while the watch is still to
        // deliver v4 and v5: the copy is dropped, the watch's events count.
        let lot = Arc::new(ParkingLot::default());
        let mut cache = Cache::default();
        deliver(&lot, &mut cache, Event::Apply(at_version(v1.clone(), "v3"))).await;
        let v5 = due_now(&v1, "v5");
        assert!(matches!(
            wake_due(&lot, far_future(), answering(Some(v5.clone()), &reads), &tx).await,
            Ok(1)
        ));
        deliver_copies(&lot, &mut cache, &mut copies).await;
        assert_eq!(cache.version("a"), None, "v5 is not fed ahead of v4");
        deliver(&lot, &mut cache, Event::Apply(due_now(&v1, "v4"))).await;
        deliver(&lot, &mut cache, Event::Apply(v5)).await;
        assert_eq!(cache.version("a"), Some("v5"));
        assert!(lot.is_empty() && lot.lock().waking.is_empty());
    }

    /// A new list (the watch's history expired) overtakes every copy on its
    /// way; a copy of a resource parked again at the same version after the
    /// list still counts.
    #[tokio::test]
    async fn a_new_list_overtakes_copies_on_their_way() {
        use watcher::Event;
        let now = Timestamp::now();
        let lot = Arc::new(ParkingLot::default());
        let mut cache = Cache::default();
        let (tx, mut copies) = mpsc::channel(8);
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let v1 = at_version(waiting("a", 600, now), "v1");
        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        let read = answering(Some(at_its_time(&v1)), &reads);
        assert!(matches!(
            wake_due(&lot, far_future(), &read, &tx).await,
            Ok(1)
        ));
        // The watch lists again: `a` is listed (and parked) at v1 again.
        deliver(&lot, &mut cache, Event::Init).await;
        deliver(&lot, &mut cache, Event::InitApply(v1.clone())).await;
        deliver(&lot, &mut cache, Event::InitDone).await;
        assert_eq!(lot.len(), 1);
        // Due again before the first copy is back: two copies of v1 on
        // their way, one overtaken, one not.
        assert!(matches!(
            wake_due(&lot, far_future(), &read, &tx).await,
            Ok(1)
        ));
        let mut passed = Vec::new();
        while let Ok(copy) = copies.try_recv() {
            let out: Vec<_> =
                park_events(futures::stream::iter([Ok(Event::Apply(copy))]), lot.clone())
                    .collect()
                    .await;
            passed.extend(out);
        }
        assert_eq!(
            passed.len(),
            1,
            "one copy judged, the overtaken one dropped"
        );
        assert!(lot.lock().waking.is_empty());
    }
}
