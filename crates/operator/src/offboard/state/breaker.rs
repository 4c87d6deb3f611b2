//! Each tenant's new sends within the last hour, for the blast-radius
//! breaker (`--max-offboards-per-hour`), and the places of the resources it
//! holds. The decision is [`crate::offboard::decision::breaker`]; this only
//! keeps what it reads, and takes a slot under one lock, so two workers
//! never both take the last one. A new process starts from what the
//! resources' status says was sent ([`BreakerWindows::seed`]).

use super::budget_queue::BudgetQueues;
use crate::metrics::{Metrics, TenantLabels};
use crate::offboard::decision::{self, BREAKER_WINDOW, BreakerCheck, SendKind};
use mde_client::Account;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// One counted send: when, and for which resource (empty when seeded).
#[derive(Debug, Clone)]
struct Sent {
    at: Instant,
    key: String,
}

/// What a send asks of the breaker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask {
    pub limit: u32,
    pub send: SendKind,
    pub released: bool,
}

#[derive(Clone, Default)]
pub(crate) struct BreakerWindows {
    /// Per tenant (any app), oldest first.
    sends: Arc<Mutex<HashMap<Account, VecDeque<Sent>>>>,
    /// The held resources of each tenant, in order.
    places: BudgetQueues,
}

impl BreakerWindows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Account, VecDeque<Sent>>> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.sends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The breaker's word on `key`'s send to `tenant` now; a counted pass
    /// takes its slot at once.
    pub(crate) fn try_send(
        &self,
        tenant: &Account,
        key: &str,
        ask: Ask,
        now: Instant,
    ) -> BreakerCheck {
        if ask.limit == 0 || ask.send == SendKind::Again {
            return BreakerCheck::Pass { counted: false };
        }
        let place = if ask.released {
            0
        } else {
            self.places.place(tenant, key, now)
        };
        let check = {
            let mut sends = self.lock();
            let window = sends.entry(tenant.clone()).or_default();
            prune(window, now);
            let ages: Vec<Duration> = window.iter().map(|s| now - s.at).collect();
            let check = decision::breaker(ask.limit, ask.send, ask.released, &ages, place);
            if check == (BreakerCheck::Pass { counted: true }) {
                window.push_back(Sent {
                    at: now,
                    key: key.to_string(),
                });
            }
            check
        };
        match check {
            BreakerCheck::Hold(held) => self.places.due(tenant, key, now + held.wait),
            BreakerCheck::Pass { .. } => {
                self.places.served(tenant, key);
            }
        }
        check
    }

    /// `key`'s counted send was never made (sign-in failed, its intent
    /// could not be written, the lease ran out): its slot frees.
    pub(crate) fn give_back(&self, tenant: &Account, key: &str) {
        if let Some(window) = self.lock().get_mut(tenant)
            && let Some(i) = window.iter().rposition(|s| s.key == key)
        {
            window.remove(i);
        }
    }

    /// Sends a predecessor made, `ages` ago (from the resources' status).
    pub(crate) fn seed(&self, tenant: &Account, ages: &[Duration], now: Instant) {
        let mut sends = self.lock();
        let window = sends.entry(tenant.clone()).or_default();
        window.extend(
            ages.iter()
                .filter(|age| **age < BREAKER_WINDOW)
                .filter_map(|age| now.checked_sub(*age))
                .map(|at| Sent {
                    at,
                    key: String::new(),
                }),
        );
        window.make_contiguous().sort_by_key(|s| s.at);
    }

    /// Whether `tenant`'s hour holds `limit` new sends: the next is held.
    fn open(window: &VecDeque<Sent>, limit: u32) -> bool {
        limit > 0 && window.len() >= limit as usize
    }

    /// Set `tenant`'s gauge as the window stands now.
    pub(crate) fn publish_tenant(&self, metrics: &Metrics, tenant: &Account, limit: u32) {
        let mut sends = self.lock();
        let open = sends.get_mut(tenant).is_some_and(|window| {
            prune(window, Instant::now());
            Self::open(window, limit)
        });
        set_open(metrics, tenant, open);
    }

    /// Set every tenant's gauge (the window slides without any send), and
    /// forget the tenants whose hour is empty once their gauge shows 0.
    pub(crate) fn publish(&self, metrics: &Metrics, limit: u32) {
        let now = Instant::now();
        let mut sends = self.lock();
        sends.retain(|tenant, window| {
            prune(window, now);
            set_open(metrics, tenant, Self::open(window, limit));
            !window.is_empty()
        });
    }
}

fn set_open(metrics: &Metrics, tenant: &Account, open: bool) {
    metrics
        .breaker_open
        .get_or_create(&TenantLabels {
            tenant: tenant.tenant.clone(),
        })
        .set(i64::from(open));
}

/// Drop the sends an hour old or more.
fn prune(window: &mut VecDeque<Sent>, now: Instant) {
    while window
        .front()
        .is_some_and(|s| now.saturating_duration_since(s.at) >= BREAKER_WINDOW)
    {
        window.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offboard::decision::Held;

    fn account(tenant: &str) -> Account {
        Account {
            tenant: tenant.into(),
            app: String::new(),
            api: "https://api.security.microsoft.com/".into(),
        }
    }

    const FIRST: Ask = Ask {
        limit: 2,
        send: SendKind::First,
        released: false,
    };

    #[tokio::test(start_paused = true)]
    async fn the_window_counts_per_tenant_slides_and_gives_back_unsent_slots() {
        let breaker = BreakerWindows::default();
        let (t, other) = (account("contoso"), account("fabrikam"));
        let now = Instant::now;
        let pass = BreakerCheck::Pass { counted: true };
        assert_eq!(breaker.try_send(&t, "a", FIRST, now()), pass);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(breaker.try_send(&t, "b", FIRST, now()), pass);
        // Full: `c` waits until `a`'s send is an hour old, `d` for `b`'s.
        let hold = |wait| {
            BreakerCheck::Hold(Held {
                limit: 2,
                sent: 2,
                wait,
            })
        };
        assert_eq!(
            breaker.try_send(&t, "c", FIRST, now()),
            hold(Duration::from_secs(3000))
        );
        assert_eq!(
            breaker.try_send(&t, "d", FIRST, now()),
            hold(Duration::from_secs(3600)),
            "second in line"
        );
        // Another tenant has an hour of its own; a resend is never held.
        assert_eq!(breaker.try_send(&other, "x", FIRST, now()), pass);
        let again = Ask {
            send: SendKind::Again,
            ..FIRST
        };
        assert_eq!(
            breaker.try_send(&t, "e", again, now()),
            BreakerCheck::Pass { counted: false }
        );
        // `b` was never sent after all: its slot goes to `c`, first in line.
        breaker.give_back(&t, "b");
        assert_eq!(breaker.try_send(&t, "c", FIRST, now()), pass);
        // The hour slides: `a`'s slot frees, and `d` (now first) goes on.
        tokio::time::advance(Duration::from_secs(3000)).await;
        assert_eq!(breaker.try_send(&t, "d", FIRST, now()), pass);
        let metrics = Metrics::default();
        breaker.publish(&metrics, 2);
        let text = metrics.encode();
        assert!(
            text.contains("defender_offboard_breaker_open{tenant=\"contoso\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("defender_offboard_breaker_open{tenant=\"fabrikam\"} 0"),
            "{text}"
        );
    }

    /// A new process counts what its predecessor sent within the hour.
    #[tokio::test(start_paused = true)]
    async fn seeded_sends_count_until_they_are_an_hour_old() {
        let breaker = BreakerWindows::default();
        let t = account("contoso");
        let now = Instant::now();
        let mins = |m: u64| Duration::from_secs(60 * m);
        breaker.seed(&t, &[mins(59), mins(10), mins(70)], now);
        let check = breaker.try_send(&t, "a", FIRST, now);
        assert_eq!(
            check,
            BreakerCheck::Hold(Held {
                limit: 2,
                sent: 2,
                wait: mins(1)
            }),
            "the send 70 minutes ago no longer counts"
        );
        let released = Ask {
            released: true,
            ..FIRST
        };
        assert_eq!(
            breaker.try_send(&t, "b", released, now),
            BreakerCheck::Pass { counted: true }
        );
    }
}
