//! Polling of in-flight actions: one window call (`type eq 'Offboard' and
//! creationDateTimeUtc ge T`, 10,000 a page) per interval for up to 10,000 in
//! flight, `id in (...)` batches when those cost fewer calls, and a single
//! `GET` for an id neither answer holds (see [`super::poll_plan`]).

use super::adopt_index;
use super::context::Context;
use super::poll_plan::{self, Density, InFlight, PollPlan};
use super::ports::MdeCalls;
use super::state::OffboardState;
use super::step::{record_gone, record_poll};
use crate::crd::{DeviceOffboard, Phase};
use crate::metrics::{ErrorLabels, PhaseLabels};
use crate::tasks::AbortOnDrop;
use crate::telemetry::Liveness;
use crate::tenants::ConnectionKey;
use crate::tenants::Unavailable;
use futures::FutureExt;
use jiff::Timestamp;
use kube::runtime::reflector::Store;
use mde_client::client::MAX_TOP;
use mde_client::{MachineAction, MdeError, RateLimits};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Count resources by phase for the `resources` gauge.
pub(crate) fn count_by_phase(resources: &[Arc<DeviceOffboard>]) -> HashMap<Phase, i64> {
    let mut counts: HashMap<Phase, i64> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
    for resource in resources {
        let phase = resource
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default();
        *counts.entry(phase).or_default() += 1;
    }
    counts
}

/// The pause before the next poll: the configured interval, stretched when
/// `calls` per poll would spend more than half of any machine-action budget
/// window, so lookups (which exactly-once depends on) always find room.
pub(crate) fn poll_pause(interval: Duration, calls: usize, limits: &RateLimits) -> Duration {
    limits.0.iter().fold(interval, |pause, limit| {
        let share = (limit.calls / 2).max(1) as f64;
        pause.max(limit.window.mul_f64(calls as f64 / share))
    })
}

/// Run the poller, and again whenever it stops or panics: without it every
/// in-flight resource would stay `InProgress` for good. While it is down,
/// `/healthz` says so (a liveness probe restarts a pod whose poller keeps dying).
pub(crate) async fn supervise<F, Fut>(start: F, liveness: Liveness, restart_delay: Duration)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let ended = tokio::spawn(start()).await;
        let reason = match ended {
            Err(error) if error.is_panic() => "the poller of in-flight actions panicked",
            _ => "the poller of in-flight actions stopped",
        };
        tracing::error!(reason, restart_in = ?restart_delay, "restarting the poller");
        liveness.failing(format!("{reason}; restarting it"));
        tokio::time::sleep(restart_delay).await;
        liveness.recovered();
    }
}

/// The `resources` gauge: resources by phase; the parked ones are `Pending`.
fn publish_phase_counts(
    metrics: &crate::metrics::Metrics,
    resources: &[Arc<DeviceOffboard>],
    parked: usize,
) {
    let mut counts = count_by_phase(resources);
    *counts.entry(Phase::Pending).or_default() += i64::try_from(parked).unwrap_or(i64::MAX);
    metrics
        .parked
        .set(i64::try_from(parked).unwrap_or(i64::MAX));
    for (phase, count) in counts {
        metrics
            .resources
            .get_or_create(&PhaseLabels {
                phase: phase.as_str().to_string(),
            })
            .set(count);
    }
}

/// The actions in flight, with the earliest time each may have been created:
/// the creation time an earlier answer showed, else `submittedAt` (written
/// before the send), else unknown.
pub(crate) fn in_flight_actions(
    resources: &[Arc<DeviceOffboard>],
    created: &HashMap<String, Timestamp>,
) -> Vec<InFlight> {
    let mut seen = std::collections::HashSet::new();
    resources
        .iter()
        .filter_map(|r| r.status.as_ref())
        .filter(|s| !s.phase.unwrap_or_default().is_terminal())
        .filter_map(|s| {
            let id = s.machine_action_id.clone()?;
            let since = created
                .get(&id)
                .copied()
                .or_else(|| s.submitted_at.as_ref().map(|t| t.0));
            Some(InFlight { id, since })
        })
        .filter(|a| seen.insert(a.id.clone()))
        .collect()
}

/// What the poller carries from one tick to the next.
#[derive(Default)]
struct PollState {
    /// Creation times MDE showed for actions still in flight.
    created: HashMap<String, Timestamp>,
    /// How dense MDE's list of offboards was in the last window answer.
    density: Density,
}

/// One poller per tenant with actions in flight (the operator's own, each
/// `DefenderConnection`): each spends only its own tenant's budget, and a
/// tenant that is slow or refuses holds only its own poller. The `resources`
/// gauge is published here, for all of them.
pub(crate) async fn run_per_connection<M: MdeCalls>(
    store: Store<DeviceOffboard>,
    ctx: Arc<Context<M>>,
    interval: Duration,
    clock_skew: Duration,
) {
    let mut pollers: HashMap<ConnectionKey, AbortOnDrop> = HashMap::new();
    let mut cache_ready = false;
    loop {
        if cache_ready {
            tokio::time::sleep(interval).await;
        } else {
            // Not `wait_until_ready().await`: the store's readiness is a
            // one-waker channel that the controller also waits on, so a second
            // waiter may never be woken. Checking it once per tick needs no waker.
            tokio::time::sleep(interval.min(Duration::from_millis(200))).await;
            match store.wait_until_ready().now_or_never() {
                Some(Ok(())) => cache_ready = true,
                Some(Err(_)) => return,
                None => continue,
            }
        }
        let resources = store.state();
        publish_phase_counts(&ctx.metrics, &resources, ctx.parked.len());
        let keys: std::collections::HashSet<ConnectionKey> = resources
            .iter()
            .filter(|r| action_id(r).is_some() && !crate::cache::final_label::is_final(r))
            .map(|r| ConnectionKey::of(r))
            .collect();
        pollers.retain(|key, _| keys.contains(key));
        for key in keys {
            pollers.entry(key.clone()).or_insert_with(|| {
                let (store, ctx) = (store.clone(), ctx.clone());
                let liveness = ctx.liveness.clone();
                AbortOnDrop(tokio::spawn(supervise(
                    move || {
                        run(
                            store.clone(),
                            ctx.clone(),
                            interval,
                            clock_skew,
                            key.clone(),
                        )
                    },
                    liveness,
                    POLLER_RESTART_DELAY,
                )))
            });
        }
    }
}

/// How long a dead poller stays down before it is started again.
const POLLER_RESTART_DELAY: Duration = Duration::from_secs(5);

/// The poller of one tenant's actions (the resources whose connection is
/// `key`): every `interval`, one plan over its actions in flight, its windows
/// starting `clock_skew` before the earliest time each may have been created.
pub(crate) async fn run<M: MdeCalls>(
    store: Store<DeviceOffboard>,
    ctx: Arc<Context<M>>,
    interval: Duration,
    clock_skew: Duration,
    key: ConnectionKey,
) {
    let skew = jiff::SignedDuration::try_from(clock_skew).unwrap_or(poll_plan::CLOCK_SKEW);
    let mut pause = Duration::ZERO;
    let mut state = PollState::default();
    loop {
        tokio::time::sleep(pause).await;
        pause = interval;
        let mde = match ctx.connections.get(&key) {
            Ok(mde) => mde,
            Err(unavailable) => {
                if !matches!(unavailable, Unavailable::Checking { .. }) {
                    tracing::warn!(connection = %key, reason = super::decision::unavailable_reason(&unavailable).as_str(), "actions in flight cannot be polled while the connection is unavailable");
                }
                continue;
            }
        };
        // Filtered from a borrowed snapshot, not `into_iter()`: collecting a
        // vector's own iterator reuses its buffer, and every tenant's poller
        // would hold room for the whole cache across its reads (heaptrack:
        // 7 MB with 200 tenants and 10,000 resources).
        let resources: Vec<Arc<DeviceOffboard>> = store
            .state()
            .iter()
            .filter(|r| ConnectionKey::of(r) == key)
            .cloned()
            .collect();
        let in_flight = in_flight_actions(&resources, &state.created);
        let wanted: std::collections::HashSet<&str> =
            in_flight.iter().map(|a| a.id.as_str()).collect();
        state.created.retain(|id, _| wanted.contains(id.as_str()));
        tracing::debug!(
            connection = %key,
            resources = resources.len(),
            in_flight = in_flight.len(),
            "poll tick"
        );
        if in_flight.is_empty() {
            continue;
        }
        let now = ctx.state.now();
        let plan = poll_plan::plan_with_skew(&in_flight, now, state.density, skew);
        pause = poll_pause(
            interval,
            plan.expected_calls(now, state.density),
            mde.rate_limits(),
        );
        let by_ids: std::collections::HashSet<&String> = plan.by_ids.iter().collect();
        let expected: Vec<String> = in_flight
            .iter()
            .filter(|a| !by_ids.contains(&a.id))
            .map(|a| a.id.clone())
            .collect();
        let read = Read {
            state: &ctx.state,
            lookup_delay: ctx.settings.lookup_delay,
            mde: mde.as_ref(),
        };
        let actions = match read_plan(read, &plan, &expected, now, &mut state).await {
            Ok(actions) => actions,
            Err(error) => {
                ctx.metrics
                    .reconcile_errors
                    .get_or_create(&ErrorLabels {
                        error: "poll".into(),
                    })
                    .inc();
                tracing::warn!(connection = %key, error = %error, in_flight = in_flight.len(), "polling in-flight actions failed; next interval retries");
                continue;
            }
        };
        // Only the actions in flight are kept, and the index borrows them: a
        // window answer can hold thousands.
        let mut actions = actions;
        actions.retain(|a| wanted.contains(a.id.as_str()));
        let answered: std::collections::HashSet<&str> =
            actions.iter().map(|a| a.id.as_str()).collect();
        // Absent from the window and old enough for that to mean something:
        // ask for them by id, then (below) one by one.
        let grace = jiff::SignedDuration::try_from(ctx.settings.lookup_delay).unwrap_or_default();
        let absent: Vec<String> = in_flight
            .iter()
            .filter(|a| !answered.contains(a.id.as_str()) && !by_ids.contains(&a.id))
            .filter(|a| poll_plan::worth_reading_again(a, now, grace))
            .map(|a| a.id.clone())
            .collect();
        drop(answered);
        let mut found = Vec::new();
        if !absent.is_empty() {
            match mde.machine_actions_by_ids(&absent).await {
                Ok(read) => found = read,
                Err(error) => {
                    tracing::warn!(error = %error, absent = absent.len(), "reading actions by id failed; next interval retries")
                }
            }
        }
        let by_id: HashMap<&str, &MachineAction> = actions
            .iter()
            .chain(&found)
            .map(|a| (a.id.as_str(), a))
            .collect();
        for action in by_id.values() {
            if let Some(created) = action
                .creation_date_time_utc
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
            {
                state.created.insert(action.id.clone(), created);
            }
        }
        for resource in &resources {
            if let Some(action) = action_id(resource).and_then(|id| by_id.get(id))
                && let Err(error) = record_poll(&ctx.ports(&mde), resource, action).await
            {
                // A conflict means the cache was stale; the next tick sees the fresh object.
                tracing::debug!(error = %error, "poll result not recorded this time");
            }
        }
        let missing: Vec<&String> = plan
            .by_ids
            .iter()
            .chain(&absent)
            .filter(|id| !by_id.contains_key(id.as_str()))
            .collect();
        read_missing(&ctx, &mde, &resources, &missing).await;
    }
}

/// The calls of one plan: the window (learning MDE's density from it), then
/// the id batches.
/// Who reads: the tenant's client, and the state whose adopt index of that
/// tenant the window answers keep current.
#[derive(Clone, Copy)]
struct Read<'a, M> {
    state: &'a OffboardState,
    lookup_delay: Duration,
    mde: &'a M,
}

/// How many actions in flight are read by id when the window answer does
/// not read (ten calls): a bound on what one malformed entry may cost.
const FALLBACK_IDS: usize = 500;

async fn read_plan<M: MdeCalls>(
    read: Read<'_, M>,
    plan: &PollPlan,
    expected: &[String],
    now: Timestamp,
    state: &mut PollState,
) -> Result<Vec<MachineAction>, MdeError> {
    let mut actions = Vec::new();
    if let Some(since) = plan.window_since {
        let began = tokio::time::Instant::now();
        let offboard_state = read.state;
        let tenant = read.mde.account().tenant_only();
        let next =
            offboard_state
                .adopt
                .next_since(&tenant, offboard_state.now(), read.lookup_delay);
        actions = match read
            .mde
            .offboard_actions_since(since, MAX_TOP, expected)
            .await
        {
            Ok(actions) => actions,
            // An answer with an entry that does not read (one malformed
            // action) must not stop every poll of the tenant while that entry
            // stays in the window: read some of the actions in flight by id
            // instead (those answers skip what does not read), and fold
            // nothing into the index.
            Err(error @ MdeError::InvalidResponse { .. }) => {
                tracing::warn!(error = %error, "the window of offboard actions did not read; reading actions in flight by id instead");
                let some: Vec<String> = expected.iter().take(FALLBACK_IDS).cloned().collect();
                let mut actions = read.mde.machine_actions_by_ids(&some).await?;
                if !plan.by_ids.is_empty() {
                    actions.extend(read.mde.machine_actions_by_ids(&plan.by_ids).await?);
                }
                return Ok(actions);
            }
            Err(error) => return Err(error),
        };
        state.density = Density::observed(now, since, actions.len());
        // The same answer keeps the machine checks' index current.
        if let Some(next) = next {
            let complete = adopt_index::complete_answer(&actions, MAX_TOP);
            let now = offboard_state.now();
            offboard_state
                .adopt
                .fold(&tenant, &actions, since, began, complete, next, now);
        }
    }
    if !plan.by_ids.is_empty() {
        actions.extend(read.mde.machine_actions_by_ids(&plan.by_ids).await?);
    }
    Ok(actions)
}

/// The action id a resource records.
fn action_id(resource: &DeviceOffboard) -> Option<&str> {
    resource.status.as_ref()?.machine_action_id.as_deref()
}

/// The most ids a batch left out that are read one by one in a tick.
const SINGLE_READS_PER_TICK: usize = 10;

/// Ids a batch answer left out are read alone: a list's silence proves
/// nothing, but a 404 for the id itself ends the resource with the reason.
async fn read_missing<M: MdeCalls>(
    ctx: &Context<M>,
    mde: &M,
    resources: &[Arc<DeviceOffboard>],
    missing: &[&String],
) {
    if missing.is_empty() {
        return;
    }
    tracing::warn!(
        missing = missing.len(),
        "some in-flight actions were not in MDE's answer; reading them one by one"
    );
    for id in missing.iter().take(SINGLE_READS_PER_TICK) {
        let answer = mde.get_machine_action(id).await;
        for resource in resources
            .iter()
            .filter(|r| action_id(r) == Some(id.as_str()))
        {
            let written = match &answer {
                Ok(action) => record_poll(&ctx.ports(mde), resource, action).await,
                Err(MdeError::NotFound { .. }) => record_gone(&ctx.ports(mde), resource, id).await,
                Err(error) => {
                    tracing::warn!(error = %error, action = %id, "reading one action failed; next interval retries");
                    Ok(())
                }
            };
            if let Err(error) = written {
                tracing::debug!(error = %error, "poll result not recorded this time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dead_poller_turns_health_red_and_is_restarted() {
        let liveness = Liveness::default();
        let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = starts.clone();
        let supervisor = tokio::spawn(supervise(
            move || {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 0 {
                        panic!("a bug in the poller");
                    }
                    std::future::pending::<()>().await
                }
            },
            liveness.clone(),
            Duration::from_secs(5),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(liveness.problem().unwrap().contains("panicked"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(liveness.problem(), None, "green again once restarted");
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 2);
        supervisor.abort();
    }

    #[test]
    fn polling_keeps_half_the_read_budget_free() {
        let mde = RateLimits::default(); // 100/60s, 1500/3600s
        let every = Duration::from_secs(10);
        assert_eq!(
            poll_pause(every, 1, &mde),
            every,
            "a few in-flight actions: the configured interval"
        );
        // 3000 in flight = 60 calls a poll: at most 750 calls an hour for polling.
        assert_eq!(poll_pause(every, 60, &mde), Duration::from_secs(288));
        assert_eq!(poll_pause(every, 0, &mde), every);
    }

    /// One malformed entry in the window answer (here: the answer does not
    /// read) must not stop every poll of the tenant: the actions in flight
    /// are read by id instead, and the window is not folded into the index.
    #[tokio::test(start_paused = true)]
    async fn a_window_answer_that_does_not_read_falls_back_to_reads_by_id() {
        use crate::offboard::fakes::{FakeMde, Lookup};
        let mde = FakeMde::default();
        let action = mde.insert(
            "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
            "[defender-offboard:k] x",
        );
        mde.push_window_read(Lookup::Fail(MdeError::InvalidResponse {
            message: "1 of the entries do not read".into(),
        }));
        let state = OffboardState::default();
        let read = Read {
            state: &state,
            lookup_delay: Duration::from_secs(35),
            mde: &mde,
        };
        let plan = PollPlan {
            window_since: Some(state.now() - jiff::SignedDuration::from_hours(1)),
            by_ids: Vec::new(),
        };
        let mut poll = PollState::default();
        let read = read_plan(
            read,
            &plan,
            std::slice::from_ref(&action.id),
            state.now(),
            &mut poll,
        )
        .await
        .expect("the poll goes on by id");
        assert_eq!(
            read.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            [action.id.as_str()]
        );
    }
}
