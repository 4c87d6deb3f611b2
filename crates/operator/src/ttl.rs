//! `spec.ttlSecondsAfterFinished`: delete a finished `DeviceOffboard` that
//! long after it became final, with an `Expired` Event first.
//!
//! A sweeper lists the resources (paged) on an interval instead of relying on
//! the controller's cache, which may leave finished resources out; it runs
//! only where the controller runs (on the leader). Each delete carries the
//! uid and resourceVersion the decision saw as preconditions, so a resource
//! re-created under the same name, or changed meanwhile, is never deleted.

use crate::crd::DeviceOffboard;
use crate::metrics::Metrics;
use crate::offboard::decision::Note;
use crate::offboard::ports::{KubeStore, StatusStore};
use crate::offboard::status::{READY, Reason};
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use std::time::Duration;

/// What the TTL asks of one resource now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No TTL, not final yet, or no time to count from.
    Keep,
    /// The TTL has passed: delete it.
    Now,
    /// Look again after this long.
    After(Duration),
}

/// When the resource became final: `status.completedAt`, else the `Ready`
/// condition's last transition (written by an older operator), else `None`.
pub fn finished_at(resource: &DeviceOffboard) -> Option<Timestamp> {
    let status = resource.status.as_ref()?;
    if !status.phase?.is_terminal() {
        return None;
    }
    status.completed_at.as_ref().map(|t| t.0).or_else(|| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.last_transition_time.0)
    })
}

/// The decision for one resource at `now`. A negative TTL (refused by the
/// schema; only from an older CRD) keeps the resource.
pub fn expiry(resource: &DeviceOffboard, now: Timestamp) -> Expiry {
    let Some(ttl) = resource
        .spec
        .ttl_seconds_after_finished
        .filter(|ttl| *ttl >= 0)
    else {
        return Expiry::Keep;
    };
    let Some(finished) = finished_at(resource) else {
        return Expiry::Keep;
    };
    let Ok(deadline) = finished.checked_add(SignedDuration::from_secs(ttl)) else {
        return Expiry::Keep;
    };
    if deadline <= now {
        return Expiry::Now;
    }
    Duration::try_from(deadline.duration_since(now)).map_or(Expiry::Keep, Expiry::After)
}

/// The longest wait before a new leader's first sweep.
const FIRST_SWEEP_DELAY: Duration = Duration::from_secs(10);

/// Resources read per list call.
const PAGE: u32 = crate::pages::FULL_OBJECT_PAGE;

/// One pass over every resource: publish `Expired` and delete the due ones.
/// Returns when the next one falls due, if any does.
pub async fn sweep(
    api: &Api<DeviceOffboard>,
    store: &KubeStore,
    metrics: &Metrics,
) -> Result<Option<Duration>, kube::Error> {
    let mut next: Option<Duration> = None;
    let mut pages = crate::pages::Pages::new(PAGE);
    loop {
        let page = api.list(pages.params()).await?;
        let now = Timestamp::now();
        for resource in &page.items {
            match expiry(resource, now) {
                Expiry::Keep => {}
                Expiry::After(wait) => next = Some(next.map_or(wait, |n| n.min(wait))),
                Expiry::Now => {
                    if delete_expired(resource, store).await {
                        metrics.ttl_deletions.inc();
                    }
                }
            }
        }
        if !pages.advance(page.metadata.continue_) {
            return Ok(next);
        }
    }
}

/// The Event, then the delete with preconditions. True when it was deleted.
async fn delete_expired(resource: &DeviceOffboard, store: &KubeStore) -> bool {
    let (name, namespace) = (
        resource.name_any(),
        resource.namespace().unwrap_or_default(),
    );
    let ttl = resource.spec.ttl_seconds_after_finished.unwrap_or_default();
    let note = Note {
        reason: Reason::Expired,
        message: format!(
            "ttlSecondsAfterFinished ({ttl}s) has passed since this resource became final; deleting it"
        ),
    };
    store.publish(resource, &note).await;
    let api: Api<DeviceOffboard> = Api::namespaced(store.client.clone(), &namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: resource.uid(),
            resource_version: resource.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            tracing::info!(%namespace, %name, "deleted a finished DeviceOffboard whose TTL passed");
            true
        }
        // Gone already, or changed since it was read: the next sweep decides again.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => false,
        Err(error) => {
            tracing::warn!(%namespace, %name, error = %error, "could not delete an expired DeviceOffboard");
            false
        }
    }
}

/// Sweep every `interval`, or sooner when a resource falls due, until dropped.
pub async fn run(
    api: Api<DeviceOffboard>,
    store: KubeStore,
    metrics: std::sync::Arc<Metrics>,
    interval: Duration,
) {
    // The first sweep waits a little: a new leader's first seconds belong to
    // the controller's own list and the work in flight.
    tokio::time::sleep(interval.min(FIRST_SWEEP_DELAY)).await;
    loop {
        let pause = match sweep(&api, &store, &metrics).await {
            Ok(next) => next.map_or(interval, |n| n.min(interval)),
            Err(error) => {
                tracing::warn!(error = %error, "listing DeviceOffboards for TTL cleanup failed; retrying");
                interval
            }
        };
        // A resource due "in 0 ms" must not spin the loop.
        tokio::time::sleep(pause.max(Duration::from_millis(200))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceOffboardStatus, Phase};
    use crate::test_kit;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn now() -> Timestamp {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    fn resource(
        ttl: Option<i64>,
        phase: Option<Phase>,
        completed_secs_ago: Option<i64>,
    ) -> DeviceOffboard {
        test_kit::offboard("r")
            .device_name("pc")
            .comment("c")
            .ttl(ttl)
            .status(DeviceOffboardStatus {
                phase,
                completed_at: completed_secs_ago
                    .map(|s| Time(now() - SignedDuration::from_secs(s))),
                ..Default::default()
            })
            .build()
    }

    #[test]
    fn the_table() {
        use Expiry::*;
        struct Row {
            name: &'static str,
            ttl: Option<i64>,
            phase: Option<Phase>,
            /// Completed this many seconds ago.
            ago: Option<i64>,
            expected: Expiry,
        }
        let rows: &[Row] = &[
            Row {
                name: "no ttl",
                ttl: None,
                phase: Some(Phase::Succeeded),
                ago: Some(3600),
                expected: Keep,
            },
            Row {
                name: "succeeded, due",
                ttl: Some(60),
                phase: Some(Phase::Succeeded),
                ago: Some(61),
                expected: Now,
            },
            Row {
                name: "failed, due exactly",
                ttl: Some(60),
                phase: Some(Phase::Failed),
                ago: Some(60),
                expected: Now,
            },
            Row {
                name: "ttl 0 deletes at once",
                ttl: Some(0),
                phase: Some(Phase::Failed),
                ago: Some(0),
                expected: Now,
            },
            Row {
                name: "not yet",
                ttl: Some(60),
                phase: Some(Phase::Succeeded),
                ago: Some(20),
                expected: After(Duration::from_secs(40)),
            },
            Row {
                name: "in progress, never",
                ttl: Some(0),
                phase: Some(Phase::InProgress),
                ago: Some(3600),
                expected: Keep,
            },
            Row {
                name: "pending, never",
                ttl: Some(0),
                phase: Some(Phase::Pending),
                ago: None,
                expected: Keep,
            },
            Row {
                name: "submitting, never",
                ttl: Some(0),
                phase: Some(Phase::Submitting),
                ago: Some(3600),
                expected: Keep,
            },
            Row {
                name: "no status, never",
                ttl: Some(0),
                phase: None,
                ago: None,
                expected: Keep,
            },
            Row {
                name: "final without a time",
                ttl: Some(0),
                phase: Some(Phase::Succeeded),
                ago: None,
                expected: Keep,
            },
            Row {
                name: "negative ttl",
                ttl: Some(-5),
                phase: Some(Phase::Succeeded),
                ago: Some(3600),
                expected: Keep,
            },
            Row {
                name: "huge ttl",
                ttl: Some(i64::MAX),
                phase: Some(Phase::Succeeded),
                ago: Some(3600),
                expected: Keep,
            },
        ];
        for Row {
            name,
            ttl,
            phase,
            ago,
            expected,
        } in rows
        {
            assert_eq!(
                expiry(&resource(*ttl, *phase, *ago), now()),
                *expected,
                "{name}"
            );
        }
    }

    #[test]
    fn the_ready_condition_dates_a_final_resource_without_completed_at() {
        let mut r = resource(Some(10), Some(Phase::Failed), None);
        r.status.as_mut().unwrap().conditions.push(Condition {
            type_: READY.into(),
            status: "False".into(),
            reason: "Failed".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(now() - SignedDuration::from_secs(11)),
        });
        assert_eq!(expiry(&r, now()), Expiry::Now);
    }
}
