//! The adopt index of each tenant (machine ids are unique only within one,
//! and an index proves absence only for the tenant whose reads filled it),
//! the window it covers (`None`: not used), and per tenant the lock that
//! lets one worker at a time refresh it. The index itself: [`adopt_index`].

use crate::lease_clock::LeaseClock;
use crate::offboard::adopt_index::{self, AdoptIndex, Freshness, MachineCheck};
use mde_client::Account;
use mde_client::MachineAction;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Default)]
struct TenantIndex {
    index: Mutex<AdoptIndex>,
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl TenantIndex {
    fn index(&self) -> std::sync::MutexGuard<'_, AdoptIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Indexes {
    window: Mutex<Option<Duration>>,
    tenants: Mutex<HashMap<Account, Arc<TenantIndex>>>,
}

#[derive(Clone, Default)]
pub(crate) struct AdoptIndexes(Arc<Indexes>);

impl AdoptIndexes {
    /// Check machines before a first send against an index of this
    /// operator's offboards created within `window`; a zero window turns the
    /// index off.
    pub(crate) fn use_window(&self, window: Duration) {
        *self.0.window.lock().unwrap_or_else(|e| e.into_inner()) =
            (!window.is_zero()).then_some(window);
    }

    /// The window (`None`: the index is off).
    pub(crate) fn window(&self) -> Option<Duration> {
        *self.0.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tenant(&self, tenant: &Account) -> Arc<TenantIndex> {
        self.0
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    /// What `tenant`'s index says for a first send to `machine_id`, when it
    /// is used; it must have been read at most `max_age` before `now`, and
    /// while `lease` was held.
    pub(crate) fn machine_check(
        &self,
        tenant: &Account,
        machine_id: &str,
        max_age: Duration,
        lease: &LeaseClock,
        now: Instant,
    ) -> Option<MachineCheck> {
        self.window()?;
        let fresh = Freshness {
            sending_since: lease.sending_since(),
            max_age,
            now,
        };
        Some(adopt_index::machine_check(
            &self.tenant(tenant).index(),
            machine_id,
            fresh,
        ))
    }

    /// Where `tenant`'s next read starts (`None`: no index), as of `now`.
    pub(crate) fn next_since(
        &self,
        tenant: &Account,
        now: jiff::Timestamp,
        lag: Duration,
    ) -> Option<jiff::Timestamp> {
        let window = self.window()?;
        Some(
            self.tenant(tenant)
                .index()
                .next_since(now, window, lag, Instant::now()),
        )
    }

    /// Whether a read from `since` covers `tenant`'s whole window as of `now`.
    pub(crate) fn is_whole_window(&self, since: jiff::Timestamp, now: jiff::Timestamp) -> bool {
        self.window()
            .is_some_and(|window| since <= adopt_index::window_start(now, window))
    }

    /// Read slots a read of `tenant`'s whole window needs, as far as is known.
    pub(crate) fn pages_needed(&self, tenant: &Account) -> usize {
        self.tenant(tenant).index().pages_needed()
    }

    /// A read of `tenant`'s whole window ended: complete in `pages`, or
    /// stopped after them.
    pub(crate) fn whole_window_read(
        &self,
        tenant: &Account,
        began: Instant,
        pages: usize,
        complete: bool,
    ) {
        let tenant = self.tenant(tenant);
        let mut index = tenant.index();
        if complete {
            index.read_whole_window(began, pages);
        } else {
            index.stopped_after(pages, Instant::now());
        }
    }

    /// Fold a window read of `tenant` (from `since`, begun at `began`) into
    /// its index, pruned to the window as of `now`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fold(
        &self,
        tenant: &Account,
        actions: &[MachineAction],
        since: jiff::Timestamp,
        began: Instant,
        complete: bool,
        next_since: jiff::Timestamp,
        now: jiff::Timestamp,
    ) {
        let Some(window) = self.window() else {
            return;
        };
        let tenant = self.tenant(tenant);
        let mut index = tenant.index();
        index.fold(actions, since, began, complete, next_since);
        index.prune(now, window);
    }

    /// Held by the one worker refreshing `tenant`'s index; `None` while
    /// another worker holds it. Nobody waits for it: a worker that waited
    /// would hold its offboard slot and its place among the controller's
    /// workers while one slow tenant's read goes on, and stall other tenants.
    pub(crate) fn try_refreshing(
        &self,
        tenant: &Account,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let lock = self.tenant(tenant).refreshing.clone();
        lock.try_lock_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant's index proves absence only for that tenant: after a read of
    /// tenant A, A's machines may be sent without a read, B's still need
    /// B's own read first.
    #[tokio::test]
    async fn each_tenant_has_its_own_adopt_index() {
        let indexes = AdoptIndexes::default();
        indexes.use_window(Duration::from_secs(7 * 24 * 3600));
        let (lease, max_age) = (LeaseClock::not_elected(), Duration::from_secs(35));
        let tenant = |id: &str| Account {
            tenant: id.into(),
            app: String::new(),
            api: "https://api.security.microsoft.com/".into(),
        };
        let default = tenant("contoso");
        let check =
            |tenant: &Account| indexes.machine_check(tenant, "m1", max_age, &lease, Instant::now());
        assert_eq!(check(&default), Some(MachineCheck::Refresh));
        let now = jiff::Timestamp::now();
        let since = indexes
            .next_since(&default, now, Duration::from_secs(35))
            .unwrap();
        indexes.fold(&default, &[], since, Instant::now(), true, since, now);
        assert_eq!(check(&default), Some(MachineCheck::Send));
        let team_b = tenant("fabrikam");
        assert_eq!(
            check(&team_b),
            Some(MachineCheck::Refresh),
            "another tenant's read proves nothing here"
        );
    }
}
