//! A start beside a long history: the operator serves a new resource before
//! it has read the finished ones. The reads of the history (the stray-label
//! watch's list of everything labelled final, the TTL sweep's list of
//! everything) are held at the API server for as long as the test likes; a
//! new resource applied at start must be sent meanwhile, once.

use crate::common::*;
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use defender_offboard::operator::cache::final_label::{
    FINAL_HOUR_LABEL, FINAL_LABEL, LABELLED_SELECTOR, final_hour,
};
use defender_offboard::playground::embedded_controller_with;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::time::Duration;

/// `count` resources finished a day ago, labelled as the operator labels them.
async fn seed_finished(offboards: &Api<DeviceOffboard>, count: usize) {
    let day_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24);
    for i in 0..count {
        let name = format!("history-{i}");
        let mut obj = DeviceOffboard::new(&name, retired(&format!("{i:040x}")));
        obj.metadata.labels = Some(BTreeMap::from([
            (FINAL_LABEL.to_string(), "true".to_string()),
            (FINAL_HOUR_LABEL.to_string(), final_hour(day_ago)),
        ]));
        let status = DeviceOffboardStatus {
            phase: Some(Phase::Succeeded),
            machine_action_id: Some(uuid::Uuid::new_v4().to_string()),
            ..Default::default()
        };
        create_with_status(offboards, &obj, &status).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_resource_is_sent_while_the_history_is_still_being_read() {
    let sim = spawn_sim(fast_sim_config()).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let machine = windows_machines(&crate::common::client(&sim, FAST_LIMITS), 1)
        .await
        .remove(0);
    let offboards: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    seed_finished(&offboards, 150).await;
    // Every read of the finished history waits until the test says.
    api.hold_lists("deviceoffboards", LABELLED_SELECTOR);
    api.hold_lists("deviceoffboards", "");
    let controller = embedded_controller_with(
        client.clone(),
        &sim,
        FAST_LIMITS.parse().unwrap(),
        fast_settings(),
        Duration::from_millis(300),
        |run| run.ttl_sweep_interval = Duration::from_millis(100),
    )
    .unwrap();
    let controller = tokio::spawn(controller);
    offboards
        .create(
            &PostParams::default(),
            &DeviceOffboard::new("new", retired(&machine)),
        )
        .await
        .unwrap();
    let posts = || {
        sim.stats()
            .offboard_requests_by_machine
            .get(&machine)
            .copied()
            .unwrap_or_default()
    };
    with_timeout(30, async {
        while posts() == 0 || api.lists_held() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(posts(), 1, "sent once, with the history unread");
    assert!(
        api.lists_held() >= 2,
        "the stray-label watch and the TTL sweep asked for the history and wait"
    );
    // Once the history answers, the new resource ends as it would have.
    api.release_lists();
    with_timeout(60, async {
        loop {
            let obj = offboards.get("new").await.unwrap();
            if obj
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_terminal)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(posts(), 1, "still one POST after the history was read");
    controller.abort();
}
