//! One reconcile step, the same for the controller and the `offboard`
//! command: read the plan, do the I/O it asks for through the ports, write the
//! result. The decisions are in [`super::decision`]; this is only the order.

use super::decision::{self, AfterLookUp, AfterSend, Plan, Settings, Transition, View};
use super::ports::{MdeCalls, StatusStore};
use super::status::Reason;
use super::{Error, Result};
use crate::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use crate::metrics::{Metrics, OutcomeLabels};
use jiff::Timestamp;
use kube::ResourceExt;
use mde_client::{ApiFamily, MachineAction, MdeError, comment_with_marker, correlation_marker};
use std::time::Duration;

/// What one step needs: the two ports, the tunables and the counters.
pub struct Ports<'a, M, S> {
    pub mde: &'a M,
    pub store: &'a S,
    pub settings: &'a Settings,
    pub metrics: &'a Metrics,
}

/// When to run the next step (`None`: only when the resource changes).
pub type Requeue = Option<Duration>;

/// One step for `obj`. Errors are only the store's (conflict, API error):
/// every MDE outcome ends up in the status.
pub async fn step<M: MdeCalls, S: StatusStore>(
    obj: &DeviceOffboard,
    ports: &Ports<'_, M, S>,
) -> Result<Requeue> {
    let mut current = obj.clone();
    let status = current.status.clone().unwrap_or_default();
    let view = view_of(&current, &status);
    match decision::plan(&view, ports.settings) {
        Plan::Idle { requeue } => Ok(requeue),
        Plan::Refuse(transition) => apply(ports, &mut current, *transition).await,
        Plan::Resolve { device_name } => {
            if let Some(wait) = budget_wait(ports.mde, ApiFamily::Machines) {
                return Ok(Some(wait));
            }
            let found = ports.mde.find_machines_by_name(&device_name).await;
            match decision::after_resolve(&view, &device_name, found, ports.settings) {
                // Never send from `Submitting` without the lookup first.
                Ok(machine_id) if status.phase == Some(Phase::Submitting) => {
                    look_up(ports, &mut current, &machine_id).await
                }
                Ok(machine_id) => submit(ports, &mut current, &machine_id).await,
                Err(transition) => apply(ports, &mut current, transition).await,
            }
        }
        Plan::Submit { machine_id } => submit(ports, &mut current, &machine_id).await,
        Plan::LookUp { machine_id } => look_up(ports, &mut current, &machine_id).await,
    }
}

/// The lookup that must precede any resend: adopt what it finds, send only
/// when it proves absence, wait when it fails.
async fn look_up<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    machine_id: &str,
) -> Result<Requeue> {
    if let Some(wait) = budget_wait(ports.mde, ApiFamily::MachineActions) {
        return Ok(Some(wait));
    }
    let status = current.status.clone().unwrap_or_default();
    let marker = correlation_marker(&uid(current)?);
    let found = ports.mde.find_offboard_action(machine_id, &marker).await;
    match decision::after_lookup(&view_of(current, &status), found, ports.settings) {
        AfterLookUp::Adopt(transition) => {
            count(ports.metrics, Reason::Adopted);
            apply(ports, current, transition).await
        }
        AfterLookUp::Send => submit(ports, current, machine_id).await,
        AfterLookUp::Wait(transition) => apply(ports, current, transition).await,
    }
}

/// How long a read of `family` would wait for budget, when that is long enough
/// (over a second, e.g. parked after a 429) to free the worker instead.
fn budget_wait<M: MdeCalls>(mde: &M, family: ApiFamily) -> Option<Duration> {
    let ready = mde.budget().ready_at(family)?;
    let wait = ready.saturating_duration_since(tokio::time::Instant::now());
    (wait > Duration::from_secs(1)).then_some(wait)
}

/// Budget slot, intent record, send, record the answer.
async fn submit<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    machine_id: &str,
) -> Result<Requeue> {
    let status = current.status.clone().unwrap_or_default();
    let comment = comment_with_marker(&current.spec.comment, &uid(current)?);
    // Take the budget slot first, so no worker writes its intent and then waits.
    let permit = match ports.mde.budget().try_reserve(ApiFamily::Offboard) {
        Ok(permit) => permit,
        Err(not_yet) => {
            let wait = not_yet.retry_at.map_or(Duration::from_millis(100), |at| {
                at.saturating_duration_since(tokio::time::Instant::now())
            });
            // Spread the waiters a little so they do not all wake at once.
            let jitter = Duration::from_millis(rand::random_range(0..50));
            let transition =
                decision::waiting_for_budget(&view_of(current, &status), wait + jitter, machine_id);
            return apply(ports, current, transition).await;
        }
    };
    // The intent record: only the writer holding the latest resourceVersion wins,
    // so two workers (or replicas) can never both send for one resource.
    let intent = decision::submitting(&view_of(current, &status), machine_id);
    if let Err(error) = write_status(ports.store, current, &intent).await {
        permit.cancel();
        return Err(error);
    }
    let result = ports.mde.offboard(permit, machine_id, &comment).await;
    if result.is_ok() {
        count(ports.metrics, Reason::Requested);
    }
    let view = view_of(current, &intent);
    let transition = match decision::after_send(&view, result, ports.settings) {
        AfterSend::Record(transition) => transition,
        AfterSend::AdoptPending => adopt_pending(ports, &view, machine_id).await,
    };
    apply(ports, current, transition).await
}

/// MDE said an offboard is already pending for the machine: adopt that one.
async fn adopt_pending<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    view: &View<'_>,
    machine_id: &str,
) -> Transition {
    match ports.mde.find_pending_offboard(machine_id).await {
        Ok(Some(action)) => {
            count(ports.metrics, Reason::Adopted);
            decision::record_action(view, &action, true)
        }
        // Gone final between the two calls: confirm by marker later.
        Ok(None) => decision::on_error(
            view,
            &MdeError::OutcomeUnknown {
                reason: "MDE reported a pending offboard that could not be listed".into(),
            },
            Phase::Submitting,
            ports.settings,
        ),
        Err(error) => decision::lookup_failed(view, &error, ports.settings),
    }
}

/// Fold a polled action into the resource (the batch poller and `--wait`).
pub async fn record_poll<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    obj: &DeviceOffboard,
    action: &MachineAction,
) -> Result<()> {
    let status = obj.status.clone().unwrap_or_default();
    if let Some(transition) = decision::after_poll(&view_of(obj, &status), action) {
        apply(ports, &mut obj.clone(), transition).await?;
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

fn count(metrics: &Metrics, outcome: Reason) {
    metrics
        .offboards
        .get_or_create(&OutcomeLabels {
            outcome: outcome.metric_label().to_string(),
        })
        .inc();
}

/// Write the transition's status (if it changed), publish its event, requeue.
async fn apply<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    transition: Transition,
) -> Result<Requeue> {
    write_status(ports.store, current, &transition.status).await?;
    if let Some(note) = &transition.note {
        ports.store.publish(current, note).await;
    }
    Ok(transition.requeue)
}

/// Write `status` if it differs from what `current` holds; `current` becomes
/// the stored object, so later writes carry the new resourceVersion.
async fn write_status<S: StatusStore>(
    store: &S,
    current: &mut DeviceOffboard,
    status: &DeviceOffboardStatus,
) -> Result<()> {
    if current
        .status
        .as_ref()
        .unwrap_or(&DeviceOffboardStatus::default())
        == status
    {
        return Ok(());
    }
    *current = store.write_status(current, status).await?;
    Ok(())
}
