//! The controller's reconcile: one [`step::step`] with the MDE client and
//! the Kubernetes API as its ports, timed into a histogram.

use super::context::Context;
use super::decision::Settings;
use super::ports::MdeCalls;
use super::step;
use crate::cache::final_label;
use crate::crd::DeviceOffboard;
use crate::error::{Error, Result};
use crate::metrics::ErrorLabels;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use std::sync::Arc;
use std::time::Duration;

#[tracing::instrument(skip(obj, ctx), fields(name = %obj.name_any(), namespace = obj.namespace().unwrap_or_default()))]
pub(crate) async fn reconcile<M: MdeCalls>(
    obj: Arc<DeviceOffboard>,
    ctx: Arc<Context<M>>,
) -> Result<Action> {
    let (key, mde) = ctx.connections.for_resource(&obj);
    // One of the connection's slots, or back soon holding nothing: no
    // tenant's waits hold a worker another tenant needs.
    let Some(_slot) = ctx.slots.try_take(&key) else {
        return Ok(Action::requeue(super::tenant_slots::BUSY_RETRY));
    };
    // Final in status, label lost (a crash between the two writes): nothing
    // is done for it but the label that takes it out of the watch.
    if final_label::needs_label(&obj) {
        return match final_label::label(&ctx.client, &obj).await {
            Ok(_) => Ok(Action::await_change()),
            // A newer version exists (most often this very label, written
            // with the final status, and its watch event not here yet; or
            // the resource was replaced): the watch brings it, and its
            // reconcile labels it if it is still final and unlabelled.
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(Action::await_change()),
            Err(error) => Err(Error::Kube(error)),
        };
    }
    let started = std::time::Instant::now();
    let result = match mde {
        Ok(mde) => {
            let settings = ctx.settings_for(&key);
            let ports = step::Ports {
                settings: &settings,
                ..ctx.ports(&mde)
            };
            step::step(&obj, &ports).await
        }
        Err(unavailable) => {
            tracing::debug!(connection = %key, reason = super::decision::unavailable_reason(&unavailable).as_str(), "connection unavailable");
            step::connection_unavailable(&obj, &ctx.store, &ctx.state, &ctx.settings, &unavailable)
                .await
        }
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let requeue = result?;
    if let Some(uid) = obj.metadata.uid.as_deref() {
        ctx.state.reconcile_errors.reset(uid);
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// First wait after a status write conflict: someone wrote in between, so
/// re-read and decide again soon; repeated conflicts back off to
/// [`CONFLICT_BACKOFF_CAP`] so writers fighting over one object spread out.
pub(crate) const CONFLICT_BACKOFF: Duration = Duration::from_millis(100);
pub(crate) const CONFLICT_BACKOFF_CAP: Duration = Duration::from_secs(10);

pub(crate) fn error_policy<M>(
    obj: Arc<DeviceOffboard>,
    error: &Error,
    ctx: Arc<Context<M>>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            error: error.metric_label().to_string(),
        })
        .inc();
    let in_a_row = obj
        .metadata
        .uid
        .as_deref()
        .map_or(1, |uid| ctx.state.reconcile_errors.failed(uid));
    if !matches!(error, Error::Conflict) {
        tracing::warn!(error = %error, in_a_row, "reconcile failed; retrying");
    }
    Action::requeue(error_wait(error, &ctx.settings, in_a_row))
}

/// How long to wait after the `in_a_row`-th failed reconcile of one resource:
/// exponential with jitter, from a short wait for conflicts and from
/// `--retry-backoff` for other errors, each up to a cap.
pub(crate) fn error_wait(error: &Error, settings: &Settings, in_a_row: u32) -> Duration {
    let previous = in_a_row.saturating_sub(1);
    match error {
        Error::Conflict => super::state::backoff(CONFLICT_BACKOFF, CONFLICT_BACKOFF_CAP, previous),
        _ => super::state::backoff(
            settings.retry_backoff,
            settings
                .retry_backoff
                .saturating_mul(super::step::RETRY_BACKOFF_CAP),
            previous,
        ),
    }
}

#[cfg(test)]
mod error_policy_tests {
    use super::*;

    /// Conflicts in a row back off from 100 ms and grow, instead of a fixed
    /// 100 ms that keeps two writers colliding; other errors start from
    /// `--retry-backoff`. Both stay under their caps (jitter adds at most one
    /// more delay).
    #[test]
    fn repeated_errors_back_off_exponentially_to_a_cap() {
        let settings = Settings::default();
        let conflict = |n| error_wait(&Error::Conflict, &settings, n);
        assert!(conflict(1) >= CONFLICT_BACKOFF && conflict(1) < CONFLICT_BACKOFF * 3);
        assert!(conflict(5) >= CONFLICT_BACKOFF * 16, "{:?}", conflict(5));
        for n in [20, 1000, u32::MAX] {
            assert!(conflict(n) >= CONFLICT_BACKOFF_CAP.min(CONFLICT_BACKOFF * 64));
            assert!(conflict(n) <= CONFLICT_BACKOFF_CAP * 2, "{:?}", conflict(n));
        }
        let other = error_wait(&Error::MissingUid, &settings, 1);
        assert!(other >= settings.retry_backoff, "{other:?}");
        let capped = error_wait(&Error::MissingUid, &settings, 200);
        assert!(capped <= settings.retry_backoff * super::super::step::RETRY_BACKOFF_CAP * 2);
    }

    /// The count is per resource and starts over after a reconcile that did
    /// not fail.
    #[test]
    fn the_error_count_is_per_resource_and_resets() {
        let errors = super::super::state::OffboardState::default().reconcile_errors;
        assert_eq!(errors.failed("a"), 1);
        assert_eq!(errors.failed("a"), 2);
        assert_eq!(errors.failed("b"), 1);
        errors.reset("a");
        assert_eq!(errors.failed("a"), 1);
        assert_eq!(errors.failed("b"), 2);
    }
}
