//! One reconcile step, the same for the controller and the `offboard`
//! command: read the plan, do the I/O it asks for through the ports, write the
//! result. The decisions are in [`super::decision`]; this is only the order.

use super::adopt_index::MachineCheck;
use super::decision::{
    self, AfterCancelRead, AfterLookUp, AfterSend, BreakerCheck, Held, LookUp, Origin, Plan,
    SendKind, Settings, Transition, View,
};
use super::ports::{MdeCalls, StatusStore};
use super::state::{self, Ask, ClaimGuard, LookupKey, MachineClaim, OffboardState, TenantMachine};
use super::status::Reason;
use crate::cache::final_label;
use crate::crd::{
    CANCEL_ANNOTATION, CancelState, DeviceOffboard, DeviceOffboardStatus, Phase, SafetyMarks,
};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, OutcomeLabels, TenantLabels};
use crate::tenants::Unavailable;
use kube::ResourceExt;
use mde_client::client::{MAX_PAGES, MAX_TOP};
use mde_client::limiter::Permit;
use mde_client::{Account, ActionStatus, ApiFamily, MachineAction, MdeError, comment_with_marker};
use std::time::Duration;
use tokio::time::Instant;

/// What one step needs: the two ports, this process's state, the tunables
/// and the counters.
pub struct Ports<'a, M, S> {
    pub mde: &'a M,
    pub store: &'a S,
    pub state: &'a OffboardState,
    pub settings: &'a Settings,
    pub metrics: &'a Metrics,
}

/// When to run the next step (`None`: only when the resource changes).
pub type Requeue = Option<Duration>;

/// How soon to look again when this process may not send (lease not held).
const NOT_LEADER_RETRY: Duration = Duration::from_secs(1);

/// How soon to look again while a connection is checked for the first time.
const CONNECTION_CHECKING_RETRY: Duration = Duration::from_secs(1);

/// One step for `obj`. Errors are only the store's (conflict, API error):
/// every MDE outcome ends up in the status.
pub async fn step<M: MdeCalls, S: StatusStore>(
    obj: &DeviceOffboard,
    ports: &Ports<'_, M, S>,
) -> Result<Requeue> {
    let mut current = obj.clone();
    let key = uid(&current)?;
    let status = current.status.clone().unwrap_or_default();
    let submitting = status.phase == Some(Phase::Submitting);
    let clock = ports
        .state
        .lookups
        .observe(&LookupKey::offboard(&key), submitting, Instant::now());
    let requesting_cancel = status
        .cancel
        .as_ref()
        .is_some_and(|c| c.state == CancelState::Requesting);
    let view = View {
        submitting: clock,
        cancel_clock: ports.state.lookups.observe(
            &LookupKey::cancel(&key),
            requesting_cancel,
            Instant::now(),
        ),
        ..view_of(ports, &current, &status)
    };
    let marks = SafetyMarks::of(current.metadata.annotations.as_ref());
    let plan = decision::guard(
        decision::plan(&view, ports.settings),
        &view,
        &marks,
        ports.settings,
    );
    match plan {
        Plan::Idle { requeue } => Ok(requeue),
        Plan::Write(transition) => apply(ports, &mut current, *transition).await,
        Plan::Cancel { action_id, reason } => {
            cancel(ports, &mut current, &action_id, &reason).await
        }
        Plan::ReadCancelled {
            action_id,
            proves_absence,
        } => read_cancelled(ports, &mut current, &action_id, proves_absence).await,
        Plan::Resolve {
            device_name,
            check_node,
        } => {
            let back = match &current.spec.node {
                Some(node) if check_node => ports.store.node_back(node).await?,
                _ => None,
            };
            if let Some(why) = back {
                let transition = decision::node_returned(&view, &why);
                return apply(ports, &mut current, transition).await;
            }
            let found = match budgeted_read(
                ports.mde,
                ApiFamily::Machines,
                ports.mde.find_machines_by_name(&device_name),
            )
            .await
            {
                Ok(found) => found,
                Err(wait) => return Ok(Some(wait)),
            };
            let resolution =
                match decision::after_resolve(&view, &device_name, found, ports.settings) {
                    Ok(resolution) => resolution,
                    Err(transition) => return apply(ports, &mut current, transition).await,
                };
            // The choice is recorded (and told) before anything is sent for it.
            let transition = decision::resolved(&view, &resolution);
            apply(ports, &mut current, transition).await?;
            let machine_id = resolution.machine_id;
            // Never send from `Submitting` without the lookup first.
            if submitting {
                look_up(ports, &mut current, &machine_id, false).await
            } else {
                submit(ports, &mut current, &machine_id, true).await
            }
        }
        Plan::ConfirmMachine { machine_id } => {
            let read = match budgeted_read(
                ports.mde,
                ApiFamily::Machines,
                ports.mde.get_machine(&machine_id),
            )
            .await
            {
                Ok(read) => read,
                Err(wait) => return Ok(Some(wait)),
            };
            match read {
                // Read anyway: a protected device is not sent for.
                Ok(machine) => match decision::protected_machine(&view, &machine, ports.settings) {
                    Some(stop) => apply(ports, &mut current, stop).await,
                    None => submit(ports, &mut current, &machine_id, false).await,
                },
                Err(error) => {
                    let transition =
                        decision::on_error(&view, &error, Phase::Pending, ports.settings);
                    apply(ports, &mut current, transition).await
                }
            }
        }
        Plan::CheckProtection { machine_id } => {
            let read = ports.mde.get_machine(&machine_id);
            let read = match budgeted_read(ports.mde, ApiFamily::Machines, read).await {
                Ok(read) => read,
                Err(wait) => return Ok(Some(wait)),
            };
            match decision::after_machine_read(&view, &machine_id, read, ports.settings) {
                Ok(resolution) => {
                    let transition = decision::checked(&view, &resolution);
                    apply(ports, &mut current, transition).await?;
                    submit(ports, &mut current, &machine_id, true).await
                }
                Err(transition) => apply(ports, &mut current, transition).await,
            }
        }
        Plan::Submit {
            machine_id,
            check_machine,
        } => submit(ports, &mut current, &machine_id, check_machine).await,
        Plan::LookUp {
            machine_id,
            proves_absence,
        } => look_up(ports, &mut current, &machine_id, proves_absence).await,
    }
}

/// A resource whose connection cannot be used now: nothing is sent. One
/// waiting to send or to confirm a send says why in its status (and an
/// Event); one already `InProgress` keeps its status and is looked at again
/// (its poll waits for the connection too).
pub async fn connection_unavailable<S: StatusStore>(
    obj: &DeviceOffboard,
    store: &S,
    state: &OffboardState,
    settings: &Settings,
    unavailable: &Unavailable,
) -> Result<Requeue> {
    if matches!(unavailable, Unavailable::Checking { .. }) {
        return Ok(Some(CONNECTION_CHECKING_RETRY));
    }
    let mut current = obj.clone();
    let status = current.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    if !matches!(phase, Phase::Pending | Phase::Submitting) {
        return Ok((!phase.is_terminal()).then_some(settings.retry_backoff));
    }
    let view = View {
        spec: &current.spec,
        status: &status,
        generation: current.metadata.generation,
        now: state.now(),
        submitting: None,
        retry_wait: None,
        cancel: cancel_annotation(&current),
        cancel_clock: None,
        not_found_for: None,
        own_retry_at: false,
        created: current.metadata.creation_timestamp.as_ref().map(|t| t.0),
        tenant: None,
    };
    let transition = decision::connection_unavailable(&view, unavailable, settings);
    write_status(store, &mut current, &transition.status).await?;
    if let Some(note) = &transition.note {
        store.publish(&current, note).await;
    }
    Ok(transition.requeue)
}

/// Take a cancel slot, sign in, record the intent, send, record the answer.
async fn cancel<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    action_id: &str,
    reason: &str,
) -> Result<Requeue> {
    let key = uid(current)?;
    if !ports.state.may_send() {
        return Ok(Some(NOT_LEADER_RETRY));
    }
    let permit = match ports.mde.budget().try_reserve(ApiFamily::Cancel) {
        Ok(permit) => permit,
        Err(not_yet) => {
            return Ok(Some(
                not_yet.retry_at.map_or(Duration::from_millis(100), |at| {
                    at.saturating_duration_since(tokio::time::Instant::now())
                }),
            ));
        }
    };
    if ports.mde.sign_in().await.is_err() {
        // Nothing recorded, nothing sent: try again after the usual backoff.
        permit.cancel();
        ports.state.step_failures.failed(&key);
        return Ok(Some(retry_wait(ports, &key)));
    }
    let status = current.status.clone().unwrap_or_default();
    let intent = decision::cancel_intent(&view_of(ports, current, &status), reason);
    let cancel_unsent = |permit: Permit| permit.cancel();
    let permit = match record_intent(
        ports,
        current,
        &intent,
        permit,
        &cancel_unsent,
        &LookupKey::cancel(&key),
    )
    .await?
    {
        Ok(permit) => permit,
        Err(requeue) => return Ok(requeue),
    };
    let comment = comment_with_marker(reason, &key);
    let result = ports.mde.cancel_action(permit, action_id, &comment).await;
    let transition =
        decision::after_cancel(&view_of(ports, current, &intent), result, ports.settings);
    apply(ports, current, transition).await
}

/// An unconfirmed cancel: read the action; adopt a cancel, resend only when
/// the read proves the first did nothing.
async fn read_cancelled<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    action_id: &str,
    proves_absence: bool,
) -> Result<Requeue> {
    let key = uid(current)?;
    let read = ports.mde.get_machine_action(action_id);
    let found = match budgeted_read(ports.mde, ApiFamily::MachineActions, read).await {
        Ok(found) => found,
        Err(wait) => return Ok(Some(wait)),
    };
    if !proves_absence {
        ports.state.lookups.looked_early(&LookupKey::cancel(&key));
    }
    let status = current.status.clone().unwrap_or_default();
    let view = view_of(ports, current, &status);
    match decision::after_cancel_read(&view, found, proves_absence, ports.settings) {
        AfterCancelRead::Write(transition) => apply(ports, current, transition).await,
        AfterCancelRead::Resend => {
            let reason = status
                .cancel
                .as_ref()
                .map(|c| c.reason.clone())
                .unwrap_or_default();
            cancel(ports, current, action_id, &reason).await
        }
    }
}

/// The lookup before any resend: adopt what it finds, send only when it
/// proves absence, otherwise wait.
async fn look_up<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    machine_id: &str,
    proves_absence: bool,
) -> Result<Requeue> {
    let key = uid(current)?;
    let status = current.status.clone().unwrap_or_default();
    let read = ports.mde.offboard_actions(machine_id);
    let found = match budgeted_read(ports.mde, ApiFamily::MachineActions, read).await {
        Ok(found) => found,
        Err(wait) => return Ok(Some(wait)),
    };
    if !proves_absence {
        ports.state.lookups.looked_early(&LookupKey::offboard(&key));
    }
    let view = View {
        submitting: ports
            .state
            .lookups
            .observe(&LookupKey::offboard(&key), true, Instant::now()),
        ..view_of(ports, current, &status)
    };
    let lookup = LookUp {
        key: &key,
        proves_absence,
    };
    let decided = match decide_lookup(ports, &view, &found, machine_id, lookup).await {
        Ok(decided) => decided,
        Err(wait) => return Ok(Some(wait)),
    };
    match decided {
        AfterLookUp::Adopt(transition) => adopt(ports, current, transition).await,
        AfterLookUp::Send => match decision::cancel_instead_of_resend(&view) {
            Some(transition) => apply(ports, current, transition).await,
            None => submit(ports, current, machine_id, false).await,
        },
        AfterLookUp::Wait(transition) => apply(ports, current, transition).await,
    }
}

/// The decision after a list of the machine's offboard actions, reading the
/// machine's record first when it needs it (another request's succeeded
/// offboard stands only if MDE has not seen the machine since). `Err`: the
/// read budget says to wait; nothing was read.
async fn decide_lookup<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    view: &View<'_>,
    found: &std::result::Result<Vec<MachineAction>, MdeError>,
    machine_id: &str,
    lookup: LookUp<'_>,
) -> std::result::Result<AfterLookUp, Duration> {
    let settings = ports.settings;
    let needed = found
        .as_ref()
        .is_ok_and(|actions| decision::needs_machine(actions, lookup.key, view.now, settings));
    if !needed {
        return Ok(decision::after_lookup(view, found, None, lookup, settings));
    }
    let read = ports.mde.get_machine(machine_id);
    Ok(
        match budgeted_read(ports.mde, ApiFamily::Machines, read).await? {
            Ok(machine) => {
                match decision::after_lookup(view, found, Some(&machine), lookup, settings) {
                    // The record was read anyway: a send it proved safe is still
                    // refused for a protected device (the transition ends it).
                    AfterLookUp::Send => decision::protected_machine(view, &machine, settings)
                        .map_or(AfterLookUp::Send, AfterLookUp::Wait),
                    decided => decided,
                }
            }
            // The machine's record could not be read: decide as after a failed list.
            Err(error) => decision::after_lookup(view, &Err(error), None, lookup, settings),
        },
    )
}

/// When this process's own budget refused a read (nothing was sent): how
/// long until a slot frees. The resource is requeued, nothing is written.
fn spent<T>(result: &Result<T, MdeError>) -> Option<Duration> {
    match result {
        Err(MdeError::BudgetSpent { ready_in, .. }) => Some(
            ready_in
                .unwrap_or(Duration::from_millis(100))
                .max(Duration::from_millis(10)),
        ),
        _ => None,
    }
}

/// A read in `family`'s budget, or how long to requeue instead: when the
/// family is parked (after a 429) for over a second, the read is not made;
/// when this process's budget refuses it, nothing was sent.
async fn budgeted_read<M: MdeCalls, T>(
    mde: &M,
    family: ApiFamily,
    read: impl std::future::Future<Output = std::result::Result<T, MdeError>>,
) -> std::result::Result<std::result::Result<T, MdeError>, Duration> {
    if let Some(wait) = budget_wait(mde, family) {
        return Err(wait);
    }
    let result = read.await;
    match spent(&result) {
        Some(wait) => Err(wait),
        None => Ok(result),
    }
}

/// How long a read of `family` would wait for budget, when that is long enough
/// (over a second, e.g. parked after a 429) to free the worker instead.
fn budget_wait<M: MdeCalls>(mde: &M, family: ApiFamily) -> Option<Duration> {
    let ready = mde.budget().ready_at(family)?;
    let wait = ready.saturating_duration_since(tokio::time::Instant::now());
    (wait > Duration::from_secs(1)).then_some(wait)
}

/// Claim the machine, check it (before a first send), sign in, take the
/// budget slot, record the intent, send, record the answer.
async fn submit<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    machine_id: &str,
    check_machine: bool,
) -> Result<Requeue> {
    let key = uid(current)?;
    let status = current.status.clone().unwrap_or_default();
    // A retry (after a 429 or a refused send) skips the machine check only
    // when this process made the attempt before it: its claims then know of
    // any action another resource sent for the machine since. A process
    // that restarted or took over knows nothing of the kind, so it checks.
    let own_retry = status
        .next_retry_at
        .as_ref()
        .is_some_and(|at| ports.state.retry_times.is_own(&key, at.0));
    let check_machine = check_machine || !own_retry;
    // A predecessor (the process before a restart, the leader before a
    // failover) may have sent for this machine just before this process
    // could: no list shows that action until the lookup delay has passed.
    if check_machine
        && let Some(wait) = ports
            .state
            .predecessor_wait(ports.settings.lookup_delay, Instant::now())
    {
        return Ok(Some(wait));
    }
    // One offboard per machine: a resource of this process already sending
    // for it, or already holding an action, is waited for or adopted.
    let claim = ports.state.machines.claim(
        &tenant_machine(ports.mde, machine_id),
        &key,
        Instant::now(),
        ports.settings.lookup_delay,
    );
    let (claim, exact_read) = match claim {
        MachineClaim::Granted { guard, exact_read } => (guard, exact_read),
        MachineClaim::Busy { key: other, retry } => {
            tracing::debug!(%key, %other, "another resource is sending for the machine");
            return Ok(Some(retry));
        }
        MachineClaim::Known { action, key: by } => {
            let view = view_of(ports, current, &status);
            let origin = if by == key {
                Origin::Recovered
            } else {
                Origin::Shared { key: by }
            };
            let transition = decision::record_action(&view, &action, origin);
            return adopt(ports, current, transition).await;
        }
    };
    // A leader whose lease is (nearly) over sends nothing: a standby may be
    // taking over. Checked here and again just before the POST.
    if !ports.state.may_send() {
        return Ok(Some(NOT_LEADER_RETRY));
    }
    // The offboard slot first, so no worker checks the machine or writes its
    // intent and then waits (and a spent budget costs no read).
    // One queue per budget: MDE counts per tenant and app.
    let tenant = ports.mde.account().clone();
    let (permit, served) = match ports.mde.budget().try_reserve(ApiFamily::Offboard) {
        Ok(permit) => (permit, ports.state.budget_queues.served(&tenant, &key)),
        Err(not_yet) => {
            // Each waiter comes back when the slot of its place in the queue
            // frees, so a freed slot wakes one waiter, not all of them.
            let wait = not_yet.retry_at.map_or(Duration::from_millis(100), |_| {
                let place = ports
                    .state
                    .budget_queues
                    .place(&tenant, &key, Instant::now());
                let at = ports.mde.budget().nth_ready_at(ApiFamily::Offboard, place);
                ports.state.budget_queues.due(&tenant, &key, at);
                let wait = at.saturating_duration_since(tokio::time::Instant::now());
                tracing::debug!(%key, place, wait_ms = wait.as_millis(), "waiting for the offboard budget");
                wait
            });
            // A little jitter for waiters of the same slot.
            let jitter = Duration::from_millis(rand::random_range(0..5));
            let view = view_of(ports, current, &status);
            let now = view.now;
            let transition = decision::waiting_for_budget(&view, wait + jitter, machine_id);
            let before = current.metadata.resource_version.clone();
            let requeue = apply(ports, current, transition).await?;
            // The version just written reaches the cache's feed and parks
            // there until its time (or, if something changed it meanwhile,
            // is reconciled again): a requeue would only hold the
            // scheduler's memory for it.
            let written = current.metadata.resource_version != before;
            if written && crate::cache::parked::parked_until(current, now).is_some() {
                return Ok(None);
            }
            return Ok(requeue);
        }
    };
    // A slot given back unsent takes its place in the queue back with it:
    // from the back, its slot would stay unused until the next hour's.
    let give_back = |permit: Permit| {
        permit.cancel();
        ports.state.budget_queues.give_back(&tenant, &key, served);
    };
    // An action this process may have caused and not recorded (or one it
    // knows finished) is checked for on the machine's own list, even on a
    // resend: the claim says the adopt index cannot prove its absence.
    if check_machine || exact_read {
        // Nothing is sent unless the check clears it: the slot goes back
        // whatever else happens, an error included (a dropped permit would
        // count as a call MDE never saw, for a whole hour).
        match check(ports, current, machine_id, exact_read).await {
            Ok(None) => {}
            Ok(Some(requeue)) => {
                give_back(permit);
                return Ok(requeue);
            }
            Err(error) => {
                give_back(permit);
                return Err(error);
            }
        }
    }
    // The breaker last, just before the send: an adopt (found by the claim
    // or the check) neither counts nor waits for it.
    let ask = Ask {
        limit: ports.settings.max_offboards_per_hour,
        send: if status.attempts.unwrap_or(0) == 0 {
            SendKind::First
        } else {
            SendKind::Again
        },
        released: SafetyMarks::of(current.metadata.annotations.as_ref()).release_breaker,
    };
    let breaker_tenant = tenant.tenant_only();
    let check = ports
        .state
        .breaker
        .try_send(&breaker_tenant, &key, ask, Instant::now());
    if ask.limit > 0 {
        ports
            .state
            .breaker
            .publish_tenant(ports.metrics, &breaker_tenant, ask.limit);
    }
    let counted = match check {
        BreakerCheck::Pass { counted } => counted,
        BreakerCheck::Hold(held) => {
            give_back(permit);
            return hold(ports, current, &held, machine_id).await;
        }
    };
    // A counted send never made frees its slot in the breaker's hour too.
    let give_back_all = |permit: Permit| {
        give_back(permit);
        if counted {
            ports.state.breaker.give_back(&breaker_tenant, &key);
        }
    };
    send(ports, current, machine_id, permit, &give_back_all, &claim).await
}

/// A first send the breaker holds: say so (an Event and the counter when
/// the hold begins), and come back when the hour frees its slot. Like a
/// budget wait, a long hold parks the resource outside the cache.
async fn hold<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    held: &Held,
    machine_id: &str,
) -> Result<Requeue> {
    let status = current.status.clone().unwrap_or_default();
    let view = view_of(ports, current, &status);
    let now = view.now;
    let transition = decision::breaker_open(&view, held, machine_id);
    if transition.note.is_some() {
        tracing::warn!(
            limit = held.limit,
            sent = held.sent,
            "the blast-radius breaker holds a new offboard"
        );
        ports
            .metrics
            .breaker_held
            .get_or_create(&TenantLabels {
                tenant: ports.mde.account().tenant.clone(),
            })
            .inc();
    }
    let before = current.metadata.resource_version.clone();
    let requeue = apply(ports, current, transition).await?;
    let written = current.metadata.resource_version != before;
    if written && crate::cache::parked::parked_until(current, now).is_some() {
        return Ok(None);
    }
    Ok(requeue)
}

/// The check before a first send: `Some` (the step's result) when the machine's
/// list shows an action to adopt, or could not be read; `None` to send.
async fn check<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    machine_id: &str,
    exact_read: bool,
) -> Result<Option<Requeue>> {
    let key = uid(current)?;
    let status = current.status.clone().unwrap_or_default();
    // The common case, nothing to adopt, proven by the tenant's index
    // without a read.
    let max_age = ports.settings.lookup_delay;
    let tenant = ports.mde.account().tenant_only();
    let index = if exact_read {
        None
    } else {
        machine_check(ports.state, &tenant, machine_id, max_age)
    };
    let decided = match index {
        Some(MachineCheck::Refresh) => {
            match refresh_adopt_index(ports, &tenant, machine_id).await {
                Ok(decided) => decided,
                Err(wait) => return Ok(Some(Some(wait))),
            }
        }
        Some(decided) => decided,
        None => MachineCheck::ExactRead,
    };
    if decided == MachineCheck::Send {
        return Ok(None);
    }
    let found = ports.mde.offboard_actions(machine_id).await;
    if let Some(wait) = spent(&found) {
        return Ok(Some(Some(wait)));
    }
    let lookup = LookUp {
        key: &key,
        proves_absence: true,
    };
    let view = view_of(ports, current, &status);
    let decided = match decide_lookup(ports, &view, &found, machine_id, lookup).await {
        Ok(decided) => decided,
        Err(wait) => return Ok(Some(Some(wait))),
    };
    Ok(match decided {
        AfterLookUp::Send => None,
        AfterLookUp::Adopt(transition) => Some(adopt(ports, current, transition).await?),
        AfterLookUp::Wait(transition) => Some(apply(ports, current, transition).await?),
    })
}

/// Bring the adopt index up to date (one worker at a time: the others look
/// again shortly), then decide for `machine_id`: [`MachineCheck::ExactRead`]
/// whenever the read fails, stops part way or proves nothing; `Err` (nothing
/// read) when the read budget or another worker's refresh says to wait.
///
/// The read goes page by page, each in its own read slot. A read of the whole
/// window (the first fill, and every [`super::adopt_index::REFILL_EVERY`]) starts only
/// when the budget has as many slots free as it was last seen to need; one
/// that cannot get them, or stops part way, keeps what it read (more entries
/// only mean more exact reads) and this machine is read exactly, so a spent
/// read budget never stops first sends (no read is thrown away and retried).
async fn refresh_adopt_index<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    tenant: &Account,
    machine_id: &str,
) -> std::result::Result<MachineCheck, Duration> {
    let max_age = ports.settings.lookup_delay;
    let decided = |state: &OffboardState| match machine_check(state, tenant, machine_id, max_age) {
        Some(MachineCheck::Send) => MachineCheck::Send,
        _ => MachineCheck::ExactRead,
    };
    let Some(_refreshing) = ports.state.adopt.try_refreshing(tenant) else {
        return Err(REFRESH_BUSY_RETRY);
    };
    // Another worker may have refreshed it just before.
    if machine_check(ports.state, tenant, machine_id, max_age) != Some(MachineCheck::Refresh) {
        return Ok(decided(ports.state));
    }
    let now = ports.state.now();
    let Some(since) = ports.state.adopt.next_since(tenant, now, max_age) else {
        return Ok(MachineCheck::ExactRead);
    };
    let whole = ports.state.adopt.is_whole_window(since, now);
    let budget = ports.mde.budget();
    if whole
        && (budget.remaining(ApiFamily::MachineActions) as usize)
            < ports.state.adopt.pages_needed(tenant) + KEEP_FOR_EXACT_READ
    {
        return Ok(MachineCheck::ExactRead);
    }
    let began = tokio::time::Instant::now();
    let (actions, pages, complete) = read_window(ports.mde, since).await;
    let now = ports.state.now();
    ports
        .state
        .adopt
        .fold(tenant, &actions, since, began, complete, since, now);
    if whole {
        ports
            .state
            .adopt
            .whole_window_read(tenant, began, pages, complete);
    }
    Ok(if complete {
        decided(ports.state)
    } else {
        MachineCheck::ExactRead
    })
}

/// Read slots a refresh of the adopt index leaves free: the exact read it
/// falls back to must not wait for the next window.
const KEEP_FOR_EXACT_READ: usize = 1;

/// How soon a worker looks again while another refreshes the adopt index.
const REFRESH_BUSY_RETRY: Duration = Duration::from_millis(200);

/// Every offboard action created since `since`, page by page, each page in
/// its own read slot: what was read, the pages read, and whether the answer
/// is complete (a short last page). A refused slot or a failed page stops it.
async fn read_window<M: MdeCalls>(
    mde: &M,
    since: jiff::Timestamp,
) -> (Vec<MachineAction>, usize, bool) {
    let mut actions = Vec::new();
    for page in 0..MAX_PAGES {
        if (mde.budget().remaining(ApiFamily::MachineActions) as usize) <= KEEP_FOR_EXACT_READ {
            return (actions, page, false);
        }
        let read = mde.offboard_actions_page(since, MAX_TOP, page * MAX_TOP);
        match budgeted_read(mde, ApiFamily::MachineActions, read).await {
            Ok(Ok(batch)) => {
                let last = batch.len() < MAX_TOP;
                actions.extend(batch);
                if last {
                    return (actions, page + 1, true);
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "reading offboard actions for the adopt index failed; reading the machine's actions instead");
                return (actions, page, false);
            }
            Err(_) => return (actions, page, false),
        }
    }
    (actions, MAX_PAGES, false)
}

/// Sign in, write the intent, send in the reserved slot, record.
async fn send<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    machine_id: &str,
    permit: Permit,
    give_back: &(dyn Fn(Permit) + Sync),
    claim: &ClaimGuard,
) -> Result<Requeue> {
    let key = uid(current)?;
    let status = current.status.clone().unwrap_or_default();
    let comment = comment_with_marker(&current.spec.comment, &key);
    // The token first: a slow sign-in must not sit between the intent record
    // and the send, where it would eat into the lookup delay.
    if let Err(error) = ports.mde.sign_in().await {
        give_back(permit);
        let transition = decision::on_error(
            &view_of(ports, current, &status),
            &error,
            status.phase.unwrap_or_default(),
            ports.settings,
        );
        return apply(ports, current, transition).await;
    }
    // The intent record: only the writer holding the latest resourceVersion wins,
    // so two workers (or replicas) can never both send for one resource.
    let intent = decision::submitting(&view_of(ports, current, &status), machine_id);
    let clock_key = LookupKey::offboard(&key);
    let permit = match record_intent(ports, current, &intent, permit, give_back, &clock_key).await?
    {
        Ok(permit) => permit,
        Err(requeue) => return Ok(requeue),
    };
    // From here an action may exist until one is recorded or a read proves
    // none: the claim outlives this step unless MDE refuses before acting.
    claim.posting();
    let result = ports.mde.offboard(permit, machine_id, &comment).await;
    match &result {
        Ok(_) => count(ports.metrics, Reason::Requested),
        // "Already pending" created nothing, but proves that an action
        // exists: the claim stands until it is recorded or a read proves none.
        Err(MdeError::AlreadyPending { .. }) => {}
        Err(error) if !error.may_have_created() => claim.nothing_created(),
        Err(_) => {}
    }
    let view = view_of(ports, current, &intent);
    let transition = match decision::after_send(&view, result, ports.settings) {
        AfterSend::Record(transition) => transition,
        AfterSend::AdoptPending => adopt_pending(ports, &view, machine_id).await,
    };
    apply(ports, current, transition).await
}

/// Write an intent record with the resourceVersion precondition, then check
/// the lease once more just before the send: `Ok(permit)` to send now (the
/// lookup clock under `clock_key` starts), `Err(requeue)` when this process
/// may no longer send. Recorded but not sent is safe: whoever holds the lease
/// next reads before sending.
async fn record_intent<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    intent: &DeviceOffboardStatus,
    permit: Permit,
    give_back: &(dyn Fn(Permit) + Sync),
    clock_key: &LookupKey,
) -> Result<std::result::Result<Permit, Requeue>> {
    if let Err(error) = write_status(ports.store, current, intent).await {
        give_back(permit);
        return Err(error);
    }
    if !ports.state.may_send() {
        give_back(permit);
        return Ok(Err(Some(NOT_LEADER_RETRY)));
    }
    ports.state.lookups.sending(clock_key, Instant::now());
    Ok(Ok(permit))
}

/// MDE said an offboard is already pending for the machine: adopt that one.
async fn adopt_pending<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    view: &View<'_>,
    machine_id: &str,
) -> Transition {
    match ports.mde.offboard_actions(machine_id).await {
        Ok(actions) => match decision::pending_in(&actions) {
            Some(action) => {
                count(ports.metrics, Reason::Adopted);
                let key = action
                    .requestor_comment
                    .as_deref()
                    .and_then(mde_client::marker_key)
                    .unwrap_or_default()
                    .to_string();
                decision::record_action(view, action, Origin::Shared { key })
            }
            None if decision::pending_is_another_type(&actions, view.now, ports.settings) => {
                decision::other_action_pending(view, machine_id, ports.settings)
            }
            // Gone final between the two calls: confirm by marker later.
            None => decision::on_error(
                view,
                &MdeError::OutcomeUnknown {
                    reason: "MDE reported a pending offboard that could not be listed".into(),
                },
                Phase::Submitting,
                ports.settings,
            ),
        },
        Err(error) => decision::lookup_failed(view, &error, ports.settings),
    }
}

/// Record an adopted action, remember it for the machine, count it.
async fn adopt<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    current: &mut DeviceOffboard,
    transition: Transition,
) -> Result<Requeue> {
    count(ports.metrics, Reason::Adopted);
    apply(ports, current, transition).await
}

/// Once a resource records an action, other resources for its machine adopt it.
/// Remembered under the key of the request that created the action (its
/// owner: the only one that may cancel it), which is this resource's unless
/// it adopted the action.
fn remember_action<M: MdeCalls, S>(ports: &Ports<'_, M, S>, obj: &DeviceOffboard) {
    let Some(status) = &obj.status else { return };
    let (Some(id), Some(machine_id), Some(uid)) =
        (&status.machine_action_id, &status.machine_id, obj.uid())
    else {
        return;
    };
    let owner = status.adopted_from.clone().unwrap_or(uid);
    let word = status.action_status.as_deref().unwrap_or("Pending");
    let action = MachineAction::recorded_offboard(id, machine_id, ActionStatus::from_word(word));
    ports.state.machines.known(
        tenant_machine(ports.mde, machine_id),
        &action,
        &owner,
        Instant::now(),
    );
}

/// The machine in the tenant `mde` reaches (whichever connection reaches it).
fn tenant_machine<M: MdeCalls>(mde: &M, machine_id: &str) -> TenantMachine {
    TenantMachine {
        tenant: mde.account().tenant_only(),
        machine_id: machine_id.to_string(),
    }
}

/// What `tenant`'s adopt index says for a first send to `machine_id`.
fn machine_check(
    state: &OffboardState,
    tenant: &Account,
    machine_id: &str,
    max_age: Duration,
) -> Option<MachineCheck> {
    state
        .adopt
        .machine_check(tenant, machine_id, max_age, &state.lease, Instant::now())
}

/// Fold a polled action into the resource (the batch poller and `--wait`).
pub async fn record_poll<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    obj: &DeviceOffboard,
    action: &MachineAction,
) -> Result<()> {
    let status = obj.status.clone().unwrap_or_default();
    if let Some(machine_id) = &status.machine_id {
        ports
            .state
            .machines
            .polled(&tenant_machine(ports.mde, machine_id), action);
    }
    if let Some(key) = obj.uid() {
        ports
            .state
            .lookups
            .observe(&LookupKey::not_found(&key), false, Instant::now());
    }
    if let Some(transition) = decision::after_poll(&view_of(ports, obj, &status), action) {
        apply(ports, &mut obj.clone(), transition).await?;
    }
    Ok(())
}

/// MDE says the recorded action does not exist: end the resource, say so.
pub async fn record_gone<M: MdeCalls, S: StatusStore>(
    ports: &Ports<'_, M, S>,
    obj: &DeviceOffboard,
    action_id: &str,
) -> Result<()> {
    let status = obj.status.clone().unwrap_or_default();
    if status.phase.is_some_and(Phase::is_terminal)
        || status.machine_action_id.as_deref() != Some(action_id)
    {
        return Ok(());
    }
    let key = uid(obj)?;
    let view = view_of(ports, obj, &status);
    match decision::action_gone(&view, action_id, ports.settings) {
        Some(transition) => {
            apply(ports, &mut obj.clone(), transition).await?;
        }
        // The first 404: confirmed (or not) by a read a delay later.
        None => {
            ports
                .state
                .lookups
                .observe(&LookupKey::not_found(&key), true, Instant::now());
        }
    }
    Ok(())
}

fn view_of<'a, M: MdeCalls, S>(
    ports: &Ports<'_, M, S>,
    obj: &'a DeviceOffboard,
    status: &'a DeviceOffboardStatus,
) -> View<'a> {
    View {
        spec: &obj.spec,
        status,
        generation: obj.metadata.generation,
        cancel: cancel_annotation(obj),
        cancel_clock: None,
        now: ports.state.now(),
        submitting: None,
        retry_wait: obj.uid().map(|uid| retry_wait(ports, &uid)),
        not_found_for: obj.uid().and_then(|uid| {
            ports
                .state
                .lookups
                .seen_for(&LookupKey::not_found(&uid), Instant::now())
        }),
        own_retry_at: match (obj.uid(), status.next_retry_at.as_ref()) {
            (Some(uid), Some(at)) => ports.state.retry_times.is_own(&uid, at.0),
            _ => false,
        },
        created: obj.metadata.creation_timestamp.as_ref().map(|t| t.0),
        tenant: Some(ports.mde.account().into()),
    }
}

/// The `defender.offboard.dev/cancel` annotation's value, if any.
fn cancel_annotation(obj: &DeviceOffboard) -> Option<&str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CANCEL_ANNOTATION))
        .map(String::as_str)
}

/// The longest wait between retries of a transient failure, in multiples of
/// `--retry-backoff` (the default 10 s grows to at most 5 minutes).
pub const RETRY_BACKOFF_CAP: u32 = 30;

/// The retry wait after `uid`'s failures in a row: exponential, jittered.
fn retry_wait<M, S>(ports: &Ports<'_, M, S>, uid: &str) -> Duration {
    let base = ports.settings.retry_backoff;
    state::backoff(
        base,
        base.saturating_mul(RETRY_BACKOFF_CAP),
        ports.state.step_failures.in_a_row(uid),
    )
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
    remember_action(ports, current);
    if let Some(uid) = current.uid() {
        let retry_at = transition.status.next_retry_at.as_ref().map(|t| t.0);
        ports
            .state
            .retry_times
            .wrote(&uid, retry_at, ports.state.now());
        // A 404 starts the clock that confirms it; any other answer ends it.
        let not_found = transition
            .status
            .last_error
            .as_ref()
            .is_some_and(|e| e.code == mde_client::error::NOT_FOUND_CODE);
        ports
            .state
            .lookups
            .observe(&LookupKey::not_found(&uid), not_found, Instant::now());
        if decision::is_failed_retry(&transition) {
            ports.state.step_failures.failed(&uid);
        } else {
            ports.state.step_failures.reset(&uid);
        }
    }
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
    if final_label::needs_label(current) {
        label_final(store, current).await;
    }
    Ok(())
}

/// A final status and its label in one cycle: the label takes the resource
/// out of the controller's watch. A failed label is not the step's failure:
/// the status is written, and the next reconcile labels a resource that is
/// still final (a conflict means it changed, or was replaced under its name).
async fn label_final<S: StatusStore>(store: &S, current: &mut DeviceOffboard) {
    match store.label_final(current).await {
        Ok(labelled) => *current = labelled,
        Err(Error::Conflict) => {}
        Err(error) => {
            tracing::warn!(error = %error, "could not label a finished resource; its next reconcile does");
        }
    }
}
