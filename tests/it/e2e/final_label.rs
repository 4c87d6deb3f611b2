//! `kubectl get -o yaml` of a Failed resource, renamed and applied again (as
//! its Failed message advises: "create a new DeviceOffboard"): the copy
//! carries `defender.offboard.dev/final: "true"`, the API server drops its
//! status, and the resource must still be offboarded and end final.

use super::apply;
use super::support::*;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use std::time::Duration;

/// A finished resource's manifest as `kubectl get -o yaml` prints it, minus
/// the server-set identity (uid, resourceVersion), renamed to `name`.
fn copied_manifest(name: &str, machine_id: &str) -> String {
    format!(
        r#"apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata:
  name: {name}
  labels:
    defender.offboard.dev/final: "true"
spec:
  machineId: {machine_id}
  comment: "retired again, from a copy of a Failed resource"
status:
  phase: Failed
  machineId: {machine_id}
  actionStatus: Failed
  attempts: 1
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_of_a_resource_carrying_the_final_label_reaches_a_final_phase() {
    bounded(120, async {
        let cluster = Cluster::start(&[]).await;
        let Some(sim_url) = cluster.sim_url.clone() else {
            eprintln!(
                "NOTICE: no DEFENDER_OFFBOARD_E2E_SIMULATOR_URL; skipping the final-label test"
            );
            return;
        };
        let sim = Sim::new(&sim_url);
        let kubectl = have_kubectl().await;
        let ids = sim.windows_machine_ids().await;
        let (before, after) = ("copied-before-start", "copied-while-running");
        if cluster.is_real() && kubectl {
            cluster
                .kubectl_ok(
                    &[
                        "delete",
                        "deviceoffboard",
                        before,
                        after,
                        "--ignore-not-found",
                        "--wait",
                    ],
                    None,
                )
                .await;
        }
        // One copy already there when the controller starts (its first list),
        // one applied while it runs (a watch event).
        apply(&cluster, kubectl, &copied_manifest(before, &ids[0]))
            .await
            .unwrap_or_else(|e| panic!("applying {before}: {e}"));
        let mut run = (!cluster.is_real()).then(|| cluster.spawn_run("run", &[]));
        if let Some(run) = run.as_mut() {
            run.wait_for_log("serving /metrics", Duration::from_secs(20))
                .await;
        }
        let out = apply(&cluster, kubectl, &copied_manifest(after, &ids[1]))
            .await
            .unwrap_or_else(|e| panic!("applying {after}: {e}"));
        assert!(out.contains(after), "{out}");

        let names = [before.to_string(), after.to_string()];
        let all = cluster.wait_final(&names, Duration::from_secs(60)).await;
        let stats = sim.stats().await;
        let posts = posts_by_key(&stats);
        for (name, d) in &all {
            assert!(
                d.status
                    .as_ref()
                    .and_then(|s| s.machine_action_id.as_ref())
                    .is_some(),
                "{name} ended final without an offboard of its own: {:?}",
                d.status
            );
            let uid = d.metadata.uid.as_deref().unwrap_or_default();
            assert_eq!(posts.get(uid), Some(&1), "{name}: POSTs per key {posts:?}");
            if kubectl {
                let shown = cluster
                    .kubectl_ok(
                        &[
                            "get",
                            "deviceoffboard",
                            name,
                            "-o",
                            "jsonpath={.status.phase}",
                        ],
                        None,
                    )
                    .await;
                assert!(
                    shown == "Succeeded" || shown == "Failed",
                    "kubectl shows {name} as {shown:?}"
                );
            }
        }
        // A person can read why the label went.
        let events: Api<Event> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let told: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("FinalLabelRemoved"))
            .filter_map(|e| e.regarding.and_then(|r| r.name))
            .collect();
        for name in &names {
            assert!(
                told.contains(name),
                "no FinalLabelRemoved Event for {name}: {told:?}"
            );
        }
    })
    .await;
}
