//! Prometheus metrics (names are documented in docs/operations.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label of the operator's own credentials in the `connection` label;
/// a `DefenderConnection` shows as `namespace/name`.
pub const DEFAULT_CONNECTION: &str = "default";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub connection: String,
    pub family: String,
    pub code: String,
}

/// Per tenant+app (connection) and MDE API family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub connection: String,
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// Prefix of every metric name.
const PREFIX: &str = "defender_offboard";

/// The kind of a registered metric, which decides its series' suffixes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// What was registered, by name and kind: an empty family shows nothing on
/// `/metrics`, so the registry's output alone cannot list every series.
#[derive(Default, Debug)]
struct Catalog(Vec<(&'static str, Kind)>);

impl Catalog {
    fn register(
        &mut self,
        registry: &mut Registry,
        name: &'static str,
        help: &str,
        kind: Kind,
        metric: impl prometheus_client::registry::Metric,
    ) {
        registry.register(name, help, metric);
        self.0.push((name, kind));
    }
}

pub struct Metrics {
    pub registry: Registry,
    catalog: Catalog,
    pub mde_requests: Family<RequestLabels, Counter>,
    pub mde_throttled: Family<FamilyLabels, Counter>,
    pub budget_wait: HistogramFamily<FamilyLabels>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub resources: Family<PhaseLabels, Gauge>,
    pub offboards: Family<OutcomeLabels, Counter>,
    pub leader: Gauge,
    pub budget_remaining: Family<FamilyLabels, Gauge>,
    pub in_flight_oldest: Gauge,
    pub parked: Gauge,
    pub ttl_deletions: Counter,
    pub final_labels_removed: Counter,
    pub node_offboards: Family<ResultLabels, Counter>,
    pub breaker_held: Family<TenantLabels, Counter>,
    pub breaker_open: Family<TenantLabels, Gauge>,
}

/// Per MDE tenant (the Microsoft Entra tenant id): the breaker counts per tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

// One registration per metric, in one place: the names read as a list, as
// docs/operations.md lists them.
impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let mut catalog = Catalog::default();
        let mde_requests = Family::<RequestLabels, Counter>::default();
        catalog.register(
            &mut registry,
            "mde_requests",
            "MDE API calls by family and HTTP status code",
            Kind::Counter,
            mde_requests.clone(),
        );
        let mde_throttled = Family::<FamilyLabels, Counter>::default();
        catalog.register(
            &mut registry,
            "mde_throttled",
            "429 answers from MDE by family",
            Kind::Counter,
            mde_throttled.clone(),
        );
        let budget_wait: HistogramFamily<FamilyLabels> =
            Family::new_with_constructor(wait_histogram);
        catalog.register(
            &mut registry,
            "budget_wait_seconds",
            "Time calls waited for rate budget",
            Kind::Histogram,
            budget_wait.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        catalog.register(
            &mut registry,
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            Kind::Histogram,
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        catalog.register(
            &mut registry,
            "reconcile_errors",
            "Reconcile failures by error",
            Kind::Counter,
            reconcile_errors.clone(),
        );
        let resources = Family::<PhaseLabels, Gauge>::default();
        catalog.register(
            &mut registry,
            "resources",
            "DeviceOffboard resources by phase",
            Kind::Gauge,
            resources.clone(),
        );
        let offboards = Family::<OutcomeLabels, Counter>::default();
        catalog.register(
            &mut registry,
            "offboards",
            "Offboard actions submitted or adopted",
            Kind::Counter,
            offboards.clone(),
        );
        let leader = Gauge::default();
        catalog.register(
            &mut registry,
            "leader",
            "1 while this replica holds the leader lease",
            Kind::Gauge,
            leader.clone(),
        );
        let budget_remaining = Family::<FamilyLabels, Gauge>::default();
        catalog.register(
            &mut registry,
            "budget_remaining",
            "Calls each MDE API family may send now, in its tightest window (0 while a 429 parks it)",
            Kind::Gauge,
            budget_remaining.clone(),
        );
        let in_flight_oldest = Gauge::default();
        catalog.register(
            &mut registry,
            "in_flight_oldest_seconds",
            "Age of the oldest DeviceOffboard not yet final, from its creation (0 when none)",
            Kind::Gauge,
            in_flight_oldest.clone(),
        );
        let parked = Gauge::default();
        catalog.register(
            &mut registry,
            "parked_resources",
            "Pending DeviceOffboards waiting out a long budget or retry wait outside the controller's cache (counted in resources{phase=\"Pending\"} too)",
            Kind::Gauge,
            parked.clone(),
        );
        let ttl_deletions = Counter::default();
        catalog.register(
            &mut registry,
            "ttl_deletions",
            "Finished DeviceOffboards deleted by spec.ttlSecondsAfterFinished",
            Kind::Counter,
            ttl_deletions.clone(),
        );
        let final_labels_removed = Counter::default();
        catalog.register(
            &mut registry,
            "final_labels_removed",
            "Final labels removed from DeviceOffboards whose status is not final (a copied manifest or a hand-set label)",
            Kind::Counter,
            final_labels_removed.clone(),
        );
        let node_offboards = Family::<ResultLabels, Counter>::default();
        catalog.register(
            &mut registry,
            "node_offboards",
            "Deleted Nodes handled by node offboarding, by result",
            Kind::Counter,
            node_offboards.clone(),
        );
        let breaker_held = Family::<TenantLabels, Counter>::default();
        catalog.register(
            &mut registry,
            "breaker_held",
            "New offboards the blast-radius breaker held back (once per resource and hold)",
            Kind::Counter,
            breaker_held.clone(),
        );
        let breaker_open = Family::<TenantLabels, Gauge>::default();
        catalog.register(
            &mut registry,
            "breaker_open",
            "1 while the tenant's last hour holds --max-offboards-per-hour new offboards (the next new one is held)",
            Kind::Gauge,
            breaker_open.clone(),
        );
        Metrics {
            registry,
            catalog,
            mde_requests,
            mde_throttled,
            budget_wait,
            reconcile_duration,
            reconcile_errors,
            resources,
            offboards,
            leader,
            budget_remaining,
            in_flight_oldest,
            parked,
            ttl_deletions,
            final_labels_removed,
            node_offboards,
            breaker_held,
            breaker_open,
        }
    }
}

/// The MDE client of the operator's own credentials reports each call here.
impl mde_client::CallObserver for Metrics {
    fn request_finished(&self, family: mde_client::ApiFamily, status: u16) {
        self.record_request(DEFAULT_CONNECTION, family.as_str(), status);
    }

    fn budget_waited(&self, family: mde_client::ApiFamily, waited: std::time::Duration) {
        self.record_budget_wait(DEFAULT_CONNECTION, family.as_str(), waited.as_secs_f64());
    }
}

/// The calls of one `DefenderConnection`'s client, labelled with it.
pub struct ConnectionObserver {
    pub metrics: std::sync::Arc<Metrics>,
    pub connection: String,
}

impl mde_client::CallObserver for ConnectionObserver {
    fn request_finished(&self, family: mde_client::ApiFamily, status: u16) {
        self.metrics
            .record_request(&self.connection, family.as_str(), status);
    }

    fn budget_waited(&self, family: mde_client::ApiFamily, waited: std::time::Duration) {
        self.metrics
            .record_budget_wait(&self.connection, family.as_str(), waited.as_secs_f64());
    }
}

impl Metrics {
    pub fn record_request(&self, connection: &str, family: &str, code: u16) {
        self.mde_requests
            .get_or_create(&RequestLabels {
                connection: connection.to_string(),
                family: family.to_string(),
                code: code.to_string(),
            })
            .inc();
        if code == 429 {
            self.mde_throttled
                .get_or_create(&FamilyLabels {
                    connection: connection.to_string(),
                    family: family.to_string(),
                })
                .inc();
        }
    }

    pub fn record_budget_wait(&self, connection: &str, family: &str, seconds: f64) {
        self.budget_wait
            .get_or_create(&FamilyLabels {
                connection: connection.to_string(),
                family: family.to_string(),
            })
            .observe(seconds);
    }

    /// Every series name `/metrics` can show (`_total` for counters, `_bucket`,
    /// `_sum` and `_count` for histograms), from what was registered, so
    /// dashboards and alerts can be checked against the code.
    pub fn series_names(&self) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for (name, kind) in &self.catalog.0 {
            let suffixes: &[&str] = match kind {
                Kind::Counter => &["_total"],
                Kind::Histogram => &["_bucket", "_sum", "_count"],
                Kind::Gauge => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{PREFIX}_{name}{s}")));
        }
        names
    }

    /// The text exposition format for `/metrics`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_follow_the_exposition_suffixes() {
        let names = Metrics::default().series_names();
        for name in [
            "defender_offboard_mde_requests_total",
            "defender_offboard_budget_wait_seconds_bucket",
            "defender_offboard_resources",
            "defender_offboard_budget_remaining",
            "defender_offboard_ttl_deletions_total",
            "defender_offboard_final_labels_removed_total",
            "defender_offboard_node_offboards_total",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains("defender_offboard_mde_requests"));
        // Each registered name shows on /metrics once it has a sample.
        let metrics = Metrics::default();
        metrics.record_request(DEFAULT_CONNECTION, "offboard", 201);
        assert!(metrics.encode().contains(
            "defender_offboard_mde_requests_total{connection=\"default\",family=\"offboard\",code=\"201\"} 1"
        ));
    }
}
