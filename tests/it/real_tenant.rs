//! A real tenant's inventory: every named device has a stale twin (Inactive,
//! last seen 30–170 days ago) or a discovered one (never onboarded) under its
//! name. By-name resources offboard the live device; the twins get no POST,
//! counted at the simulator per machine id. A name shared by two live
//! records is refused, listing both.

use crate::common::*;
use defender_offboard::crd::{DeviceOffboard, DeviceOffboardSpec, Phase};
use defender_offboard::playground::embedded_controller_with;
use defender_offboard::simulator::SimConfig;
use kube::api::{Api, PostParams};
use std::time::Duration;

/// (resource, computerDnsName, the live record's id)
const LIVE: [(&str, &str, &str); 4] = [
    (
        "finance",
        "finance-laptop-07.contoso.com",
        "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
    ),
    (
        "hr",
        "hr-desktop-12.contoso.com",
        "1b2c3d4e5f60718293a4b5c6d7e8f9012345678a",
    ),
    (
        "file",
        "ws2019-file-01.contoso.com",
        "2c3d4e5f60718293a4b5c6d7e8f9012345678ab1",
    ),
    // A dotless name finds its FQDN record.
    (
        "hr-short",
        "hr-desktop-12",
        "1b2c3d4e5f60718293a4b5c6d7e8f9012345678a",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_name_resources_offboard_the_live_device_beside_stale_and_discovered_twins() {
    let sim = spawn_sim(SimConfig {
        real_tenant: true,
        ..fast_sim_config()
    })
    .await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let controller = tokio::spawn(
        embedded_controller_with(
            client.clone(),
            &sim,
            FAST_LIMITS.parse().unwrap(),
            fast_settings(),
            Duration::from_millis(200),
            |_| {},
        )
        .unwrap(),
    );
    let records: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let names: Vec<(&str, &str)> = LIVE
        .iter()
        .map(|(n, d, _)| (*n, *d))
        .chain([("shared", "shared-kiosk-02.contoso.com")])
        .collect();
    for (name, device) in &names {
        let spec: DeviceOffboardSpec = serde_json::from_value(serde_json::json!({
            "deviceName": device, "comment": "decommissioned",
        }))
        .unwrap();
        records
            .create(&PostParams::default(), &DeviceOffboard::new(name, spec))
            .await
            .unwrap();
    }
    let finals = with_timeout(60, async {
        loop {
            let mut done = Vec::new();
            for (name, _) in &names {
                let d = records.get(name).await.unwrap();
                if d.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_terminal)
                    || d.status
                        .as_ref()
                        .is_some_and(|s| s.machine_action_id.is_some())
                {
                    done.push(d);
                }
            }
            if done.len() == names.len() {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    controller.abort();
    let inventory = sim.machines();
    let stats = sim.stats();
    for (name, device, live) in LIVE {
        let d = finals
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap();
        let status = d.status.as_ref().unwrap();
        assert_eq!(
            status.machine_id.as_deref(),
            Some(live),
            "{name}: {status:?}"
        );
        let why = status.resolution.clone().unwrap_or_default();
        assert!(why.contains("skipped"), "{name}: the twin is named: {why}");
        assert_eq!(
            stats.offboard_requests_by_machine.get(live),
            Some(&1),
            "{name}"
        );
        // Every other record of the name: no POST.
        let host = device.split('.').next().unwrap();
        let twins: Vec<&str> = inventory
            .iter()
            .filter(|m| {
                m["computerDnsName"]
                    .as_str()
                    .is_some_and(|n| n.split('.').next() == Some(host))
            })
            .filter_map(|m| m["id"].as_str())
            .filter(|id| *id != live)
            .collect();
        assert!(!twins.is_empty(), "{name}: the real tenant has a twin");
        for twin in twins {
            assert_eq!(
                stats.offboard_requests_by_machine.get(twin),
                None,
                "{name}: twin {twin}"
            );
        }
    }
    let shared = finals
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("shared"))
        .unwrap();
    let error = shared.status.as_ref().unwrap().last_error.clone().unwrap();
    assert_eq!(error.code, "DeviceAmbiguous");
    for id in [
        "fe00000000000000000000000000000000000201",
        "fe00000000000000000000000000000000000202",
    ] {
        assert!(error.message.contains(id), "{}", error.message);
        assert_eq!(stats.offboard_requests_by_machine.get(id), None);
    }
    println!(
        "real tenant: {} records, POSTs by machine {:?}",
        inventory.len(),
        stats.offboard_requests_by_machine
    );
}

/// MDE refuses `in` in a machine-action `$filter` (it is documented for no
/// property there): the batch poll falls back to `id eq … or …` and the
/// resource still finishes, with one POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_finishes_when_mde_refuses_in() {
    let mut config = fast_sim_config();
    config.faults.refuse_in = true;
    let sim = spawn_sim(config).await;
    let api = spawn_api().await;
    let client = api.client().await.unwrap();
    let controller = tokio::spawn(
        embedded_controller_with(
            client.clone(),
            &sim,
            FAST_LIMITS.parse().unwrap(),
            fast_settings(),
            Duration::from_millis(200),
            |_| {},
        )
        .unwrap(),
    );
    let records: Api<DeviceOffboard> = Api::namespaced(client.clone(), "default");
    let machine = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
    let spec: DeviceOffboardSpec = serde_json::from_value(serde_json::json!({
        "machineId": machine, "comment": "returned",
    }))
    .unwrap();
    records
        .create(&PostParams::default(), &DeviceOffboard::new("laptop", spec))
        .await
        .unwrap();
    let status = with_timeout(60, async {
        loop {
            let status = records
                .get("laptop")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if status.phase.is_some_and(Phase::is_terminal) {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    controller.abort();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(status.action_status.as_deref(), Some("Succeeded"));
    assert_eq!(
        sim.stats().offboard_requests_by_machine.get(machine),
        Some(&1)
    );
}
