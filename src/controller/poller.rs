//! Batch polling of in-flight actions: one `id in (...)` call per 50 actions
//! per interval, whatever the number of resources, instead of a call each.

use super::Context;
use super::reconcile::record_poll;
use crate::crd::{DeviceOffboard, Phase};
use crate::metrics::PhaseLabels;
use futures::FutureExt;
use kube::runtime::reflector::Store;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The action ids worth polling: those of resources not yet final.
pub fn in_flight(resources: &[Arc<DeviceOffboard>]) -> Vec<String> {
    let mut ids: Vec<String> = resources
        .iter()
        .filter_map(|r| r.status.as_ref())
        .filter(|s| !s.phase.unwrap_or_default().is_terminal())
        .filter_map(|s| s.machine_action_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Count resources by phase for the `resources` gauge.
pub fn count_by_phase(resources: &[Arc<DeviceOffboard>]) -> HashMap<Phase, i64> {
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

pub async fn run(store: Store<DeviceOffboard>, ctx: Arc<Context>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cache_ready = false;
    loop {
        ticker.tick().await;
        // Not `wait_until_ready().await`: the store's readiness is a one-waker
        // channel that the controller also waits on, so a second waiter may
        // never be woken. Checking it once per tick needs no waker.
        if !cache_ready {
            match store.wait_until_ready().now_or_never() {
                Some(Ok(())) => cache_ready = true,
                Some(Err(_)) => return,
                None => continue,
            }
        }
        let resources = store.state();
        for (phase, count) in count_by_phase(&resources) {
            ctx.metrics
                .resources
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .set(count);
        }
        let ids = in_flight(&resources);
        tracing::debug!(
            resources = resources.len(),
            in_flight = ids.len(),
            "poll tick"
        );
        if ids.is_empty() {
            continue;
        }
        let actions = match ctx.mde.machine_actions_by_ids(&ids).await {
            Ok(actions) => actions,
            Err(error) => {
                tracing::warn!(error = %error, in_flight = ids.len(), "polling in-flight actions failed; next interval retries");
                continue;
            }
        };
        let by_id: HashMap<&str, _> = actions.iter().map(|a| (a.id.as_str(), a)).collect();
        for resource in &resources {
            let Some(id) = resource
                .status
                .as_ref()
                .and_then(|s| s.machine_action_id.as_deref())
            else {
                continue;
            };
            if let Some(action) = by_id.get(id)
                && let Err(error) = record_poll(&ctx, resource, action).await
            {
                // A conflict means the cache was stale; the next tick sees the fresh object.
                tracing::debug!(error = %error, "poll result not recorded this time");
            }
        }
    }
}
