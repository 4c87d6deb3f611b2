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
    // The breaker's hour too, per tenant, from the same pages.
    let mut breaker: HashMap<mde_client::Account, Vec<Duration>> = HashMap::new();
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
                if let Some((tenant, age)) = resource
                    .status
                    .as_ref()
                    .and_then(|status| breaker_send(status, now))
                {
                    breaker.entry(tenant).or_default().push(age);
                }
                let Some(status) = resource.status.as_ref() else {
                    continue;
                };
                past.entry(ConnectionKey::of(resource))
                    .or_default()
                    .extend(recent_submission(status, now, request_timeout));
            }
            if !pages.advance(page.metadata.continue_) {
                break;
            }
        }
    }
    if ctx.settings.max_offboards_per_hour > 0 {
        for (tenant, ages) in breaker {
            tracing::info!(
                tenant = %tenant.tenant,
                recent = ages.len(),
                "counting recent new offboards against the breaker"
            );
            ctx.state.breaker.seed(&tenant, &ages, now_instant);
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

/// How long ago the resource's latest send counted at MDE, if within the
/// longest budget window. `answeredAt` (written with the action, kept to
/// the second) is when the answer came: counted a second later, for the
/// rounding. Without it (an answer never recorded: a timeout, a crash, a
/// version that did not write it) `submittedAt`, written before the send,
/// stands: the answer came at the latest a request timeout (and a second)
/// later. An `answeredAt` before `submittedAt` is another send's, not this one's.
pub(crate) fn recent_submission(
    status: &crate::crd::DeviceOffboardStatus,
    now: jiff::Timestamp,
    request_timeout: Duration,
) -> Option<Duration> {
    let submitted = status.submitted_at.as_ref()?.0;
    let answered = status
        .answered_at
        .as_ref()
        .map(|t| t.0)
        .filter(|answered| *answered >= submitted);
    let counted = match answered {
        Some(answered) => answered.checked_add(jiff::SignedDuration::from_secs(1)),
        None => {
            let latest_answer =
                jiff::SignedDuration::try_from(request_timeout + Duration::from_secs(1))
                    .unwrap_or(jiff::SignedDuration::MAX);
            submitted.checked_add(latest_answer)
        }
    }
    .ok()?;
    let age = Duration::try_from(now.duration_since(counted)).unwrap_or_default();
    (age <= MAX_BUDGET_MEMORY).then_some(age)
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

/// A new send this resource made within the breaker's hour: its tenant (any
/// app) and how long ago. Sent means its intent was recorded (`attempts`);
/// one that only adopted another's action sent nothing. `submittedAt` is
/// its latest send's: a resend makes it count later, never not at all.
pub(crate) fn breaker_send(
    status: &crate::crd::DeviceOffboardStatus,
    now: jiff::Timestamp,
) -> Option<(mde_client::Account, Duration)> {
    if status.attempts.unwrap_or(0) == 0 {
        return None;
    }
    let tenant = status.tenant.as_ref()?;
    let age = Duration::try_from(now.duration_since(status.submitted_at.as_ref()?.0)).ok()?;
    let tenant = mde_client::Account {
        tenant: tenant.tenant_id.clone(),
        app: String::new(),
        api: tenant.api.clone(),
    };
    (age < crate::offboard::decision::BREAKER_WINDOW).then_some((tenant, age))
}

/// Resources read per page when seeding the budget.
const SEED_PAGE: u32 = crate::pages::FULL_OBJECT_PAGE;

/// The longest window worth remembering (MDE's hourly limit).
const MAX_BUDGET_MEMORY: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceOffboardStatus, StatusTenant};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// When a past send counts, as a table: from its answer when one was
    /// recorded for this send, else from its intent plus the request timeout.
    #[test]
    fn a_past_send_counts_from_its_answer_or_its_intent_plus_the_timeout() {
        let now: jiff::Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let ago = |secs: i64| Some(Time(now - jiff::SignedDuration::from_secs(secs)));
        let timeout = Duration::from_secs(30);
        let status = |submitted, answered| DeviceOffboardStatus {
            submitted_at: submitted,
            answered_at: answered,
            ..Default::default()
        };
        let secs = Duration::from_secs;
        let cases = [
            (
                "answered 2 s after its intent",
                ago(600),
                ago(598),
                Some(secs(597)),
            ),
            ("no answer recorded", ago(600), None, Some(secs(569))),
            (
                "an answer of an earlier send",
                ago(600),
                ago(900),
                Some(secs(569)),
            ),
            ("answered just now", ago(1), ago(0), Some(secs(0))),
            ("never sent", None, ago(10), None),
            ("answered over an hour ago", ago(3700), ago(3650), None),
            ("sent over an hour ago, no answer", ago(3640), None, None),
            (
                "sent within the hour plus the timeout",
                ago(3620),
                None,
                Some(secs(3589)),
            ),
        ];
        for (case, submitted, answered, counted) in cases {
            assert_eq!(
                recent_submission(&status(submitted, answered), now, timeout),
                counted,
                "{case}"
            );
        }
    }

    /// The breaker's hour after a restart: the resources sent within it, by
    /// tenant (any app); not those only adopted, nor older ones.
    #[test]
    fn the_breaker_is_seeded_from_sends_within_the_hour() {
        let now: jiff::Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let sent = |attempts, mins_ago: i64| DeviceOffboardStatus {
            attempts,
            submitted_at: Some(Time(now - jiff::SignedDuration::from_mins(mins_ago))),
            tenant: Some(StatusTenant {
                tenant_id: "contoso".into(),
                client_id: "app-1".into(),
                api: "https://api.security.microsoft.com/".into(),
            }),
            ..Default::default()
        };
        let (tenant, age) = breaker_send(&sent(Some(1), 20), now).expect("sent 20 min ago");
        assert_eq!(age, Duration::from_secs(1200));
        assert_eq!(
            (tenant.tenant.as_str(), tenant.app.as_str()),
            ("contoso", "")
        );
        assert_eq!(breaker_send(&sent(None, 20), now), None, "adopted only");
        assert_eq!(
            breaker_send(&sent(Some(2), 61), now),
            None,
            "over an hour ago"
        );
        let no_tenant = DeviceOffboardStatus {
            tenant: None,
            ..sent(Some(1), 5)
        };
        assert_eq!(breaker_send(&no_tenant, now), None);
    }
}
