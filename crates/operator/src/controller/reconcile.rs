//! The controller's reconcile: one [`sequence::step`] with the MDE client and
//! the Kubernetes API as its ports, timed into a histogram.

use super::finished;
use super::ports::MdeCalls;
use super::sequence;
use super::{Context, Result};
use crate::crd::DeviceOffboard;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use std::sync::Arc;

#[tracing::instrument(skip(obj, ctx), fields(name = %obj.name_any(), namespace = obj.namespace().unwrap_or_default()))]
pub async fn reconcile<M: MdeCalls>(
    obj: Arc<DeviceOffboard>,
    ctx: Arc<Context<M>>,
) -> Result<Action> {
    // Final in status, label lost (a crash between the two writes): nothing
    // is done for it but the label that takes it out of the watch.
    if finished::needs_label(&obj) {
        return match finished::label(&ctx.client, &obj).await {
            Ok(_) => Ok(Action::await_change()),
            // A newer version exists (most often this very label, written
            // with the final status, and its watch event not here yet; or
            // the resource was replaced): the watch brings it, and its
            // reconcile labels it if it is still final and unlabelled.
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(Action::await_change()),
            Err(error) => Err(super::Error::Kube(error)),
        };
    }
    let started = std::time::Instant::now();
    let result = match ctx.connections.for_resource(&obj) {
        (_, Ok(mde)) => sequence::step(&obj, &ctx.ports(&mde)).await,
        (key, Err(unavailable)) => {
            tracing::debug!(connection = %key, reason = unavailable.reason().as_str(), "connection unavailable");
            sequence::connection_unavailable(
                &obj,
                &ctx.store,
                &ctx.memory,
                &ctx.settings,
                &unavailable,
            )
            .await
        }
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let requeue = result?;
    if let Some(uid) = obj.metadata.uid.as_deref() {
        ctx.memory.reconcile_ok(uid);
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}
