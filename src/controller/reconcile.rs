//! The reconcile: reads the plan, does the I/O it asks for, writes the result.

use super::decision::{self, AfterLookUp, AfterSend, Plan, Transition, View};
use super::{Context, Error, Result};
use crate::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use crate::defender::{
    ApiFamily, MachineAction, MdeError, comment_with_marker, correlation_marker,
};
use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Field manager for every write the operator makes.
pub const FIELD_MANAGER: &str = "defender-offboard";

#[tracing::instrument(skip(obj, ctx), fields(name = %obj.name_any(), namespace = obj.namespace().unwrap_or_default()))]
pub async fn reconcile(obj: Arc<DeviceOffboard>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&obj, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(obj: &DeviceOffboard, ctx: &Context) -> Result<Action> {
    let mut current = obj.clone();
    let status = current.status.clone().unwrap_or_default();
    let view = view_of(&current, &status);
    match decision::plan(&view, &ctx.settings) {
        Plan::Idle { requeue } => Ok(requeue.map_or_else(Action::await_change, Action::requeue)),
        Plan::Resolve { device_name } => {
            if let Some(wait) = budget_wait(ctx, ApiFamily::Machines) {
                return Ok(Action::requeue(wait));
            }
            let found = ctx.mde.find_machines_by_name(&device_name).await;
            match decision::after_resolve(&view, &device_name, found, &ctx.settings) {
                Ok(machine_id) => submit(ctx, &mut current, &machine_id).await,
                Err(transition) => apply(ctx, &mut current, transition).await,
            }
        }
        Plan::Submit { machine_id } => submit(ctx, &mut current, &machine_id).await,
        Plan::LookUp { machine_id } => {
            if let Some(wait) = budget_wait(ctx, ApiFamily::MachineActions) {
                return Ok(Action::requeue(wait));
            }
            let marker = correlation_marker(&uid(&current)?);
            let found = ctx.mde.find_offboard_action(&machine_id, &marker).await;
            match decision::after_lookup(&view, found, &ctx.settings) {
                AfterLookUp::Adopt(transition) => {
                    ctx.metrics
                        .offboards
                        .get_or_create(&outcome("adopted"))
                        .inc();
                    apply(ctx, &mut current, transition).await
                }
                AfterLookUp::Send => submit(ctx, &mut current, &machine_id).await,
                AfterLookUp::Wait(transition) => apply(ctx, &mut current, transition).await,
            }
        }
    }
}

/// How long a read of `family` would wait for budget, when that is long enough
/// (over a second, e.g. parked after a 429) to free the worker instead.
fn budget_wait(ctx: &Context, family: ApiFamily) -> Option<Duration> {
    let ready = ctx.mde.budget().ready_at(family)?;
    let wait = ready.saturating_duration_since(tokio::time::Instant::now());
    (wait > Duration::from_secs(1)).then_some(wait)
}

/// Budget check, intent record, send, record the answer.
async fn submit(ctx: &Context, current: &mut DeviceOffboard, machine_id: &str) -> Result<Action> {
    let status = current.status.clone().unwrap_or_default();
    // Take the budget slot first, so no worker writes its intent and then waits.
    let permit = match ctx.mde.budget().try_reserve(ApiFamily::Offboard) {
        Ok(permit) => permit,
        Err(not_yet) => {
            let wait = not_yet.retry_at.map_or(Duration::from_millis(100), |at| {
                at.saturating_duration_since(tokio::time::Instant::now())
            });
            // Spread the waiters a little so they do not all wake at once.
            let jitter = Duration::from_millis(rand::random_range(0..50));
            let transition =
                decision::waiting_for_budget(&view_of(current, &status), wait + jitter, machine_id);
            return apply(ctx, current, transition).await;
        }
    };
    // The intent record: only the writer holding the latest resourceVersion wins,
    // so two workers (or replicas) can never both send for one resource.
    let intent = decision::submitting(&view_of(current, &status), machine_id);
    if let Err(error) = write_status(ctx, current, &intent).await {
        permit.cancel();
        return Err(error);
    }
    let comment = match uid(current) {
        Ok(uid) => comment_with_marker(&current.spec.comment, &uid),
        Err(error) => {
            permit.cancel();
            return Err(error);
        }
    };
    let result = ctx
        .mde
        .offboard_reserved(Some(permit), machine_id, &comment)
        .await;
    if result.is_ok() {
        ctx.metrics
            .offboards
            .get_or_create(&outcome("submitted"))
            .inc();
    }
    let view = view_of(current, &intent);
    match decision::after_send(&view, result, &ctx.settings) {
        AfterSend::Record(transition) => apply(ctx, current, transition).await,
        AfterSend::AdoptPending => {
            let transition = match ctx.mde.find_pending_offboard(machine_id).await {
                Ok(Some(action)) => {
                    ctx.metrics
                        .offboards
                        .get_or_create(&outcome("adopted"))
                        .inc();
                    decision::record_action(&view, &action, true)
                }
                // Gone final between the two calls: confirm by marker later.
                Ok(None) => decision::on_error(
                    &view,
                    &MdeError::OutcomeUnknown {
                        reason: "MDE reported a pending offboard that could not be listed".into(),
                    },
                    Phase::Submitting,
                    &ctx.settings,
                ),
                Err(error) => decision::lookup_failed(&view, &error, &ctx.settings),
            };
            apply(ctx, current, transition).await
        }
    }
}

/// Poll result for one resource (called by the batch poller).
pub async fn record_poll(
    ctx: &Context,
    obj: &DeviceOffboard,
    action: &MachineAction,
) -> Result<()> {
    let status = obj.status.clone().unwrap_or_default();
    if let Some(transition) = decision::after_poll(&view_of(obj, &status), action) {
        apply(ctx, &mut obj.clone(), transition).await?;
    }
    Ok(())
}

fn view_of<'a>(obj: &'a DeviceOffboard, status: &'a DeviceOffboardStatus) -> View<'a> {
    View {
        spec: &obj.spec,
        status,
        generation: obj.metadata.generation,
        now: Timestamp::now(),
    }
}

fn uid(obj: &DeviceOffboard) -> Result<String> {
    obj.uid().ok_or(Error::MissingUid)
}

fn outcome(outcome: &str) -> crate::metrics::OutcomeLabels {
    crate::metrics::OutcomeLabels {
        outcome: outcome.to_string(),
    }
}

/// Write the transition's status (if it changed), publish its event, requeue.
async fn apply(
    ctx: &Context,
    current: &mut DeviceOffboard,
    transition: Transition,
) -> Result<Action> {
    write_status(ctx, current, &transition.status).await?;
    if let Some(note) = &transition.note {
        let event = Event {
            type_: if note.reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.as_str().to_string(),
            note: Some(truncate(&note.message, 1000)),
            action: "Offboard".to_string(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &current.object_ref(&())).await {
            // An event is informative; the status already carries the outcome.
            tracing::warn!(error = %error, reason = note.reason.as_str(), "could not publish event");
        }
    }
    Ok(transition
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The status merge patch from `old` to `new`: removed fields become `null`
/// (a merge patch leaves absent keys alone), and the object's resourceVersion
/// makes it a precondition — a stale writer gets 409 Conflict.
pub fn status_patch(
    resource_version: Option<&str>,
    old: &DeviceOffboardStatus,
    new: &DeviceOffboardStatus,
) -> Value {
    let old = serde_json::to_value(old).unwrap_or(Value::Null);
    let mut new = serde_json::to_value(new).unwrap_or_else(|_| json!({}));
    if let (Value::Object(old), Value::Object(new)) = (&old, &mut new) {
        for key in old.keys() {
            new.entry(key.clone()).or_insert(Value::Null);
        }
    }
    json!({ "metadata": { "resourceVersion": resource_version }, "status": new })
}

/// Write `status` if it differs from what `current` holds; `current` is updated
/// to the server's answer so later writes carry the new resourceVersion.
pub async fn write_status(
    ctx: &Context,
    current: &mut DeviceOffboard,
    status: &DeviceOffboardStatus,
) -> Result<()> {
    let old = current.status.clone().unwrap_or_default();
    if &old == status {
        return Ok(());
    }
    let api: Api<DeviceOffboard> =
        Api::namespaced(ctx.client.clone(), &current.namespace().unwrap_or_default());
    let patch = status_patch(current.resource_version().as_deref(), &old, status);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api
        .patch_status(&current.name_any(), &params, &Patch::Merge(&patch))
        .await
    {
        Ok(updated) => {
            *current = updated;
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_conflict() => Err(Error::Conflict),
        Err(error) => Err(Error::Kube(error)),
    }
}
