//! Gauges that describe the state rather than count events: how much rate
//! budget each MDE API family has left, and how old the oldest unfinished
//! `DeviceOffboard` is. Published by the leader on an interval.

use crate::crd::DeviceOffboard;
use crate::metrics::{FamilyLabels, Metrics};
use crate::offboard::Context;
use crate::offboard::MdeCalls;
use kube::runtime::reflector::Store;
use mde_client::{ApiFamily, RateBudget};
use std::sync::Arc;
use std::time::Duration;

/// Age of the oldest resource not yet final, from its creation; zero when
/// every resource is final. A resource without a creation time is skipped.
pub(crate) fn oldest_in_flight(
    resources: &[Arc<DeviceOffboard>],
    now: jiff::Timestamp,
) -> Duration {
    resources
        .iter()
        .filter(|r| {
            !r.status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or_default()
                .is_terminal()
        })
        .filter_map(|r| r.metadata.creation_timestamp.as_ref())
        .filter_map(|created| Duration::try_from(now.duration_since(created.0)).ok())
        .max()
        .unwrap_or_default()
}

/// Set both gauges once; the budget left is per connection (tenant and app).
/// `parked_since` is the creation time of the oldest resource waiting
/// outside the cache.
pub(crate) fn publish(
    metrics: &Metrics,
    budgets: &[(String, RateBudget)],
    resources: &[Arc<DeviceOffboard>],
    parked_since: Option<jiff::Timestamp>,
) {
    for (connection, budget) in budgets {
        for family in ApiFamily::ALL {
            metrics
                .budget_remaining
                .get_or_create(&FamilyLabels {
                    connection: connection.clone(),
                    family: family.as_str().to_string(),
                })
                .set(i64::from(budget.remaining(family)));
        }
    }
    let now = jiff::Timestamp::now();
    let parked_age = parked_since
        .and_then(|created| Duration::try_from(now.duration_since(created)).ok())
        .unwrap_or_default();
    let age = oldest_in_flight(resources, now).max(parked_age);
    metrics
        .in_flight_oldest
        .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
}

/// Publish every `interval` until dropped.
pub(crate) async fn run<M: MdeCalls>(
    store: Store<DeviceOffboard>,
    ctx: Arc<Context<M>>,
    interval: Duration,
) {
    loop {
        let budgets: Vec<(String, RateBudget)> = ctx
            .connections
            .ready()
            .into_iter()
            .map(|(key, mde)| (key.to_string(), mde.budget().clone()))
            .collect();
        publish(
            &ctx.metrics,
            &budgets,
            &store.state(),
            ctx.parked.oldest_created(),
        );
        // The breaker closes as its hour slides, with no send to say so.
        ctx.state
            .breaker
            .publish(&ctx.metrics, ctx.settings.max_offboards_per_hour);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceOffboardStatus, Phase};
    use crate::test_kit;

    fn resource(
        created_secs_ago: i64,
        phase: Option<Phase>,
        now: jiff::Timestamp,
    ) -> Arc<DeviceOffboard> {
        let r = test_kit::offboard("r")
            .device_name("pc")
            .comment("c")
            .created(now - jiff::SignedDuration::from_secs(created_secs_ago))
            .status(DeviceOffboardStatus {
                phase,
                ..Default::default()
            })
            .build();
        Arc::new(r)
    }

    #[test]
    fn the_oldest_unfinished_resource_sets_the_age() {
        let now = jiff::Timestamp::now();
        let resources = [
            resource(900, Some(Phase::Succeeded), now),
            resource(120, Some(Phase::InProgress), now),
            resource(30, None, now),
            resource(600, Some(Phase::Failed), now),
        ];
        assert_eq!(oldest_in_flight(&resources, now), Duration::from_secs(120));
        assert_eq!(oldest_in_flight(&resources[..1], now), Duration::ZERO);
        // A clock behind the creation time gives no negative age.
        assert_eq!(
            oldest_in_flight(&[resource(-50, None, now)], now),
            Duration::ZERO
        );
    }

    #[test]
    fn publish_sets_budget_left_per_family() {
        let metrics = Metrics::default();
        let budget = RateBudget::new(&"7/60s".parse().unwrap());
        publish(&metrics, &[("default".to_string(), budget)], &[], None);
        let text = metrics.encode();
        assert!(
            text.contains(
                "defender_offboard_budget_remaining{connection=\"default\",family=\"offboard\"} 7"
            ),
            "{text}"
        );
        assert!(
            text.contains("defender_offboard_in_flight_oldest_seconds 0"),
            "{text}"
        );
    }
}
