//! The controller's watch expires mid-run (the `dev` API keeps a short history
//! and compacts it, as etcd does on a cluster): kube-runtime's watcher lists
//! again, and every resource still ends with one offboard POST.

use super::create_burst;
use super::support::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_and_every_resource_is_sent_once() {
    if real_cluster() {
        eprintln!(
            "NOTICE: an_expired_watch_relists_and_every_resource_is_sent_once compacts the dev API; skipped on a real cluster"
        );
        return;
    }
    bounded(150, async {
        let cluster = Cluster::start(&[
            "--sim-machines",
            "120",
            "--sim-time-scale",
            "10",
            "--watch-history",
            "32",
        ])
        .await;
        let sim = Sim::new(cluster.sim_url.as_deref().unwrap());
        let n = 80;
        let names = create_burst(&cluster, &sim, "relist", n).await;
        let _run = cluster.spawn_run(
            "run",
            &["--rate-limit", "100/6s,1500/360s", "--concurrency", "8"],
        );
        // Compact while the work is in flight, until it is done.
        let mut compactions = 0;
        let mut final_at_compaction = Vec::new();
        loop {
            let done = cluster.list().await.iter().filter(|d| is_final(d)).count();
            if done == n {
                break;
            }
            assert!(compactions < 400, "no progress: {final_at_compaction:?}");
            cluster.compact_watches().await;
            compactions += 1;
            final_at_compaction.push(done);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let all = cluster.wait_final(&names, Duration::from_secs(60)).await;
        let expired = cluster.expired_watches().await;
        let stats = sim.stats().await;
        let posts = posts_by_key(&stats);
        println!(
            "relist test: {} resources, {compactions} compactions (final at each: {final_at_compaction:?}), \
             {expired} watches expired, actions created {}, duplicates {}",
            all.len(),
            count(&stats, "actions_created"),
            count(&stats, "duplicate_offboards"),
        );
        assert!(
            final_at_compaction.iter().any(|f| *f < n) && expired > 0,
            "no watch expired while work was in flight: {final_at_compaction:?}, {expired} expired"
        );
        for (name, d) in &all {
            let uid = d.metadata.uid.as_deref().unwrap();
            assert_eq!(posts.get(uid), Some(&1), "{name}: POSTs per key {posts:?}");
            assert!(
                d.status.as_ref().and_then(|s| s.machine_action_id.as_ref()).is_some(),
                "{name} ended without an action: {:?}",
                d.status
            );
        }
        assert_eq!(count(&stats, "duplicate_offboards"), 0, "{stats}");
        assert_eq!(count(&stats, "actions_created"), n as u64, "{stats}");
    })
    .await;
}
