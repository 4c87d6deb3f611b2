//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! Written by hand (about as long as wiring a crate) because the property we
//! need is specific: a leader that cannot renew must stop writing *before*
//! any other replica can take the lease. The algorithm is client-go's: every
//! write is an update with a resourceVersion precondition (so two candidates
//! can never both win), followers judge expiry by when *they* last saw the
//! lease change (immune to clock skew), and the leader aborts its work once
//! `renew_deadline` (< `lease_duration`) passes without a successful renewal.
//! kube-lease-manager relies on server-side-apply field conflicts instead and
//! does not give that stop-before-takeover bound.

pub use crate::lease_clock::LeaseClock;
use crate::telemetry::Readiness;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

pub const LEASE_NAME: &str = "defender-offboard-leader";

#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// `leaseDurationSeconds` for a duration: rounded up, at least 1.
fn lease_seconds(duration: Duration) -> i32 {
    let seconds = duration.as_secs_f64().ceil().max(1.0);
    seconds.min(i32::MAX as f64) as i32
}

impl LeaseTiming {
    /// The leader must give up (renew deadline) and notice it (one retry
    /// period later) before a standby may take over (lease duration).
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline + self.retry_period < self.lease_duration {
            Ok(())
        } else {
            Err(format!(
                "--lease-renew-deadline ({:?}) + --lease-retry-period ({:?}) must be shorter than --lease-duration ({:?}): otherwise a standby may take over while the old leader still sends",
                self.renew_deadline, self.retry_period, self.lease_duration
            ))
        }
    }
}

/// What a candidate saw of the lease the last time it looked.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    at: Instant,
}

/// Whether `identity` may take the lease now (pure: tested below).
fn may_acquire(
    identity: &str,
    lease: &LeaseSpec,
    observed: Option<&Observed>,
    now: Instant,
    timing: &LeaseTiming,
) -> bool {
    match lease.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = lease
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(1) as u64))
                .unwrap_or(timing.lease_duration);
            // Expired only if it has not changed for a whole lease duration as *we* saw it.
            observed.is_some_and(|o| now >= o.at + duration)
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    identity: String,
    timing: LeaseTiming,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, identity: &str, timing: LeaseTiming) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            identity: identity.to_string(),
            timing,
            observed: None,
        }
    }

    /// One attempt to take or renew the lease. `Ok(true)` when we hold it.
    /// Kept whole: it is client-go's algorithm step for step (read, judge,
    /// write with a precondition), easiest to compare in one piece.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        // The Lease counts whole seconds: round up, never down, so a standby
        // never judges a 1.5 s lease expired after 1 s.
        let seconds = lease_seconds(self.timing.lease_duration);
        let lease = match self.api.get_opt(LEASE_NAME).await? {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(Timestamp::now())),
                        renew_time: Some(MicroTime(Timestamp::now())),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Observed {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            at: now,
        };
        match &self.observed {
            Some(previous)
                if previous.holder == seen.holder && previous.renew_time == seen.renew_time => {}
            _ => self.observed = Some(seen),
        }
        if !may_acquire(
            &self.identity,
            &spec,
            self.observed.as_ref(),
            now,
            &self.timing,
        ) {
            return Ok(false);
        }
        let taking_over = spec.holder_identity.as_deref() != Some(self.identity.as_str());
        let mut updated = lease.clone();
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(self.identity.clone());
        new_spec.lease_duration_seconds = Some(seconds);
        new_spec.renew_time = Some(MicroTime(Timestamp::now()));
        if taking_over {
            new_spec.acquire_time = Some(MicroTime(Timestamp::now()));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        updated.spec = Some(new_spec);
        // `replace` carries metadata.resourceVersion: a concurrent writer makes this 409.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up on a clean shutdown so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = self
                .api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await;
        }
    }
}

/// Which Lease to hold, as whom, and how fast.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub identity: String,
    pub timing: LeaseTiming,
}

/// A future that resolves when the work must stop.
pub type StopSignal = std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// Wait for the lease, then run `work` while renewing it. One piece on
/// purpose: the renewal loop, the instant of the last renewal and the work's
/// task must live in one place for the stop-before-takeover bound to be read
/// (and checked) at a glance. `work` is handed a
/// stop signal for a clean shutdown; it is aborted mid-flight if the lease is
/// lost, and an error is returned (the process exits and restarts).
pub async fn run_as_leader<W, F>(
    client: kube::Client,
    lease: &LeaseConfig,
    lease_clock: LeaseClock,
    leader_gauge: Gauge,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
    work: W,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    W: FnOnce(StopSignal) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let timing = lease.timing;
    let identity = lease.identity.as_str();
    let mut elector = Elector::new(client, &lease.namespace, identity, timing);
    // Standbys are ready too: they serve health and wait.
    readiness.set();
    let mut shutdown = Box::pin(shutdown);
    tracing::info!(identity, lease = LEASE_NAME, namespace = %lease.namespace, "waiting for the leader lease");
    // The lease counts from when the winning request was *sent*: a slow answer
    // must not stretch our idea of how long we hold it.
    let mut last_renewal;
    loop {
        last_renewal = Instant::now();
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(error = %error, "lease check failed"),
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(timing.retry_period) => {}
        }
    }
    tracing::info!(identity, "became leader");
    leader_gauge.set(1);
    lease_clock.renewed(last_renewal + timing.renew_deadline);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut work = tokio::spawn(work(Box::pin(async {
        let _ = stop_rx.await;
    })));
    // Set once `work` has been polled to completion: a JoinHandle must never
    // be polled again after that.
    let mut work_done = false;
    let outcome = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = &mut work => { work_done = true; break Ok(()) },
            _ = tokio::time::sleep(timing.retry_period) => {}
        }
        // A renewal that hangs (stuck API server, half-open connection) must not
        // keep us working past the deadline: bound it by the time left.
        let left = timing.renew_deadline.saturating_sub(last_renewal.elapsed());
        let sent = Instant::now();
        match tokio::time::timeout(left, elector.try_acquire_or_renew()).await {
            Ok(Ok(true)) => {
                last_renewal = sent;
                lease_clock.renewed(last_renewal + timing.renew_deadline);
            }
            Ok(Ok(false)) => break Err("lost the leader lease to another replica".to_string()),
            Ok(Err(error)) => tracing::warn!(error = %error, "lease renewal failed"),
            Err(_) => tracing::warn!("lease renewal did not answer in time"),
        }
        if last_renewal.elapsed() >= timing.renew_deadline {
            break Err(format!(
                "could not renew the leader lease for {:?}",
                timing.renew_deadline
            ));
        }
    };
    leader_gauge.set(0);
    lease_clock.lost();
    match outcome {
        Ok(()) => {
            let _ = stop_tx.send(());
            if !work_done {
                let _ = tokio::time::timeout(Duration::from_secs(10), &mut work).await;
                work.abort();
            }
            elector.release().await;
            Ok(())
        }
        Err(reason) => {
            // Stop every write now, mid-request if need be: the Submitting record
            // lets the next leader finish the job without a duplicate.
            work.abort();
            tracing::error!(reason, "stopping: no longer the leader");
            Err(reason.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn takeover_only_after_a_full_lease_duration_unchanged() {
        let timing = LeaseTiming::default();
        let now = Instant::now();
        assert!(may_acquire("b", &spec(None), None, now, &timing));
        assert!(may_acquire("a", &spec(Some("a")), None, now, &timing));
        // Never seen before: we cannot know it expired.
        assert!(!may_acquire("b", &spec(Some("a")), None, now, &timing));
        let seen = Observed {
            holder: Some("a".into()),
            renew_time: None,
            at: now,
        };
        assert!(!may_acquire(
            "b",
            &spec(Some("a")),
            Some(&seen),
            now + Duration::from_secs(14),
            &timing
        ));
        assert!(may_acquire(
            "b",
            &spec(Some("a")),
            Some(&seen),
            now + Duration::from_secs(15),
            &timing
        ));
    }

    #[test]
    fn leader_stops_before_others_can_take_over() {
        assert!(LeaseTiming::default().validate().is_ok());
        let unsafe_timing = LeaseTiming {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(9),
            retry_period: Duration::from_secs(2),
        };
        let error = unsafe_timing.validate().unwrap_err();
        assert!(error.contains("--lease-renew-deadline"), "{error}");
    }

    #[test]
    fn sub_second_leases_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(300)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(15)), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn no_send_without_a_lease_or_near_its_end() {
        let clock = LeaseClock::candidate();
        assert!(!clock.may_send(Duration::ZERO), "not leader yet");
        clock.renewed(Instant::now() + Duration::from_secs(10));
        assert!(clock.may_send(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_millis(9500)).await;
        assert!(
            !clock.may_send(Duration::from_secs(1)),
            "too close to the deadline"
        );
        clock.lost();
        assert!(!clock.may_send(Duration::ZERO));
        assert!(LeaseClock::not_elected().may_send(Duration::from_secs(3600)));
    }
}
