//! At start: the offboards a predecessor sent in the current windows count
//! against the budget, read from the resources' `submittedAt`.

use crate::cache::final_label;
use crate::crd::DeviceOffboard;
use crate::offboard::{Context, MdeCalls};
use crate::pages::Pages;
use crate::tenants::ConnectionKey;
use kube::api::Api;
use std::collections::HashMap;
use std::time::Duration;

/// A new process (after a restart or a leader change) does not know the
/// offboards its predecessor sent in the current windows; the resources'
/// `submittedAt` tell it, so the budget starts where the predecessor left it.
/// Read in pages, keeping only the times within the longest window: a
/// cluster's history of finished resources never sits in memory at once.
pub(crate) async fn seed_budget_from_history<M: MdeCalls>(
    api: &Api<DeviceOffboard>,
    ctx: &Context<M>,
    request_timeout: Duration,
) {
    let now_instant = tokio::time::Instant::now();
    let now = jiff::Timestamp::now();
    let mut past: HashMap<ConnectionKey, Vec<Duration>> = HashMap::new();
    for selector in seed_selectors(now, request_timeout) {
        let mut pages = Pages::with_labels(SEED_PAGE, &selector);
        loop {
            let page = match api.list(pages.params()).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(error = %error, "could not read past submissions; starting with what was read");
                    break;
                }
            };
            for resource in &page.items {
                let Some(submitted) = resource
                    .status
                    .as_ref()
                    .and_then(|s| s.submitted_at.as_ref())
                else {
                    continue;
                };
                past.entry(ConnectionKey::of(resource))
                    .or_default()
                    .extend(recent_submissions(
                        std::iter::once(submitted),
                        now,
                        request_timeout,
                    ));
            }
            if !pages.advance(page.metadata.continue_) {
                break;
            }
        }
    }
    for (key, ages) in past {
        let answered: Vec<_> = ages
            .into_iter()
            .filter_map(|age| now_instant.checked_sub(age))
            .collect();
        if !answered.is_empty() {
            tracing::info!(
                connection = %key,
                recent = answered.len(),
                "counting recent offboards against the budget"
            );
            ctx.connections.seed(key, answered);
        }
    }
}

/// The ages of the submissions within the longest budget window.
/// `submittedAt` is written before the send and kept to the second: the
/// answer came at the latest a request timeout (and a second) later.
pub(crate) fn recent_submissions<'a>(
    submitted: impl Iterator<Item = &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: jiff::Timestamp,
    request_timeout: Duration,
) -> Vec<Duration> {
    let latest_answer = jiff::SignedDuration::try_from(request_timeout + Duration::from_secs(1))
        .unwrap_or_default();
    submitted
        .filter_map(|t| t.0.checked_add(latest_answer).ok())
        .map(|t| Duration::try_from(now.duration_since(t)).unwrap_or_default())
        .filter(|age| *age <= MAX_BUDGET_MEMORY)
        .collect()
}

/// The resources that may hold a submission within the window, as three
/// label selectors: those not labelled final (the controller's own), those
/// labelled final in an hour a submission of the window may have been
/// labelled in, and those a version without the hour label labelled (read
/// whole, until they age out). A resource sent at `t` is labelled final at
/// or after `t`; its labeller's clock may be [`LABEL_CLOCK_SKEW`] off ours.
pub(crate) fn seed_selectors(now: jiff::Timestamp, request_timeout: Duration) -> [String; 3] {
    let reach = MAX_BUDGET_MEMORY + request_timeout + Duration::from_secs(1) + LABEL_CLOCK_SKEW;
    let since = now
        .checked_sub(jiff::SignedDuration::try_from(reach).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(jiff::Timestamp::MIN);
    let until = now
        .checked_add(jiff::SignedDuration::try_from(LABEL_CLOCK_SKEW).unwrap_or_default())
        .unwrap_or(now);
    [
        final_label::WATCH_SELECTOR.to_string(),
        final_label::recent_hours_selector(since, until),
        final_label::LABELLED_WITHOUT_HOUR_SELECTOR.to_string(),
    ]
}

/// How far another replica's clock may be from ours when it wrote a label.
const LABEL_CLOCK_SKEW: Duration = Duration::from_secs(600);

/// Resources read per page when seeding the budget.
const SEED_PAGE: u32 = crate::pages::FULL_OBJECT_PAGE;

/// The longest window worth remembering (MDE's hourly limit).
const MAX_BUDGET_MEMORY: Duration = Duration::from_secs(3600);
