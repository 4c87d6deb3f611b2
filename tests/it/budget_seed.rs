//! What a new process (a restart, a new leader) counts against its offboard
//! budget before its first send: the `submittedAt` of resources that may hold
//! a send within the window. It reads the resources not labelled final, those
//! labelled final in the window's hours, and those labelled by a version that
//! wrote no hour; one labelled final hours ago is not read at all, so a
//! cluster's history does not delay the first send.

use crate::common::*;
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use defender_offboard::operator::cache::final_label::{FINAL_HOUR_LABEL, FINAL_LABEL, final_hour};
use defender_offboard::playground::embedded_controller_with;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::time::Duration;

/// The reason in the resource's Ready condition, once it has one.
fn ready_reason(obj: &DeviceOffboard) -> Option<String> {
    let status = obj.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(ready.reason.clone())
}

/// Three resources sent 30 s ago and finished, labelled as `labels` says;
/// then a process whose budget allows 3 sends a minute starts, and one new
/// resource is applied. Whether it waits for the budget (the three were
/// counted) or is sent (they were not read).
async fn new_resource_waits(labels: BTreeMap<String, String>) -> bool {
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let machines = windows_machines(&crate::common::client(&sim, FAST_LIMITS), 4).await;
    let offboards: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let sent = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(30);
    for (i, machine) in machines[..3].iter().enumerate() {
        let name = format!("past-{i}");
        let mut obj = DeviceOffboard::new(&name, retired(machine));
        obj.metadata.labels = Some(labels.clone());
        let status = DeviceOffboardStatus {
            phase: Some(Phase::Succeeded),
            machine_action_id: Some(format!("00000000-0000-4000-8000-00000000000{i}")),
            submitted_at: Some(Time(sent)),
            completed_at: Some(Time(sent)),
            ..Default::default()
        };
        create_with_status(&offboards, &obj, &status).await;
    }
    let controller = embedded_controller_with(
        client.clone(),
        &sim,
        "3/60s,1500/3600s".parse().unwrap(),
        fast_settings(),
        Duration::from_millis(300),
        |_| {},
    )
    .unwrap();
    let controller = tokio::spawn(controller);
    offboards
        .create(
            &PostParams::default(),
            &DeviceOffboard::new("new", retired(&machines[3])),
        )
        .await
        .unwrap();
    let waits = with_timeout(60, async {
        loop {
            let obj = offboards.get("new").await.unwrap();
            if obj
                .status
                .as_ref()
                .is_some_and(|s| s.machine_action_id.is_some())
            {
                break false;
            }
            if ready_reason(&obj).as_deref() == Some("WaitingForBudget") {
                break true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    controller.abort();
    let posts = sim
        .stats()
        .offboard_requests_by_machine
        .get(&machines[3])
        .copied();
    assert_eq!(posts, (!waits).then_some(1), "the POSTs say the same");
    waits
}

/// The rule, as a table: which past sends are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_seed_reads_the_window_and_not_the_history() {
    let label = |hour: Option<String>| {
        let mut labels = BTreeMap::from([(FINAL_LABEL.to_string(), "true".to_string())]);
        if let Some(hour) = hour {
            labels.insert(FINAL_HOUR_LABEL.into(), hour);
        }
        labels
    };
    let now = jiff::Timestamp::now();
    let cases = [
        (
            "labelled final this hour",
            label(Some(final_hour(now))),
            true,
        ),
        ("labelled by a version without the hour", label(None), true),
        ("not labelled final", BTreeMap::new(), true),
        // Its send time is recent on purpose: it is left out because its
        // label says it cannot hold one, not because of its age.
        (
            "labelled final five hours ago",
            label(Some(final_hour(now - jiff::SignedDuration::from_hours(5)))),
            false,
        ),
    ];
    for (case, labels, counted) in cases {
        assert_eq!(new_resource_waits(labels).await, counted, "{case}");
    }
}
