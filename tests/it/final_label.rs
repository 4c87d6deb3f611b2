//! A `defender.offboard.dev/final` label the operator did not write: on a
//! copied manifest (the label comes along, the API server drops the status),
//! or put by hand on a resource still in flight. The controller's watch
//! leaves labelled resources out, so without the label's removal neither
//! would ever be offboarded or finished.

use crate::common::*;
use crate::controller::{Env, start};
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use defender_offboard::operator::cache::final_label::FINAL_LABEL;
use defender_offboard::operator::cache::stray_label::REMOVED_REASON;
use defender_offboard::simulator::SimConfig;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The names of the resources an Event with `reason` was published for.
async fn events_with_reason(client: &kube::Client, reason: &str) -> BTreeSet<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.regarding.and_then(|r| r.name))
        .collect()
}

/// Polls `probe` until it answers `Ok`; on timeout, fails with its last
/// answer (what was not there yet).
async fn wait_until<T>(seconds: u64, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        match probe().await {
            Ok(found) => return found,
            Err(missing) if tokio::time::Instant::now() >= deadline => {
                panic!("after {seconds}s: {missing}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_label_on_a_resource_not_final_is_removed_and_it_is_offboarded_once() {
    let env: Env = start(SimConfig {
        // 3 s Pending, 3 s InProgress (wall clock at ×60): long enough to
        // label the second resource while its action runs.
        pending_for: Duration::from_secs(180),
        in_progress_for: Duration::from_secs(180),
        unsuccessful_share: 0.0,
        ..fast_sim_config()
    })
    .await;
    let machines = windows_machines(&client(&env.sim, FAST_LIMITS), 2).await;
    let api: Api<DeviceOffboard> = Api::namespaced(env.client.clone(), "default");

    // `kubectl get -o yaml` of a Failed resource, applied under a new name.
    let mut copied = DeviceOffboard::new("copied", retired(&machines[0]));
    copied.metadata.labels = Some(BTreeMap::from([(FINAL_LABEL.into(), "true".into())]));
    copied.status = Some(DeviceOffboardStatus {
        phase: Some(Phase::Failed),
        ..Default::default()
    });
    let created = api.create(&PostParams::default(), &copied).await.unwrap();
    assert_eq!(created.status, None, "the API drops status on create");

    // A resource in flight, labelled final by hand once its action exists.
    crate::controller::create(&env.client, "relabelled", &machines[1]).await;
    wait_until(30, async || {
        let status = api
            .get("relabelled")
            .await
            .map_err(|e| e.to_string())?
            .status;
        match &status {
            Some(s)
                if s.machine_action_id.is_some() && !s.phase.is_some_and(Phase::is_terminal) =>
            {
                Ok(())
            }
            _ => Err(format!("relabelled is not in flight: {status:?}")),
        }
    })
    .await;
    let label = json!({"metadata": {"labels": {FINAL_LABEL: "true"}}});
    api.patch("relabelled", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();

    // Both end final, and then carry the operator's own label.
    let names = ["copied", "relabelled"];
    let finished = wait_until(60, async || {
        let mut all = Vec::new();
        for name in names {
            let obj = api.get(name).await.map_err(|e| e.to_string())?;
            let labelled = obj.labels().get(FINAL_LABEL).map(String::as_str) == Some("true");
            let phase = obj.status.as_ref().and_then(|s| s.phase);
            if !(labelled && phase.is_some_and(Phase::is_terminal)) {
                return Err(format!(
                    "{name} not final and labelled: labels {:?}, status {:?}",
                    obj.metadata.labels, obj.status
                ));
            }
            all.push(obj);
        }
        Ok(all)
    })
    .await;
    for obj in &finished {
        let status = obj.status.clone().unwrap_or_default();
        assert_eq!(
            status.phase,
            Some(Phase::Succeeded),
            "{:?}",
            obj.metadata.name
        );
        assert!(status.machine_action_id.is_some(), "{status:?}");
    }
    // Each removal is told to a person, on the resource it was removed from.
    let told = wait_until(10, async || {
        let told = events_with_reason(&env.client, REMOVED_REASON).await;
        if names.iter().all(|n| told.contains(*n)) {
            Ok(told)
        } else {
            Err(format!("{REMOVED_REASON} Events only for {told:?}"))
        }
    })
    .await;
    assert_eq!(told, names.map(String::from).into());
    assert_eq!(env.metrics.final_labels_removed.get(), 2);
    // One POST per machine, counted at MDE: the in-flight resource coming
    // back into the watch is polled, not sent again.
    let stats = env.sim.stats();
    for machine in &machines {
        assert_eq!(
            stats
                .offboard_requests_by_machine
                .get(&machine.to_lowercase()),
            Some(&1),
            "POSTs for {machine}: {:?}",
            stats.offboard_requests_by_machine
        );
    }
}
