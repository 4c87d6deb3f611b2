//! Prometheus metrics (names are documented in docs/operations.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub family: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
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

pub struct Metrics {
    pub registry: Registry,
    pub mde_requests: Family<RequestLabels, Counter>,
    pub mde_throttled: Family<FamilyLabels, Counter>,
    pub budget_wait: HistogramFamily<FamilyLabels>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub resources: Family<PhaseLabels, Gauge>,
    pub offboards: Family<OutcomeLabels, Counter>,
    pub leader: Gauge,
}

// One registration per metric, in one place: the names read as a list, as
// docs/operations.md lists them.
impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("defender_offboard");
        let mde_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "mde_requests",
            "MDE API calls by family and HTTP status code",
            mde_requests.clone(),
        );
        let mde_throttled = Family::<FamilyLabels, Counter>::default();
        registry.register(
            "mde_throttled",
            "429 answers from MDE by family",
            mde_throttled.clone(),
        );
        let budget_wait: HistogramFamily<FamilyLabels> =
            Family::new_with_constructor(wait_histogram);
        registry.register(
            "budget_wait_seconds",
            "Time calls waited for rate budget",
            budget_wait.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile failures by error",
            reconcile_errors.clone(),
        );
        let resources = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "resources",
            "DeviceOffboard resources by phase",
            resources.clone(),
        );
        let offboards = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "offboards",
            "Offboard actions submitted or adopted",
            offboards.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            mde_requests,
            mde_throttled,
            budget_wait,
            reconcile_duration,
            reconcile_errors,
            resources,
            offboards,
            leader,
        }
    }
}

/// The MDE client reports each call here.
impl mde_client::CallObserver for Metrics {
    fn request_finished(&self, family: mde_client::ApiFamily, status: u16) {
        self.record_request(family.as_str(), status);
    }

    fn budget_waited(&self, family: mde_client::ApiFamily, waited: std::time::Duration) {
        self.record_budget_wait(family.as_str(), waited.as_secs_f64());
    }
}

impl Metrics {
    pub fn record_request(&self, family: &str, code: u16) {
        self.mde_requests
            .get_or_create(&RequestLabels {
                family: family.to_string(),
                code: code.to_string(),
            })
            .inc();
        if code == 429 {
            self.mde_throttled
                .get_or_create(&FamilyLabels {
                    family: family.to_string(),
                })
                .inc();
        }
    }

    pub fn record_budget_wait(&self, family: &str, seconds: f64) {
        self.budget_wait
            .get_or_create(&FamilyLabels {
                family: family.to_string(),
            })
            .observe(seconds);
    }

    /// The text exposition format for `/metrics`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
