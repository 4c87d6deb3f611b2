//! What every reconcile of the offboard controller shares: the tenants'
//! clients, the status store, this process's state, the tunables.

use super::decision::Settings;
use super::ports::{KubeStore, MdeCalls};
use super::state::OffboardState;
use super::step::Ports;
use super::tenant_slots::TenantSlots;
use crate::cache::parked::ParkingLot;
use crate::metrics::Metrics;
use crate::telemetry::Liveness;
use crate::tenants::{ConnectionKey, Connections};
use kube::runtime::events::Reporter;
use mde_client::DefenderClient;
use std::borrow::Cow;
use std::sync::Arc;

/// Shared by every reconcile: built once. `M` is the MDE port: the client in
/// production, a fake in unit tests.
pub struct Context<M = DefenderClient> {
    pub(crate) client: kube::Client,
    /// The MDE client of each tenant: the operator's own, and one per
    /// `DefenderConnection` (`run --connections`).
    pub(crate) connections: Arc<Connections<M>>,
    pub(crate) store: KubeStore,
    /// What this process remembers between reconciles (lookup clocks, machines).
    pub(crate) state: OffboardState,
    /// Red while a background task (the poller) is down.
    pub(crate) liveness: Liveness,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: Settings,
    /// Resources waiting outside the cache until their `nextRetryAt`.
    pub(crate) parked: Arc<ParkingLot>,
    /// Each connection's reconcile slots ([`super::tenant_slots`]).
    pub(crate) slots: TenantSlots,
}

impl<M: MdeCalls> Context<M> {
    /// One tenant, through `mde`; `instance` names this replica in the Events
    /// it publishes.
    pub fn new(
        client: kube::Client,
        mde: M,
        metrics: Arc<Metrics>,
        settings: Settings,
        instance: Option<String>,
    ) -> Self {
        Self::with_connections(
            client,
            Connections::new(Some(mde), false),
            metrics,
            settings,
            instance,
        )
    }

    pub fn with_connections(
        client: kube::Client,
        connections: Connections<M>,
        metrics: Arc<Metrics>,
        settings: Settings,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: "defender-offboard".into(),
            instance,
        };
        Context {
            store: KubeStore {
                reporter,
                client: client.clone(),
            },
            client,
            connections: Arc::new(connections),
            state: OffboardState::default(),
            liveness: Liveness::default(),
            metrics,
            settings,
            parked: Arc::default(),
            slots: TenantSlots::default(),
        }
    }

    /// The tunables for a resource of connection `key`: the operator's own,
    /// with the connection's protected devices added to its own.
    pub fn settings_for(&self, key: &ConnectionKey) -> Cow<'_, Settings> {
        match self.connections.protection(key) {
            Some(extra) => Cow::Owned(Settings {
                protection: self.settings.protection.combined(&extra),
                ..self.settings.clone()
            }),
            None => Cow::Borrowed(&self.settings),
        }
    }

    /// The ports one reconcile step runs against, with `mde` the tenant's client.
    pub fn ports<'a>(&'a self, mde: &'a M) -> Ports<'a, M, KubeStore> {
        Ports {
            mde,
            store: &self.store,
            state: &self.state,
            settings: &self.settings,
            metrics: &self.metrics,
        }
    }
}
