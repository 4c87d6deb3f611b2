//! The `DeviceOffboard` controller (`defender-offboard run`).

pub mod adopt_index;
pub mod connection_controller;
pub mod connections;
pub mod decision;
pub mod finished;
pub mod gauges;
pub mod leader;
pub mod memory;
pub mod nodes;
pub mod pages;
pub mod parking;
pub mod poll_plan;
pub mod poller;
pub mod ports;
pub mod reconcile;
pub mod sequence;
pub mod status;
pub mod ttl;

use crate::crd::DeviceOffboard;
use crate::metrics::{ErrorLabels, Metrics};
use crate::telemetry::{Liveness, LogFormat, Probes, Readiness};
use connections::ConnectionKey;
use decision::Settings;
use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use mde_client::{ConnectionArgs, DefenderClient, MdeError};
use ports::{KubeStore, MdeCalls};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error(
        "the resource changed while being written (409 Conflict); retrying with the latest version"
    )]
    Conflict,
    #[error("the resource has no metadata.uid")]
    MissingUid,
    #[error("the status write was interrupted before it landed")]
    Interrupted,
}

impl Error {
    /// A bounded label for `defender_offboard_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict => "conflict",
            Error::MissingUid => "missing_uid",
            Error::Interrupted => "interrupted",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared by every reconcile: built once. `M` is the MDE port: the client in
/// production, a fake in unit tests.
pub struct Context<M = DefenderClient> {
    pub client: kube::Client,
    /// The MDE client of each tenant: the operator's own, and one per
    /// `DefenderConnection` (`run --connections`).
    pub connections: Arc<connections::Connections<M>>,
    pub store: KubeStore,
    /// What this process remembers between reconciles (lookup clocks, machines).
    pub memory: memory::ProcessMemory,
    /// Red while a background task (the poller) is down.
    pub liveness: Liveness,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Resources waiting outside the cache until their `nextRetryAt`.
    pub parked: Arc<parking::ParkingLot>,
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
            connections::Connections::new(Some(mde), false),
            metrics,
            settings,
            instance,
        )
    }

    pub fn with_connections(
        client: kube::Client,
        connections: connections::Connections<M>,
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
            memory: memory::ProcessMemory::default(),
            liveness: Liveness::default(),
            metrics,
            settings,
            parked: Arc::default(),
        }
    }

    /// The ports one reconcile step runs against, with `mde` the tenant's client.
    pub fn ports<'a>(&'a self, mde: &'a M) -> sequence::Ports<'a, M, KubeStore> {
        sequence::Ports {
            mde,
            store: &self.store,
            memory: &self.memory,
            settings: &self.settings,
            metrics: &self.metrics,
        }
    }
}

/// First wait after a status write conflict: someone wrote in between, so
/// re-read and decide again soon; repeated conflicts back off to
/// [`CONFLICT_BACKOFF_CAP`] so writers fighting over one object spread out.
pub const CONFLICT_BACKOFF: Duration = Duration::from_millis(100);
pub const CONFLICT_BACKOFF_CAP: Duration = Duration::from_secs(10);

fn error_policy<M>(obj: Arc<DeviceOffboard>, error: &Error, ctx: Arc<Context<M>>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            error: error.metric_label().to_string(),
        })
        .inc();
    let in_a_row = obj
        .metadata
        .uid
        .as_deref()
        .map_or(1, |uid| ctx.memory.reconcile_errored(uid));
    if !matches!(error, Error::Conflict) {
        tracing::warn!(error = %error, in_a_row, "reconcile failed; retrying");
    }
    Action::requeue(error_wait(error, &ctx.settings, in_a_row))
}

/// How long to wait after the `in_a_row`-th failed reconcile of one resource:
/// exponential with jitter, from a short wait for conflicts and from
/// `--retry-backoff` for other errors, each up to a cap.
pub fn error_wait(error: &Error, settings: &Settings, in_a_row: u32) -> Duration {
    let previous = in_a_row.saturating_sub(1);
    match error {
        Error::Conflict => memory::backoff(CONFLICT_BACKOFF, CONFLICT_BACKOFF_CAP, previous),
        _ => memory::backoff(
            settings.retry_backoff,
            settings
                .retry_backoff
                .saturating_mul(sequence::RETRY_BACKOFF_CAP),
            previous,
        ),
    }
}

/// Flags of `defender-offboard run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Resources reconciled at the same time.
    #[arg(long, default_value_t = 8, env = "DEFENDER_CONCURRENCY")]
    pub concurrency: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Take a Lease before reconciling, so only one replica acts.
    #[arg(long, env = "LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name or host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Leader lease duration; a standby takes over after this long without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops all work if it cannot renew within this (must be < lease duration).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_renew_deadline: Duration,
    /// How often the lease is renewed or checked.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,
    #[arg(long, value_enum, default_value = "text", env = "LOG_FORMAT")]
    pub log_format: LogFormat,
    /// How often in-flight actions are polled (one batched call for all of them).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Pause before looking an action up after an ambiguous send. Keep it above
    /// --request-timeout: a request that timed out may still be processed by MDE.
    #[arg(long, default_value = "35s", value_parser = humantime::parse_duration)]
    pub lookup_delay: Duration,
    /// How far MDE's clock may be from ours: a poll's window of offboard
    /// actions starts this much before the earliest time one may have been created.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub clock_skew: Duration,
    /// How far back the index of this operator's offboards reaches: a first
    /// send for a machine without one in the index needs no read of the
    /// machine's actions (0 turns the index off: one read per first send).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub adopt_window: Duration,
    /// Retry delay after a transient failure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Retry delay after a credentials or permission failure.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub access_backoff: Duration,
    /// How often finished resources are checked against spec.ttlSecondsAfterFinished
    /// (a resource falling due sooner is deleted on time).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ttl_sweep_interval: Duration,
    #[command(flatten)]
    pub nodes: nodes::NodeArgs,
    /// Use DefenderConnections: a DeviceOffboard with spec.connectionRef is
    /// offboarded through that tenant and app (docs/tenants.md). The
    /// operator's own credentials become optional.
    #[arg(long, env = "DEFENDER_CONNECTIONS")]
    pub connections: bool,
    /// Hosts (`host` or `host:port`) besides Microsoft's login and MDE API
    /// hosts that a DefenderConnection's apiUrl/loginUrl may name, e.g. a
    /// simulator. The operator's own --api-url and --authority-host are allowed.
    #[arg(long, value_delimiter = ',', env = "DEFENDER_CONNECTION_ALLOWED_HOSTS")]
    pub connection_allowed_hosts: Vec<String>,
}

impl RunArgs {
    /// Node offboarding's options; its namespace defaults to the watched
    /// namespace, else the pod's.
    pub fn node_options(&self) -> nodes::NodeOptions {
        self.nodes
            .options(self.namespace.as_deref().unwrap_or(&self.lease_namespace))
    }

    pub fn lease_timing(&self) -> leader::LeaseTiming {
        leader::LeaseTiming {
            lease_duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        }
    }
}

/// `defender-offboard run`.
pub async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    crate::telemetry::init(args.log_format);
    if args.nodes.remove_node_finalizers {
        return remove_node_finalizers(&args).await;
    }
    if args.leader_elect {
        args.lease_timing().validate()?;
    }
    let metrics = Arc::new(Metrics::default());
    let mde = match default_client_config(&args)? {
        Some(config) => Some(DefenderClient::new(config, metrics.clone())?),
        None => {
            tracing::info!(
                "no credentials of its own: only DeviceOffboards with spec.connectionRef are offboarded"
            );
            None
        }
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (in-cluster config or KUBECONFIG): {e}"))?;
    check_crd_installed(&client, args.namespace.as_deref()).await?;
    if args.connections {
        check_connection_crd_installed(&client, args.namespace.as_deref()).await?;
    }
    if let Some(mde) = &mde {
        check_sign_in(mde).await?;
    }
    let readiness = Readiness::default();
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-addr {}: {e}", args.metrics_addr))?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("defender-offboard-{}", uuid::Uuid::new_v4()));
    warn_about_timings(&args);
    let settings = Settings {
        lookup_delay: args.lookup_delay,
        retry_backoff: args.retry_backoff,
        access_backoff: args.access_backoff,
    };
    let lease_clock = if args.leader_elect {
        leader::LeaseClock::candidate()
    } else {
        leader::LeaseClock::not_elected()
    };
    let ctx = Arc::new(Context {
        memory: memory::ProcessMemory::with_lease(lease_clock.clone()),
        ..Context::with_connections(
            client.clone(),
            connections::Connections::new(mde, args.connections),
            metrics.clone(),
            settings,
            Some(identity.clone()),
        )
    });
    let probes = Probes {
        readiness: readiness.clone(),
        liveness: ctx.liveness.clone(),
    };
    let server = tokio::spawn(crate::telemetry::serve(listener, metrics.clone(), probes));
    let shutdown = crate::telemetry::shutdown_signal();
    if args.leader_elect {
        let lease = leader::LeaseConfig {
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
            timing: args.lease_timing(),
        };
        let work = {
            let args = args.clone();
            let ctx = ctx.clone();
            move |stop| async move { run_with_connections(&args, ctx, stop).await }
        };
        leader::run_as_leader(
            client,
            &lease,
            lease_clock,
            metrics.leader.clone(),
            readiness,
            shutdown,
            work,
        )
        .await?;
    } else {
        readiness.set();
        run_with_connections(&args, ctx, shutdown).await;
    }
    server.abort();
    tracing::info!("stopped");
    Ok(())
}

/// The operator's own client settings; `None` when it runs with
/// `--connections` and no credentials of its own (no AZURE_TENANT_ID nor
/// AZURE_CLIENT_ID). Half-given credentials are an error either way.
fn default_client_config(args: &RunArgs) -> Result<Option<mde_client::ClientConfig>, String> {
    let own = &args.connection;
    let none_given = own.tenant_id.as_deref().is_none_or(str::is_empty)
        && own.client_id.as_deref().is_none_or(str::is_empty);
    if args.connections && none_given {
        return Ok(None);
    }
    Ok(Some(mde_client::ClientConfig {
        // A worker never waits for budget: the resource is requeued instead.
        budget_wait: mde_client::BudgetWait::Refuse,
        ..own.client_config()?
    }))
}

/// `run --remove-node-finalizers` (the chart's uninstall hook): needs no MDE
/// credentials, only the Kubernetes API.
async fn remove_node_finalizers(
    args: &RunArgs,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (in-cluster config or KUBECONFIG): {e}"))?;
    let stop = args
        .nodes
        .stop_deployment
        .as_deref()
        .map(|name| (args.lease_namespace.as_str(), name));
    let released =
        nodes::remove_finalizers(&client, &args.node_options(), stop, &Metrics::default()).await?;
    tracing::info!(
        released,
        "removed the node offboarding finalizer from every Node"
    );
    Ok(())
}

/// Sign in once at start: wrong credentials end the process with their
/// message; anything else (the login host briefly down) is retried on use.
async fn check_sign_in(mde: &DefenderClient) -> Result<(), String> {
    match mde.check_sign_in().await {
        Ok(()) => tracing::info!("signed in to MDE"),
        Err(error @ (MdeError::SignIn { .. } | MdeError::Credentials { .. })) => {
            return Err(error.to_string());
        }
        Err(error) => {
            tracing::warn!(error = %error, "sign-in check failed; will retry on first use")
        }
    }
    Ok(())
}

fn warn_about_timings(args: &RunArgs) {
    if args.lookup_delay < args.connection.request_timeout {
        tracing::warn!(
            lookup_delay = ?args.lookup_delay,
            request_timeout = ?args.connection.request_timeout,
            "--lookup-delay is shorter than --request-timeout: a timed-out request may still be processed by MDE after the lookup"
        );
    }
}

pub async fn check_crd_installed(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<(), String> {
    check_listable::<DeviceOffboard>(client, namespace, crate::crd::CRD_NAME, "").await
}

/// The CRD of `K` is installed and this process may list `K`; the error
/// names the fix. `flag` says which option needs it (empty: always needed).
async fn check_listable<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    crd_name: &str,
    flag: &str,
) -> Result<(), String>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let plural = K::plural(&Default::default()).to_string();
    let kind = K::kind(&Default::default()).to_string();
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(format!(
            "{flag}the {kind} CRD is not installed: kubectl apply -f crds/{crd_name}.yaml"
        )),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(format!(
            "{flag}not allowed to list {plural} ({}): check the operator's RBAC",
            status.message
        )),
        Err(error) => Err(format!("{flag}cannot list {plural}: {error}")),
    }
}

/// `--connections` needs the DefenderConnection CRD and the right to read it.
pub async fn check_connection_crd_installed(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<(), String> {
    check_listable::<crate::connection::DefenderConnection>(
        client,
        namespace,
        crate::connection::CONNECTION_CRD_NAME,
        "--connections: ",
    )
    .await
}

/// With `--connections`, the DefenderConnection tasks beside the controller
/// (on the leader only: they write the connections' status).
pub async fn run_with_connections(
    args: &RunArgs,
    ctx: Arc<Context<DefenderClient>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let connections = args.connections.then(|| {
        let shared = connection_controller::Shared {
            client: ctx.client.clone(),
            connections: ctx.connections.clone(),
            metrics: ctx.metrics.clone(),
            settings: connection_controller::ClientSettings {
                rate_limits: args.connection.rate_limit.clone(),
                request_timeout: args.connection.request_timeout,
                allow_insecure_http: args.connection.allow_insecure_http,
                allowed_hosts: allowed_hosts(args),
            },
            budgets: connection_controller::Budgets::default(),
            reporter: ctx.store.reporter.clone(),
        };
        AbortOnDrop(tokio::spawn(connection_controller::run(
            shared,
            args.namespace.clone(),
        )))
    });
    run_controller(args, ctx, shutdown).await;
    drop(connections);
}

/// `--connection-allowed-hosts`, and the hosts of the operator's own
/// `--api-url` and `--authority-host`.
fn allowed_hosts(args: &RunArgs) -> Vec<String> {
    let own = [&args.connection.api_url, &args.connection.authority_host]
        .into_iter()
        .flatten()
        .filter_map(|u| url::Url::parse(u).ok())
        .filter_map(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)));
    args.connection_allowed_hosts
        .iter()
        .filter(|h| !h.trim().is_empty())
        .cloned()
        .chain(own)
        .collect()
}

/// The controller and the batch poller, until `shutdown` resolves.
pub async fn run_controller<M: MdeCalls>(
    args: &RunArgs,
    ctx: Arc<Context<M>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<DeviceOffboard> = match &args.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    ctx.memory.use_adopt_index(args.adopt_window);
    seed_budget_from_history(&api, &ctx, args.connection.request_timeout).await;
    // Finished resources are left out of the watch (and so of memory), and
    // what the controller never reads is dropped before an object is cached.
    let watch = watcher::Config::default()
        .any_semantic()
        .labels(finished::WATCH_SELECTOR);
    let (reader, writer) = reflector::store();
    // Resources that wait long are parked outside the cache, and read back
    // into its feed (`revived`) shortly before their time.
    let (revive, revived) = tokio::sync::mpsc::channel::<DeviceOffboard>(64);
    let revived = futures::stream::unfold(revived, |mut rx| async move {
        let obj = rx.recv().await?;
        Some((Ok(watcher::Event::Apply(obj)), rx))
    });
    let events = futures::stream::select(watcher(api.clone(), watch).default_backoff(), revived)
        .modify(finished::trim_for_cache);
    let objects = parking::park_events(events, ctx.parked.clone())
        .reflect(writer)
        .applied_objects();
    let waker = AbortOnDrop(tokio::spawn(parking::wake(
        ctx.parked.clone(),
        ctx.client.clone(),
        revive,
    )));
    let controller = Controller::for_stream(objects, reader)
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .graceful_shutdown_on(shutdown);
    // Aborted when this future ends or is dropped (e.g. a lost lease aborts
    // the whole controller): a detached poller would keep writing.
    let (store, poller_ctx, interval) = (controller.store(), ctx.clone(), args.poll_interval);
    let poller = AbortOnDrop(tokio::spawn(poller::run_per_connection(
        store,
        poller_ctx,
        interval,
        args.clock_skew,
    )));
    let ttl = AbortOnDrop(tokio::spawn(ttl::run(
        api.clone(),
        KubeStore {
            client: ctx.client.clone(),
            reporter: ctx.store.reporter.clone(),
        },
        ctx.metrics.clone(),
        args.ttl_sweep_interval,
    )));
    // Only where the controller runs: on the leader when leader election is on.
    let nodes = args.nodes.offboard_deleted_nodes.then(|| {
        AbortOnDrop(tokio::spawn(nodes::run(
            ctx.client.clone(),
            args.node_options(),
            ctx.metrics.clone(),
            nodes::RETRY_INTERVAL,
        )))
    });
    let gauges = AbortOnDrop(tokio::spawn(gauges::run(
        controller.store(),
        ctx.clone(),
        GAUGE_INTERVAL,
    )));
    controller
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(error = %error, "controller event");
            }
        })
        .await;
    drop(poller);
    drop((gauges, ttl, nodes, waker));
}

/// A task handle that aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A new process (after a restart or a leader change) does not know the
/// offboards its predecessor sent in the current windows; the resources'
/// `submittedAt` tell it, so the budget starts where the predecessor left it.
/// Read in pages, keeping only the times within the longest window: a
/// cluster's history of finished resources never sits in memory at once.
async fn seed_budget_from_history<M: MdeCalls>(
    api: &Api<DeviceOffboard>,
    ctx: &Context<M>,
    request_timeout: Duration,
) {
    let now_instant = tokio::time::Instant::now();
    let now = jiff::Timestamp::now();
    let mut past: HashMap<ConnectionKey, Vec<Duration>> = HashMap::new();
    let mut pages = pages::Pages::new(SEED_PAGE);
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
pub fn recent_submissions<'a>(
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

/// Resources read per page when seeding the budget.
const SEED_PAGE: u32 = 500;

/// How often the budget-left and in-flight-age gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// The longest window worth remembering (MDE's hourly limit).
const MAX_BUDGET_MEMORY: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod sequence_tests;
#[cfg(test)]
mod verifier_tests;

#[cfg(test)]
mod error_policy_tests {
    use super::*;

    /// Conflicts in a row back off from 100 ms and grow, instead of a fixed
    /// 100 ms that keeps two writers colliding; other errors start from
    /// `--retry-backoff`. Both stay under their caps (jitter adds at most one
    /// more delay).
    #[test]
    fn repeated_errors_back_off_exponentially_to_a_cap() {
        let settings = Settings::default();
        let conflict = |n| error_wait(&Error::Conflict, &settings, n);
        assert!(conflict(1) >= CONFLICT_BACKOFF && conflict(1) < CONFLICT_BACKOFF * 3);
        assert!(conflict(5) >= CONFLICT_BACKOFF * 16, "{:?}", conflict(5));
        for n in [20, 1000, u32::MAX] {
            assert!(conflict(n) >= CONFLICT_BACKOFF_CAP.min(CONFLICT_BACKOFF * 64));
            assert!(conflict(n) <= CONFLICT_BACKOFF_CAP * 2, "{:?}", conflict(n));
        }
        let other = error_wait(&Error::Interrupted, &settings, 1);
        assert!(other >= settings.retry_backoff, "{other:?}");
        let capped = error_wait(&Error::Interrupted, &settings, 200);
        assert!(capped <= settings.retry_backoff * sequence::RETRY_BACKOFF_CAP * 2);
    }

    /// The count is per resource and starts over after a reconcile that did
    /// not fail.
    #[test]
    fn the_error_count_is_per_resource_and_resets() {
        let memory = memory::ProcessMemory::default();
        assert_eq!(memory.reconcile_errored("a"), 1);
        assert_eq!(memory.reconcile_errored("a"), 2);
        assert_eq!(memory.reconcile_errored("b"), 1);
        memory.reconcile_ok("a");
        assert_eq!(memory.reconcile_errored("a"), 1);
        assert_eq!(memory.reconcile_errored("b"), 2);
    }
}
