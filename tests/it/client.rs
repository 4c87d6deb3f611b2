//! The MDE client against the simulator, over loopback.

use crate::common::*;
use defender_offboard::mde::{
    ActionStatus, DefenderClient, ErrorClass, MdeError, correlation_marker,
};
use defender_offboard::metrics::Metrics;
use defender_offboard::simulator::{EXAMPLE_MACHINES, SimConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const FINANCE_LAPTOP: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const LINUX_AGENT: &str = "3d4e5f60718293a4b5c6d7e8f9012345678ab1c2";

#[tokio::test]
async fn offboard_happy_path_reaches_succeeded() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    with_timeout(20, async {
        let machine = client.get_machine(FINANCE_LAPTOP).await.unwrap();
        assert_eq!(
            machine.computer_dns_name.as_deref(),
            Some("finance-laptop-07.contoso.com")
        );
        let action = client
            .offboard(FINANCE_LAPTOP, "returned laptop [defender-offboard:k1]")
            .await
            .unwrap();
        assert_eq!(action.action_type, "Offboard");
        assert_eq!(action.status, ActionStatus::Pending);
        assert_eq!(action.machine_id.as_deref(), Some(FINANCE_LAPTOP));
        loop {
            let fresh = client.get_machine_action(&action.id).await.unwrap();
            if fresh.status.is_final() {
                assert_eq!(fresh.status, ActionStatus::Succeeded);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(sim.stats().duplicate_offboards, 0);
}

#[tokio::test]
async fn device_names_resolve_and_reimaged_devices_show_several() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    let one = client
        .find_machines_by_name("finance-laptop-07.contoso.com")
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    let two = client
        .find_machines_by_name("kiosk-lobby-01.contoso.com")
        .await
        .unwrap();
    assert_eq!(two.len(), 2);
    assert!(
        client
            .find_machines_by_name("nope.contoso.com")
            .await
            .unwrap()
            .is_empty()
    );
}

/// After a 429 the family is parked: the next call is not sent before Retry-After.
#[tokio::test]
async fn throttling_honours_retry_after() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    client.check_sign_in().await.unwrap();
    control(
        &sim,
        "throttle",
        json!({"family": "offboard", "seconds": 2.0}),
    )
    .await;
    let started = Instant::now();
    let error = client.offboard(FINANCE_LAPTOP, "x").await.unwrap_err();
    let MdeError::Throttled { retry_at, .. } = &error else {
        panic!("expected Throttled, got {error:?}")
    };
    assert_eq!(error.class(), ErrorClass::Throttled);
    assert!(*retry_at > jiff::Timestamp::now());
    let action = with_timeout(10, client.offboard(FINANCE_LAPTOP, "x"))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "second call went early: {:?}",
        started.elapsed()
    );
    assert_eq!(action.status, ActionStatus::Pending);
    let stats = sim.stats();
    assert_eq!(
        stats.throttled, 1,
        "exactly one 429: nothing was sent while parked"
    );
    assert_eq!(stats.count("offboard", "201"), 1);
}

#[tokio::test]
async fn tokens_are_refreshed_before_expiry_and_after_a_401() {
    let sim = spawn_sim(SimConfig {
        token_lifetime: Duration::from_secs(120),
        ..fast_sim_config()
    })
    .await;
    let client = client(&sim, FAST_LIMITS);
    // 120 simulated seconds = 2 s (refreshed 0.2 s early): calls across 5 s
    // need fresh tokens, without any 401.
    for _ in 0..10 {
        client.get_machine(FINANCE_LAPTOP).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stats = sim.stats();
    assert!(
        stats.tokens_issued >= 3,
        "tokens issued: {}",
        stats.tokens_issued
    );
    assert_eq!(
        stats.count("machines", "401"),
        0,
        "refresh happens before expiry"
    );

    // Revoked server-side: one 401, a new token, success.
    control(&sim, "revoke-tokens", json!({})).await;
    client.get_machine(FINANCE_LAPTOP).await.unwrap();
    assert_eq!(sim.stats().count("machines", "401"), 1);
}

/// The login host down for a while (tokens revoked, so a sign-in is needed):
/// the call fails as transient, nothing is sent, the message does not send
/// the user to check credentials that are fine, and the next call after the
/// outage signs in and works.
#[tokio::test]
async fn a_login_outage_is_transient_and_sends_nothing() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    client.get_machine(FINANCE_LAPTOP).await.unwrap();
    control(&sim, "revoke-tokens", json!({})).await;
    control(&sim, "token-outage", json!({"seconds": 1.0})).await;
    let error = client
        .offboard(FINANCE_LAPTOP, "[defender-offboard:outage] retired")
        .await
        .unwrap_err();
    assert!(matches!(error, MdeError::NotSent { .. }), "{error:?}");
    assert!(
        !error.may_have_created(),
        "refused before anything was sent"
    );
    let message = error.to_string();
    assert!(message.contains("temporarily_unavailable"), "{message}");
    assert!(!message.contains("check AZURE_TENANT_ID"), "{message}");
    assert_eq!(sim.stats().count("offboard", "201"), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client
        .offboard(FINANCE_LAPTOP, "[defender-offboard:outage] retired")
        .await
        .unwrap();
    assert_eq!(sim.stats().count("offboard", "201"), 1);
}

#[tokio::test]
async fn concurrent_callers_share_one_token_request() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    let calls: Vec<_> = (0..20)
        .map(|_| client.get_machine(FINANCE_LAPTOP))
        .collect();
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    assert_eq!(sim.stats().tokens_issued, 1);
}

#[tokio::test]
async fn every_error_class_is_classified() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);

    let not_found = client.offboard(&"f".repeat(40), "x").await.unwrap_err();
    assert!(
        matches!(not_found, MdeError::NotFound { .. }),
        "{not_found:?}"
    );
    assert_eq!(not_found.class(), ErrorClass::Permanent);

    let linux = client.offboard(LINUX_AGENT, "x").await.unwrap_err();
    assert!(
        matches!(linux, MdeError::PlatformNotSupported { .. }),
        "{linux:?}"
    );

    let empty_comment = client.offboard(FINANCE_LAPTOP, "").await.unwrap_err();
    assert!(
        matches!(&empty_comment, MdeError::BadRequest { status: 400, .. }),
        "{empty_comment:?}"
    );

    client.offboard(FINANCE_LAPTOP, "first").await.unwrap();
    let pending = client.offboard(FINANCE_LAPTOP, "second").await.unwrap_err();
    assert!(
        matches!(pending, MdeError::AlreadyPending { .. }),
        "{pending:?}"
    );
    assert_eq!(pending.class(), ErrorClass::AlreadyPending);
    let adopted = client
        .find_pending_offboard(FINANCE_LAPTOP)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(adopted.requestor_comment.as_deref(), Some("first"));

    control(&sim, "roles", json!({"roles": ["Machine.Read.All"]})).await;
    control(&sim, "revoke-tokens", json!({})).await;
    let forbidden = client
        .offboard(EXAMPLE_MACHINES[1].id, "x")
        .await
        .unwrap_err();
    assert!(
        matches!(forbidden, MdeError::Forbidden { .. }),
        "{forbidden:?}"
    );
    assert_eq!(forbidden.class(), ErrorClass::Access);
    control(
        &sim,
        "roles",
        json!({"roles": ["Machine.Read.All", "Machine.Offboard"]}),
    )
    .await;

    control(&sim, "faults", json!({"error_rate": 1.0})).await;
    let read_5xx = client.get_machine(FINANCE_LAPTOP).await.unwrap_err();
    assert!(
        matches!(read_5xx, MdeError::Unavailable { .. }),
        "{read_5xx:?}"
    );
    assert_eq!(read_5xx.class(), ErrorClass::Transient);
    let write_5xx = client
        .offboard(EXAMPLE_MACHINES[1].id, "x")
        .await
        .unwrap_err();
    assert!(
        matches!(write_5xx, MdeError::OutcomeUnknown { .. }),
        "a 5xx on offboard is ambiguous: {write_5xx:?}"
    );
    control(&sim, "faults", json!({"error_rate": 0.0})).await;

    let wrong_secret = DefenderClient::new(
        client_config(&sim, "not-the-secret", FAST_LIMITS),
        Arc::new(Metrics::default()),
    )
    .unwrap()
    .check_sign_in()
    .await
    .unwrap_err();
    assert!(
        matches!(wrong_secret, MdeError::SignIn { .. }),
        "{wrong_secret:?}"
    );
    assert!(
        !wrong_secret.to_string().contains("not-the-secret"),
        "the secret never appears in errors"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut config = client_config(&sim, "sim-secret", FAST_LIMITS);
    config.endpoints = defender_offboard::mde::Endpoints::new(
        defender_offboard::mde::Cloud::Commercial,
        Some(&closed),
        Some(&sim.base_url()),
    )
    .unwrap();
    let unreachable = DefenderClient::new(config, Arc::new(Metrics::default()))
        .unwrap()
        .offboard(FINANCE_LAPTOP, "x")
        .await
        .unwrap_err();
    assert!(
        matches!(unreachable, MdeError::NotSent { .. }),
        "{unreachable:?}"
    );
    assert_eq!(unreachable.class(), ErrorClass::Transient);
}

/// The action is created but the answer is lost: the client says "outcome
/// unknown", and the lookup by marker finds the action.
#[tokio::test]
async fn lost_responses_are_outcome_unknown_and_found_by_lookup() {
    for mode in ["drop", "504"] {
        let sim = spawn_sim(fast_sim_config()).await;
        let client = client(&sim, FAST_LIMITS);
        client.check_sign_in().await.unwrap();
        control(
            &sim,
            "faults",
            json!({"lost_response_rate": 1.0, "lost_response_mode": mode}),
        )
        .await;
        let marker = correlation_marker("uid-1");
        let error = client
            .offboard(FINANCE_LAPTOP, &format!("{marker} retired"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, MdeError::OutcomeUnknown { .. }),
            "{mode}: {error:?}"
        );
        assert!(error.may_have_created(), "{mode}: {error:?}");
        control(&sim, "faults", json!({"lost_response_rate": 0.0})).await;
        let found = client
            .find_offboard_action(FINANCE_LAPTOP, &marker)
            .await
            .unwrap();
        assert!(
            found.is_some(),
            "{mode}: the created action is found by its marker"
        );
        assert!(
            client
                .find_offboard_action(FINANCE_LAPTOP, &correlation_marker("other"))
                .await
                .unwrap()
                .is_none()
        );
        let stats = sim.stats();
        assert_eq!(
            (stats.lost_responses, stats.duplicate_offboards),
            (1, 0),
            "{mode}"
        );
    }
}

#[tokio::test]
async fn lists_follow_next_link_across_pages() {
    let sim = spawn_sim(SimConfig {
        page_size: 5,
        ..fast_sim_config()
    })
    .await;
    let client = client(&sim, FAST_LIMITS);
    let machines = windows_machines(&client, 12).await;
    for id in &machines {
        client.offboard(id, "paging").await.unwrap();
    }
    let actions = client
        .list_machine_actions("type eq 'Offboard'")
        .await
        .unwrap();
    assert_eq!(actions.len(), 12);
    let by_ids = client
        .machine_actions_by_ids(&actions.iter().map(|a| a.id.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(by_ids.len(), 12);
    assert!(
        sim.stats().count("machineactions", "200") >= 6,
        "several pages were read"
    );
}

#[tokio::test]
async fn the_offboard_window_reads_every_action_in_pages_of_top_in_one_call_each() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    let machines = windows_machines(&client, 5).await;
    let since = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    let mut created = Vec::new();
    for id in &machines {
        created.push(client.offboard(id, "window").await.unwrap().id);
    }
    let before = count_reads(&sim);
    let mut found: Vec<String> = client
        .offboard_actions_since(since, 10_000, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(count_reads(&sim) - before, 1, "five in flight: one call");
    found.sort();
    created.sort();
    assert_eq!(found, created);
    // Pages of 2: a short third page ends it, without a nextLink to follow.
    let before = count_reads(&sim);
    let paged = client.offboard_actions_since(since, 2, &[]).await.unwrap();
    assert_eq!((paged.len(), count_reads(&sim) - before), (5, 3));
    // A full page holding every id looked for ends it: no empty page after.
    let before = count_reads(&sim);
    let full = client
        .offboard_actions_since(since, 5, &created)
        .await
        .unwrap();
    assert_eq!((full.len(), count_reads(&sim) - before), (5, 1));
    let before = count_reads(&sim);
    client.offboard_actions_since(since, 5, &[]).await.unwrap();
    assert_eq!(
        count_reads(&sim) - before,
        2,
        "nothing looked for: the next page"
    );
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    assert!(
        client
            .offboard_actions_since(later, 10_000, &[])
            .await
            .unwrap()
            .is_empty()
    );
}

fn count_reads(sim: &defender_offboard::simulator::SimHandle) -> u64 {
    sim.stats().count("machineactions", "200")
}

/// 300 offboards as fast as the client allows, against MDE's limits counted in
/// sliding windows (time-scaled ×60): not one 429, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_300_offboards_gets_no_429() {
    let sim = spawn_sim(SimConfig {
        machines: 400,
        ..fast_sim_config()
    })
    .await;
    let client = client(&sim, FAST_LIMITS);
    let machines = windows_machines(&client, 300).await;
    let started = Instant::now();
    let sends: Vec<_> = machines
        .iter()
        .map(|id| {
            let client = client.clone();
            let id = id.clone();
            tokio::spawn(async move { client.offboard(&id, "burst").await })
        })
        .collect();
    let mut created = 0;
    for send in sends {
        with_timeout(30, send).await.unwrap().unwrap();
        created += 1;
    }
    let stats = sim.stats();
    println!(
        "burst: {created} offboards in {:.2}s, 429s {}, duplicates {}",
        started.elapsed().as_secs_f64(),
        stats.throttled,
        stats.duplicate_offboards
    );
    assert_eq!(created, 300);
    assert_eq!(stats.throttled, 0);
    assert_eq!(stats.count("offboard", "201"), 300);
    assert_eq!(stats.duplicate_offboards, 0);
    assert_eq!(
        stats.offboard_requests_by_machine.values().max(),
        Some(&1),
        "one POST per machine, counted at MDE"
    );
}

/// `Retry-After` as MDE may send it: an HTTP date, missing, or absurd. Each is
/// read to a bounded instant: never a panic, never a wait of days.
#[tokio::test]
async fn retry_after_in_every_form_is_honoured_within_bounds() {
    for (mode, at_least, at_most) in [
        ("http-date", 1, 4),
        ("missing", 59, 61),
        ("huge", 3599, 3601),
    ] {
        let sim = spawn_sim(fast_sim_config()).await;
        let client = client(&sim, FAST_LIMITS);
        client.check_sign_in().await.unwrap();
        control(&sim, "faults", json!({"retry_after": mode})).await;
        control(
            &sim,
            "throttle",
            json!({"family": "machineactions", "seconds": 2.0}),
        )
        .await;
        let error = client.offboard_actions(FINANCE_LAPTOP).await.unwrap_err();
        let MdeError::Throttled { retry_at, .. } = error else {
            panic!("{mode}: expected Throttled, got {error:?}")
        };
        let wait = retry_at
            .duration_since(jiff::Timestamp::now())
            .as_secs_f64();
        assert!(
            (at_least as f64..=at_most as f64).contains(&wait),
            "{mode}: waits {wait} s"
        );
    }
}

/// A controller's client never waits for its own budget: a call with no slot
/// answers at once, and nothing is sent.
#[tokio::test]
async fn a_refusing_budget_answers_at_once() {
    let sim = spawn_sim(fast_sim_config()).await;
    let config = defender_offboard::mde::ClientConfig {
        budget_wait: defender_offboard::mde::BudgetWait::Refuse,
        ..client_config(&sim, "sim-secret", "1/10s")
    };
    let client = DefenderClient::new(config, Arc::new(Metrics::default())).unwrap();
    client.offboard_actions(FINANCE_LAPTOP).await.unwrap();
    let started = Instant::now();
    let error = client.offboard_actions(FINANCE_LAPTOP).await.unwrap_err();
    assert!(matches!(error, MdeError::BudgetSpent { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        sim.stats().count("machineactions", "200"),
        1,
        "nothing sent"
    );
}

/// An id from an edited status cannot steer a request to another path: a
/// `..`, `/` or `?` in an action or machine id is refused before anything
/// is sent (a traversal could otherwise turn a cancel into an offboard).
#[tokio::test]
async fn ids_that_are_not_ids_are_refused_before_sending() {
    let sim = spawn_sim(fast_sim_config()).await;
    let client = client(&sim, FAST_LIMITS);
    let traversal = format!("../machines/{FINANCE_LAPTOP}/offboard");
    for error in [
        client.get_machine_action(&traversal).await.unwrap_err(),
        client
            .cancel_action(None, &traversal, "[defender-offboard:k] stop")
            .await
            .unwrap_err(),
        client
            .offboard(
                &format!("{FINANCE_LAPTOP}?x=1"),
                "[defender-offboard:k] retired",
            )
            .await
            .unwrap_err(),
        client.get_machine("a/b").await.unwrap_err(),
    ] {
        assert_eq!(error.code(), "InvalidId", "{error}");
        assert!(!error.may_have_created());
    }
    let stats = sim.stats();
    assert_eq!(stats.offboard_requests_by_key.len(), 0, "{stats:?}");
    assert_eq!(stats.actions_created, 0);
}

/// A client whose MDE API is a loopback server answering every request with
/// `page` (sign-in still goes to the simulator).
async fn client_of_one_page(
    sim: &defender_offboard::simulator::SimHandle,
    page: serde_json::Value,
) -> DefenderClient {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = page.to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                // The client sends only GETs here: the head is the whole request.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let mut config = client_config(sim, "sim-secret", FAST_LIMITS);
    config.endpoints.api = format!("http://{addr}/").parse().unwrap();
    DefenderClient::new(config, Arc::new(Metrics::default())).unwrap()
}

fn listed_action(id: &str, status: serde_json::Value, comment: &str) -> serde_json::Value {
    json!({
        "id": id, "type": "Offboard", "status": status, "machineId": FINANCE_LAPTOP,
        "requestorComment": comment, "creationDateTimeUtc": "2026-01-05T10:00:00Z"
    })
}

#[tokio::test]
async fn a_page_with_a_null_status_among_good_ones_is_read_whole() {
    let sim = spawn_sim(fast_sim_config()).await;
    let page = json!({"value": [
        listed_action("a1", json!("Pending"), "one"),
        listed_action("a2", json!(null), "two"),
        listed_action("a3", json!("Succeeded"), "three"),
    ]});
    let client = client_of_one_page(&sim, page).await;
    with_timeout(20, async {
        let since = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
        let window = client.offboard_actions_since(since, 10, &[]).await.unwrap();
        let statuses: Vec<(&str, bool)> = window
            .iter()
            .map(|a| (a.status.as_str(), a.status.is_final()))
            .collect();
        // The null status is an unknown one: not final, so the action is polled on.
        assert_eq!(
            statuses,
            [("Pending", false), ("null", false), ("Succeeded", true)]
        );
        assert_eq!(
            client.offboard_actions(FINANCE_LAPTOP).await.unwrap().len(),
            3
        );
        let ids = ["a1", "a2", "a3"].map(String::from);
        assert_eq!(client.machine_actions_by_ids(&ids).await.unwrap().len(), 3);
        let pending = client.find_pending_offboard(FINANCE_LAPTOP).await.unwrap();
        assert_eq!(pending.map(|a| a.id), Some("a2".to_string()));
    })
    .await;
}

#[tokio::test]
async fn an_unreadable_action_is_skipped_but_never_proves_absence() {
    let sim = spawn_sim(fast_sim_config()).await;
    let marker = correlation_marker("k1");
    let page = json!({"value": [
        listed_action("a1", json!("Pending"), &format!("{marker} retired")),
        // No id: nothing can be done with it, but it may be anyone's action.
        {"type": "Offboard", "status": "Pending", "machineId": FINANCE_LAPTOP},
        listed_action("a3", json!("Failed"), "three"),
    ]});
    let client = client_of_one_page(&sim, page).await;
    with_timeout(20, async {
        // Where silence proves nothing, the rest of the page is read.
        let ids = ["a1", "a3"].map(String::from);
        let by_ids = client.machine_actions_by_ids(&ids).await.unwrap();
        assert_eq!(
            by_ids.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["a1", "a3"]
        );
        // An action found is found...
        let found = client
            .find_offboard_action(FINANCE_LAPTOP, &marker)
            .await
            .unwrap();
        assert_eq!(found.map(|a| a.id), Some("a1".to_string()));
        // ...but no answer that could show one absent may stand.
        let other = correlation_marker("k2");
        let unproven = client.find_offboard_action(FINANCE_LAPTOP, &other).await;
        assert!(
            matches!(unproven, Err(MdeError::InvalidResponse { .. })),
            "{unproven:?}"
        );
        assert!(client.offboard_actions(FINANCE_LAPTOP).await.is_err());
        let since = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
        assert!(client.offboard_actions_since(since, 10, &[]).await.is_err());
        assert!(client.offboard_actions_page(since, 10, 0).await.is_err());
        assert!(
            client
                .list_machine_actions("type eq 'Offboard'")
                .await
                .is_err()
        );
    })
    .await;
}

/// An answer far larger than any real one, as a loopback server sends it.
#[derive(Clone)]
enum Oversized {
    /// `prefix`, `piece` `repeats` times, `suffix`: chunked, no content-length.
    Chunked {
        prefix: String,
        piece: String,
        repeats: usize,
        suffix: String,
    },
    /// A content-length of `declared`, then 1 MiB of it and a long silence.
    Declared(u64),
}

impl Oversized {
    /// A machine-actions page of about `mib` MiB: valid JSON, so only its size
    /// can make a client refuse it.
    fn page(mib: usize) -> Self {
        let action = listed_action(
            "7a6ab2c7-1f3b-4f5b-a2a4-7fd5e3a7b3c9",
            json!("Succeeded"),
            "retired",
        )
        .to_string();
        let piece = format!("{action},").repeat(64);
        Oversized::Chunked {
            prefix: r#"{"value":["#.into(),
            repeats: mib * 1024 * 1024 / piece.len() + 1,
            piece,
            suffix: format!("{action}]}}"),
        }
    }
}

/// A loopback server answering every request with `answer` (status 200). For
/// each answer it reports whether it was sent whole (`false`: the client hung
/// up first).
async fn serve_oversized(
    answer: Oversized,
) -> (url::Url, tokio::sync::mpsc::UnboundedReceiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sent, reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (answer, sent) = (answer.clone(), sent.clone());
            tokio::spawn(async move {
                // The head, then as many body bytes as it declares (a token
                // request and an offboard carry a body).
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let body_at = loop {
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&request[..body_at]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while request.len() < body_at + length {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let whole = match answer {
                    Oversized::Chunked {
                        prefix,
                        piece,
                        repeats,
                        suffix,
                    } => {
                        async fn chunk(
                            stream: &mut tokio::net::TcpStream,
                            data: &str,
                        ) -> std::io::Result<()> {
                            let framed = format!("{:x}\r\n{data}\r\n", data.len());
                            stream.write_all(framed.as_bytes()).await
                        }
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                        async {
                            stream.write_all(head.as_bytes()).await?;
                            chunk(&mut stream, &prefix).await?;
                            for _ in 0..repeats {
                                chunk(&mut stream, &piece).await?;
                            }
                            chunk(&mut stream, &suffix).await?;
                            stream.write_all(b"0\r\n\r\n").await
                        }
                        .await
                        .is_ok()
                    }
                    Oversized::Declared(declared) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
                        );
                        let sent = async {
                            stream.write_all(head.as_bytes()).await?;
                            stream.write_all(&vec![b' '; 1024 * 1024]).await
                        }
                        .await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        sent.is_ok()
                    }
                };
                let _ = sent.send(whole);
            });
        }
    });
    (format!("http://{addr}/").parse().unwrap(), reports)
}

/// A client whose MDE API is `api` (sign-in still goes to the simulator).
fn client_of_api(sim: &defender_offboard::simulator::SimHandle, api: url::Url) -> DefenderClient {
    let mut config = client_config(sim, "sim-secret", FAST_LIMITS);
    config.endpoints.api = api;
    DefenderClient::new(config, Arc::new(Metrics::default())).unwrap()
}

/// A 50 MiB page of machine actions, chunked with no content-length: the
/// client stops reading at its cap, well before the server has sent it all,
/// and says which cap and which path; nothing of the body is in the error.
#[tokio::test]
async fn an_oversized_actions_page_is_refused_while_it_is_still_arriving() {
    let sim = spawn_sim(fast_sim_config()).await;
    let (api, mut reports) = serve_oversized(Oversized::page(50)).await;
    let client = client_of_api(&sim, api);
    let started = Instant::now();
    let error = with_timeout(5, client.list_machine_actions("type eq 'Offboard'"))
        .await
        .unwrap_err();
    let MdeError::InvalidResponse { message } = &error else {
        panic!("expected InvalidResponse, got {error:?}")
    };
    assert!(message.contains("/api/machineactions"), "{message}");
    assert!(message.contains("MiB"), "the cap is named: {message}");
    assert!(!message.contains("7a6ab2c7"), "no body content: {message}");
    assert!(message.len() < 300, "{message}");
    let whole = with_timeout(5, reports.recv()).await;
    assert_eq!(
        whole,
        Some(false),
        "the client hung up before the server finished sending, after {:?}",
        started.elapsed()
    );
}

/// A content-length beyond the cap is refused on the head alone: no wait for
/// a body that is never read.
#[tokio::test]
async fn a_declared_oversized_answer_is_refused_before_its_body() {
    let sim = spawn_sim(fast_sim_config()).await;
    let declared = 1u64 << 40;
    let (api, _reports) = serve_oversized(Oversized::Declared(declared)).await;
    let client = client_of_api(&sim, api);
    client.check_sign_in().await.unwrap();
    let started = Instant::now();
    let error = with_timeout(5, client.list_machine_actions("type eq 'Offboard'"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let MdeError::InvalidResponse { message } = &error else {
        panic!("expected InvalidResponse, got {error:?}")
    };
    assert!(message.contains(&declared.to_string()), "{message}");
    assert!(message.contains("MiB"), "the cap is named: {message}");
}

/// An offboard or cancel answered 2xx with a body too large to read may have
/// created or cancelled the action: outcome unknown, look it up before
/// sending again.
#[tokio::test]
async fn an_oversized_answer_to_a_write_leaves_the_outcome_unknown() {
    let sim = spawn_sim(fast_sim_config()).await;
    for answer in [Oversized::page(50), Oversized::Declared(1 << 40)] {
        let (api, _reports) = serve_oversized(answer).await;
        let client = client_of_api(&sim, api);
        let offboard = with_timeout(5, client.offboard(FINANCE_LAPTOP, "x"))
            .await
            .unwrap_err();
        let cancel = with_timeout(
            5,
            client.cancel_action(None, "7a6ab2c7-1f3b-4f5b-a2a4-7fd5e3a7b3c9", "x"),
        )
        .await
        .unwrap_err();
        for error in [offboard, cancel] {
            assert!(
                matches!(error, MdeError::OutcomeUnknown { .. }),
                "{error:?}"
            );
            assert!(error.may_have_created());
            assert!(error.to_string().contains("MiB"), "{error}");
        }
    }
}

/// The login host's answer is bounded far tighter: a token is a header's worth.
#[tokio::test]
async fn an_oversized_token_answer_is_refused() {
    let sim = spawn_sim(fast_sim_config()).await;
    let token = Oversized::Chunked {
        prefix: r#"{"token_type":"Bearer","expires_in":3600,"access_token":""#.into(),
        piece: "a".repeat(16 * 1024),
        repeats: 128,
        suffix: r#""}"#.into(),
    };
    for answer in [token, Oversized::Declared(2 * 1024 * 1024)] {
        let (login, _reports) = serve_oversized(answer).await;
        let mut config = client_config(&sim, "sim-secret", FAST_LIMITS);
        config.endpoints.authority = login;
        let client = DefenderClient::new(config, Arc::new(Metrics::default())).unwrap();
        let error = with_timeout(5, client.check_sign_in()).await.unwrap_err();
        let MdeError::InvalidResponse { message } = &error else {
            panic!("expected InvalidResponse, got {error:?}")
        };
        assert!(
            message.contains("127.0.0.1"),
            "the host is named: {message}"
        );
        assert!(message.contains("MiB"), "the cap is named: {message}");
        assert!(!message.contains("aaaa"), "no body content: {message}");
    }
}
