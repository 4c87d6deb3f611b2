//! A property test of the exactly-once path: random interleavings of MDE
//! outcomes (accepted, timeout, reset, 5xx, 429, lost response), lookups that
//! fail or lag, status-write conflicts, crashes between any two steps,
//! restarts and leader changes (a process that remembers nothing), and time
//! passing. Whatever happens:
//! - MDE never holds two offboard actions for the machine;
//! - a second POST for the key only follows a POST that failed ambiguously
//!   without creating anything (which only a proving lookup may resend);
//! - once MDE answers normally again, the resource ends with its action.

use super::decision::Settings;
use super::fakes::{FailWith, ScriptedStore};
use super::fakes::{FakeMde, Lookup, Send};
use super::fakes::{on_tokio_time, restarted};
use super::state::OffboardState;
use super::step::{Ports, step};
use crate::crd::DeviceOffboard;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::test_kit;
use jiff::Timestamp;
use mde_client::{ApiFamily, MdeError};
use proptest::prelude::*;
use std::time::Duration;

const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const UID: &str = "6f1c1a52-1111-4a4a-9c9c-00000000000a";
/// MDE's list may lag up to this long; the lookup delay is longer.
const LOOKUP_DELAY: Duration = Duration::from_secs(35);

/// One thing that happens before the next step.
#[derive(Debug, Clone)]
enum Event {
    /// The next POST: accepted, or one of the faults.
    Post(PostOutcome),
    /// The next lookup fails (5xx, or a 404 from a list).
    LookupFails(bool),
    /// The next (or the one after: the record that follows an intent) status
    /// write conflicts, or the process dies before it lands.
    WriteFails { conflict: bool, later: bool },
    /// The process restarts (a crash, a new leader): it remembers nothing.
    Restart,
    /// Time passes.
    Wait(u64),
}

#[derive(Debug, Clone, Copy)]
enum PostOutcome {
    Accepted,
    /// MDE acted, the answer was lost (timeout, reset, 504).
    AnswerLost,
    /// The request timed out or got a 5xx before MDE acted.
    FailedBeforeActing,
    Throttled,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => prop_oneof![
            Just(PostOutcome::Accepted),
            Just(PostOutcome::AnswerLost),
            Just(PostOutcome::FailedBeforeActing),
            Just(PostOutcome::Throttled),
        ]
        .prop_map(Event::Post),
        1 => any::<bool>().prop_map(Event::LookupFails),
        1 => (any::<bool>(), any::<bool>())
            .prop_map(|(conflict, later)| Event::WriteFails { conflict, later }),
        1 => Just(Event::Restart),
        2 => (0u64..60).prop_map(Event::Wait),
    ]
}

fn post(outcome: PostOutcome) -> Send {
    let unknown = |reason: &str| MdeError::OutcomeUnknown {
        reason: reason.into(),
    };
    match outcome {
        PostOutcome::Accepted => Send::Accept,
        PostOutcome::AnswerLost => Send::CreateThenFail(unknown("answer lost")),
        PostOutcome::FailedBeforeActing => Send::Fail(unknown("timed out before MDE acted")),
        PostOutcome::Throttled => Send::Fail(MdeError::Throttled {
            family: ApiFamily::Offboard,
            retry_at: Timestamp::now(),
        }),
    }
}

fn resource() -> DeviceOffboard {
    test_kit::offboard("laptop")
        .machine_id(MACHINE)
        .comment("returned")
        .uid(UID)
        .generation(1)
        .build()
}

/// Run the events, a step after each, then steps until the action is recorded.
async fn run(events: Vec<Event>, list_lag: Duration) -> Result<(), TestCaseError> {
    let mde = FakeMde::default().list_lag(list_lag);
    let store = ScriptedStore::new(resource());
    let settings = Settings {
        lookup_delay: LOOKUP_DELAY,
        retry_backoff: Duration::from_secs(1),
        access_backoff: Duration::from_secs(60),
    };
    let metrics = Metrics::default();
    let mut state = on_tokio_time();
    let origin = state.clone();
    let step_once = |state: OffboardState| {
        let ports = (&mde, &store, &settings, &metrics);
        async move {
            let (mde, store, settings, metrics) = ports;
            let ports = Ports {
                mde,
                store,
                state: &state,
                settings,
                metrics,
            };
            step(&store.object(), &ports).await
        }
    };
    for event in events {
        match event {
            Event::Post(outcome) => mde.push_send(post(outcome)),
            Event::LookupFails(not_found) => mde.push_lookup(Lookup::Fail(if not_found {
                MdeError::NotFound {
                    message: "a 404 from a list".into(),
                }
            } else {
                MdeError::Unavailable {
                    status: 503,
                    message: "busy".into(),
                }
            })),
            Event::WriteFails { conflict, later } => {
                let with = if conflict {
                    FailWith::Conflict
                } else {
                    FailWith::Crash
                };
                store.fail_write(store.writes() + 1 + u64::from(later), with);
            }
            Event::Restart => state = restarted(&origin),
            Event::Wait(seconds) => tokio::time::advance(Duration::from_secs(seconds)).await,
        }
        if let Err(Error::Kube(_)) = step_once(state.clone()).await {
            // The process died mid-step: the next one remembers nothing.
            state = restarted(&origin);
        }
        tokio::time::advance(Duration::from_millis(200)).await;
    }
    // MDE behaves from now on: the resource must end with its action.
    for _ in 0..100 {
        if store
            .object()
            .status
            .and_then(|s| s.machine_action_id)
            .is_some()
        {
            break;
        }
        let wait = step_once(state.clone()).await.ok().flatten();
        tokio::time::advance(
            wait.unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(10)),
        )
        .await;
    }
    let status = store.object().status.unwrap_or_default();
    prop_assert!(
        status.machine_action_id.is_some(),
        "never recorded: {status:?}"
    );
    prop_assert!(mde.actions_for(MACHINE) <= 1, "two actions at MDE");
    prop_assert!(
        mde.posts_for(UID) <= 1 + mde.refused_before_acting(),
        "{} POSTs, but only {} failed before MDE acted",
        mde.posts_for(UID),
        mde.refused_before_acting()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn no_second_post_without_proof_and_always_final(
        events in proptest::collection::vec(event(), 0..24),
        lag in 0u64..30,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(run(events, Duration::from_secs(lag)))?;
    }
}
