//! Watch streams: newline-delimited JSON events from a resourceVersion, with
//! bookmarks, timeouts, the streaming-list mode and `410 Gone` for expired versions.

use super::ops::{Shared, to_external};
use super::registry::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Change, ChangeType};
use axum::body::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Turns each object of a watch into what the client asked for (the object, or a Table row).
pub type Render = Arc<dyn Fn(&ResourceType, Value) -> Value + Send + Sync>;

/// What a watch request asked for.
#[derive(Debug, Clone, Default)]
pub struct WatchParams {
    pub namespace: Option<String>,
    pub resource_version: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    /// `sendInitialEvents=true`: the streaming-list mode.
    pub send_initial_events: bool,
}

/// The annotation kube-apiserver puts on the bookmark that ends the initial events.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

fn line(kind: &str, object: Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}),
    )
}

/// The event a filtered watcher sees for a change, if any (objects leaving the selection are DELETED).
fn visible(
    change: &Change,
    params: &WatchParams,
    rt: &ResourceType,
) -> Option<(ChangeType, Value)> {
    if rt.namespaced
        && let Some(ns) = &params.namespace
        && &change.namespace != ns
    {
        return None;
    }
    let matches = |o: &Value| params.labels.matches(o) && params.fields.matches(o);
    let now = matches(&change.object);
    let before = change.previous.as_deref().is_some_and(matches);
    let kind = match (change.kind, before, now) {
        (ChangeType::Added, _, true) => ChangeType::Added,
        (ChangeType::Modified, true, true) => ChangeType::Modified,
        (ChangeType::Modified, false, true) => ChangeType::Added,
        (ChangeType::Modified, true, false) => ChangeType::Deleted,
        (ChangeType::Deleted, b, n) if b || n => ChangeType::Deleted,
        _ => return None,
    };
    Some((kind, to_external(rt, &change.object)))
}

/// kube-apiserver answers an expired watch with `200` and this one in-stream ERROR event.
async fn send_expired(shared: &Shared, tx: &mpsc::Sender<Bytes>, error: ApiError) {
    shared
        .expired_watches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = tx.send(line("ERROR", error.to_status())).await;
}

/// kube-apiserver's bookmark schedule: one every interval (a minute there), and
/// one shortly before the watch's timeout so a client ending the watch then
/// still resumes from a recent version.
#[derive(Debug)]
struct BookmarkClock {
    interval: Duration,
    /// The pre-timeout moment, until its bookmark is sent.
    pre_timeout: Option<tokio::time::Instant>,
    next: tokio::time::Instant,
}

/// How long before the timeout kube-apiserver sends its last bookmark.
const PRE_TIMEOUT: Duration = Duration::from_secs(2);

impl BookmarkClock {
    fn new(interval: Duration, deadline: Option<tokio::time::Instant>) -> Self {
        let now = tokio::time::Instant::now();
        let pre_timeout = deadline.map(|d| d.checked_sub(PRE_TIMEOUT).unwrap_or(now).max(now));
        let mut clock = Self {
            interval,
            pre_timeout,
            next: now,
        };
        clock.schedule(now);
        clock
    }

    fn schedule(&mut self, now: tokio::time::Instant) {
        let heartbeat = now + self.interval;
        self.next = self.pre_timeout.map_or(heartbeat, |p| p.min(heartbeat));
    }

    fn sent(&mut self, now: tokio::time::Instant) {
        if self.pre_timeout.is_some_and(|p| p <= now) {
            self.pre_timeout = None;
        }
        self.schedule(now);
    }
}

fn parse_rv(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {raw:?}")))
}

/// Start a watch; the returned receiver yields the response body chunks.
pub fn start(
    shared: Arc<Shared>,
    rt: Arc<ResourceType>,
    params: WatchParams,
    render: Render,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let requested = match params.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(raw) => Some(parse_rv(raw)?),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut changed = shared.changed.subscribe();
    let mut compactions = shared.compactions.subscribe();
    // Take the starting snapshot under the lock so no change falls between it and the stream.
    let (initial, mut cursor, expired) = shared.with_state(|state| {
        let current = state.store.current_rv();
        match requested {
            // A version this server never issued (e.g. from before a restart of the playground):
            // kube-apiserver times out with "Too large resource version" and clients relist;
            // kube-rs relists only on 410, so answer that.
            Some(rv) if !params.send_initial_events && rv > current => (
                Vec::new(),
                rv,
                Some(ApiError::new(
                    410,
                    "Expired",
                    format!("too large resource version: {rv}, current: {current}"),
                )),
            ),
            Some(rv) if !params.send_initial_events => {
                match state.store.changes_since(&rt.storage, rv) {
                    Ok(_) => (Vec::new(), rv, None),
                    Err(oldest) => (Vec::new(), rv, Some(ApiError::expired(rv, oldest))),
                }
            }
            _ => {
                let ns = if rt.namespaced {
                    params.namespace.as_deref()
                } else {
                    None
                };
                let objects: Vec<Value> = state
                    .store
                    .list(&rt.storage, ns)
                    .into_iter()
                    .filter(|o| params.labels.matches(o) && params.fields.matches(o))
                    .map(|o| to_external(&rt, o))
                    .collect();
                (objects, current, None)
            }
        }
    });
    tokio::spawn(async move {
        if let Some(error) = expired {
            send_expired(&shared, &tx, error).await;
            return;
        }
        for object in initial {
            if tx.send(line("ADDED", render(&rt, object))).await.is_err() {
                return;
            }
        }
        if params.send_initial_events && tx.send(bookmark(&rt, cursor, true)).await.is_err() {
            return;
        }
        let deadline = params.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut bookmarks = BookmarkClock::new(shared.bookmark_interval, deadline);
        loop {
            let drained = shared.with_state(|state| {
                let current = state.store.current_rv();
                state
                    .store
                    .changes_since(&rt.storage, cursor)
                    .map(|changes| (changes, current))
            });
            match drained {
                Err(oldest) => {
                    send_expired(&shared, &tx, ApiError::expired(cursor, oldest)).await;
                    return;
                }
                Ok((changes, current)) => {
                    for change in changes {
                        if let Some((kind, object)) = visible(&change, &params, &rt)
                            && tx
                                .send(line(kind.as_str(), render(&rt, object)))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                    cursor = cursor.max(current);
                }
            }
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(bookmarks.next) => {
                    bookmarks.sent(tokio::time::Instant::now());
                    if params.bookmarks && tx.send(bookmark(&rt, cursor, false)).await.is_err() {
                        return;
                    }
                }
                _ = timeout => {
                    if params.bookmarks {
                        let _ = tx.send(bookmark(&rt, cursor, false)).await;
                    }
                    return;
                }
                _ = tx.closed() => return,
                _ = compactions.changed() => return,
                _ = shared.shutdown.cancelled() => return,
            }
        }
    });
    Ok(rx)
}
