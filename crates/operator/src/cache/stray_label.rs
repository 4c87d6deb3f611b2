//! A final label the operator did not write. The operator labels a resource
//! [`FINAL_LABEL`]`=true` only after its status turned `Succeeded` or
//! `Failed`, and the controller's watch leaves labelled resources out. A
//! label on a resource whose status is not final came from elsewhere: a copy
//! of a finished resource's manifest (`kubectl get -o yaml` keeps the label,
//! and the API server drops the status on create), an exported manifest kept
//! in Git, or a `kubectl label` by mistake. Left alone, such a resource would
//! never be offboarded, never be final and never expire.
//!
//! The status decides, not the label: [`run`] watches the labelled resources
//! and removes the label from each one whose status is not final, with an
//! Event saying so. The resource then matches the controller's watch and is
//! offboarded like any other.
//!
//! Why a second watch, and one without a store: the controller's watch keeps
//! [`WATCH_SELECTOR`] so finished resources stay out of its memory. This one
//! sees only labelled resources and holds none of them: each event is judged
//! and dropped, so memory does not grow with the number of finished
//! resources. Its first list (and each list after a `410 Expired`) streams
//! every finished resource once, a page at a time.
//!
//! [`WATCH_SELECTOR`]: super::final_label::WATCH_SELECTOR

use super::final_label::{FINAL_LABEL, LABELLED_SELECTOR, is_final, is_labelled_final};
use crate::crd::DeviceOffboard;
use crate::metrics::Metrics;
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The Event reason when the label was removed.
pub const REMOVED_REASON: &str = "FinalLabelRemoved";

/// Resources read per list page.
const PAGE: u32 = crate::pages::FULL_OBJECT_PAGE;

/// Pauses between tries of one removal that failed for a reason other than
/// a changed (409) or deleted (404) object: a blip of the API server.
const RETRY_PAUSES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// After a removal failed every try, the watch starts over this much later;
/// its new list brings the resource back.
const RELIST_AFTER: Duration = Duration::from_secs(30);

/// Whether the label on `obj` was not written by the operator: labelled final
/// while its status is not final (no status, or any phase but `Succeeded`
/// and `Failed`).
pub fn has_stray_label(obj: &DeviceOffboard) -> bool {
    is_labelled_final(obj) && !is_final(obj)
}

/// The merge patch that removes the label, with the resourceVersion the
/// decision was made on as a precondition: a resource changed since (its
/// status final meanwhile, or deleted and applied again under the same name)
/// answers 409 and is judged again on its next event.
pub fn unlabel_patch(resource_version: &str) -> serde_json::Value {
    json!({ "metadata": { "resourceVersion": resource_version, "labels": { FINAL_LABEL: null } } })
}

/// What became of one removal.
#[derive(Debug)]
enum Removal {
    Removed(Box<DeviceOffboard>),
    /// Changed (409) or gone (404) since it was read: its next event, if
    /// any, is judged again.
    Moot,
    Failed(kube::Error),
}

async fn remove_label(client: &kube::Client, obj: &DeviceOffboard, rv: &str) -> Removal {
    let api: Api<DeviceOffboard> =
        Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api
        .patch(&obj.name_any(), &params, &Patch::Merge(&unlabel_patch(rv)))
        .await
    {
        Ok(updated) => Removal::Removed(Box::new(updated)),
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Removal::Moot,
        Err(error) => Removal::Failed(error),
    }
}

/// The Event's note: which label, why it went, what to change.
fn removed_note(obj: &DeviceOffboard) -> String {
    let phase = obj
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .map_or("empty", |p| p.as_str());
    format!(
        "removed the label {FINAL_LABEL}=true: the operator sets it only on a finished resource \
         (status Succeeded or Failed), and this one's status is {phase}, so it came with a copied \
         or exported manifest or was set by hand. While it is there the controller ignores the \
         resource; it is now offboarded like any other. Leave the label out of manifests."
    )
}

async fn publish_removed(client: &kube::Client, reporter: &Reporter, obj: &DeviceOffboard) {
    let event = Event {
        type_: EventType::Warning,
        reason: REMOVED_REASON.to_string(),
        note: Some(removed_note(obj)),
        action: "RemoveFinalLabel".to_string(),
        secondary: None,
    };
    // A recorder per Event, as for the controller's Events: a shared one
    // keeps every Event it sent in memory.
    let recorder = Recorder::new(client.clone(), reporter.clone());
    if let Err(error) = recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %error, reason = REMOVED_REASON, "could not publish event");
    }
}

/// Remove a stray label, retrying a failed write a few times. False when
/// every try failed.
async fn handle(
    client: &kube::Client,
    reporter: &Reporter,
    metrics: &Metrics,
    obj: &DeviceOffboard,
) -> bool {
    let (namespace, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
    // Objects from the API server always carry one; without it the patch
    // would be unconditional.
    let Some(rv) = obj.resource_version() else {
        return true;
    };
    let mut pauses = RETRY_PAUSES.iter();
    loop {
        match remove_label(client, obj, &rv).await {
            Removal::Removed(updated) => {
                tracing::warn!(%namespace, %name, "removed a final label from a DeviceOffboard whose status is not final");
                metrics.final_labels_removed.inc();
                publish_removed(client, reporter, &updated).await;
                return true;
            }
            Removal::Moot => return true,
            Removal::Failed(error) => match pauses.next() {
                Some(pause) => {
                    tracing::debug!(%namespace, %name, error = %error, "removing a stray final label failed; retrying");
                    tokio::time::sleep(*pause).await;
                }
                None => {
                    tracing::warn!(%namespace, %name, error = %error, "could not remove a stray final label; the watch starts over");
                    return false;
                }
            },
        }
    }
}

/// Watch the labelled resources of `api` and remove the label from each one
/// whose status is not final, until dropped. Run where the controller runs
/// (on the leader): it writes.
pub async fn run(api: Api<DeviceOffboard>, reporter: Reporter, metrics: Arc<Metrics>) {
    let client = api.clone().into_client();
    // Lists with the most recent semantic: a list at resourceVersion "0"
    // (`any_semantic`) is served from the API server's cache, which ignores
    // the page size and would answer every finished resource at once.
    let config = watcher::Config::default()
        .labels(LABELLED_SELECTOR)
        .page_size(PAGE);
    loop {
        let mut events = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let obj = match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => obj,
                Ok(_) => continue,
                // The watcher lists again by itself (after a backoff); a
                // warning, since while it fails hidden resources stay hidden.
                Err(error) => {
                    tracing::warn!(error = %error, "watching labelled DeviceOffboards failed; retrying");
                    continue;
                }
            };
            if has_stray_label(&obj) && !handle(&client, &reporter, &metrics, &obj).await {
                break;
            }
        }
        tokio::time::sleep(RELIST_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceOffboardStatus, Phase};
    use crate::test_kit;

    fn with(status: Option<Option<Phase>>, label: Option<&str>) -> DeviceOffboard {
        let mut obj = test_kit::offboard("r").machine_id("m").comment("c");
        if let Some(phase) = status {
            obj = obj.status(DeviceOffboardStatus {
                phase,
                ..Default::default()
            });
        }
        if let Some(value) = label {
            obj = obj.label(FINAL_LABEL, value);
        }
        obj.build()
    }

    #[test]
    fn a_final_label_on_a_resource_not_final_in_status_is_removed() {
        use Phase::*;
        for (status, label, remove) in [
            // A copied manifest: the API server dropped its status.
            (None, Some("true"), true),
            (Some(None), Some("true"), true),
            (Some(Some(Pending)), Some("true"), true),
            (Some(Some(Submitting)), Some("true"), true),
            (Some(Some(InProgress)), Some("true"), true),
            // The operator's own label.
            (Some(Some(Succeeded)), Some("true"), false),
            (Some(Some(Failed)), Some("true"), false),
            // Any other value leaves the resource in the controller's watch.
            (None, Some("false"), false),
            (Some(Some(InProgress)), Some("True"), false),
            (None, None, false),
            (Some(Some(Succeeded)), None, false),
        ] {
            assert_eq!(
                has_stray_label(&with(status, label)),
                remove,
                "{status:?} {label:?}"
            );
        }
    }

    #[test]
    fn the_patch_removes_only_the_label_and_only_from_the_version_judged() {
        let patch = unlabel_patch("41");
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
        assert_eq!(
            patch["metadata"]["labels"],
            json!({ FINAL_LABEL: null }),
            "null removes a key in a merge patch"
        );
        assert_eq!(patch.as_object().map(|m| m.len()), Some(1));
    }

    type Handle = tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >;

    const PATH: &str = "/apis/defender.offboard.dev/v1alpha1/namespaces/it/deviceoffboards/r";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/it/events";

    /// Answer the next request (which must go to `path`) with `status` and
    /// the body it carried; return that body.
    async fn answer(handle: &mut Handle, path: &str, status: u16) -> serde_json::Value {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.uri().path(), path);
        let bytes = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let reply = if status < 300 {
            let mut obj = serde_json::to_value(with(None, None)).unwrap();
            obj["metadata"]["namespace"] = json!("it");
            obj["metadata"]["resourceVersion"] = json!("8");
            obj
        } else {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status, "reason": "", "message": ""})
        };
        send.send_response(
            http::Response::builder()
                .status(status)
                .body(kube::client::Body::from(
                    serde_json::to_vec(&reply).unwrap(),
                ))
                .unwrap(),
        );
        body
    }

    fn labelled_in_flight() -> DeviceOffboard {
        let mut obj = with(Some(Some(Phase::InProgress)), Some("true"));
        obj.metadata.namespace = Some("it".into());
        obj.metadata.resource_version = Some("7".into());
        obj
    }

    /// Runs [`handle`] on `obj` against a mock API server driven by `serve`.
    async fn handled(serve: impl AsyncFnOnce(&mut Handle)) -> (bool, u64) {
        let (service, mut mock) = tower_test::mock::pair();
        let client = kube::Client::new(service, "default");
        let metrics = Arc::new(Metrics::default());
        let reporter = Reporter {
            controller: "defender-offboard".into(),
            instance: None,
        };
        let task = {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                handle(&client, &reporter, &metrics, &labelled_in_flight()).await
            })
        };
        serve(&mut mock).await;
        let done = task.await.unwrap();
        (done, metrics.final_labels_removed.get())
    }

    #[tokio::test(start_paused = true)]
    async fn a_removal_is_conditional_told_once_and_a_changed_object_left_to_its_next_event() {
        // Removed: the patch carries the version judged; one Event, counted.
        let (done, removed) = handled(async |api| {
            let patch = answer(api, PATH, 200).await;
            assert_eq!(patch, unlabel_patch("7"));
            let event = answer(api, EVENTS, 201).await;
            assert_eq!(event["reason"], REMOVED_REASON);
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["regarding"]["name"], "r");
        })
        .await;
        assert_eq!((done, removed), (true, 1));

        // Changed since (409) or gone (404): nothing more, no Event.
        for code in [409, 404] {
            let (done, removed) = handled(async |api| {
                answer(api, PATH, code).await;
            })
            .await;
            assert_eq!((done, removed), (true, 0), "{code}");
        }

        // An API server blip: tried again, then removed.
        let (done, removed) = handled(async |api| {
            answer(api, PATH, 503).await;
            answer(api, PATH, 500).await;
            answer(api, PATH, 200).await;
            answer(api, EVENTS, 201).await;
        })
        .await;
        assert_eq!((done, removed), (true, 1));

        // Failing every try: the caller starts the watch over.
        let (done, removed) = handled(async |api| {
            for _ in 0..=RETRY_PAUSES.len() {
                answer(api, PATH, 500).await;
            }
        })
        .await;
        assert_eq!((done, removed), (false, 0));
    }

    #[test]
    fn the_event_names_the_label_and_why_it_went() {
        let note = removed_note(&with(Some(Some(Phase::InProgress)), Some("true")));
        assert!(note.contains("defender.offboard.dev/final=true"), "{note}");
        assert!(note.contains("InProgress"), "{note}");
        let copied = removed_note(&with(None, Some("true")));
        assert!(copied.contains("status is empty"), "{copied}");
    }
}
