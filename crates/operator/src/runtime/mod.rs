//! The runtime room: the composition root of `defender-offboard run`. It
//! builds every room's parts from the configuration, checks the CRDs, takes
//! the leader's lease, seeds the budgets and supervises the background tasks.
//! Nothing else in the crate imports it. See docs/architecture.md.

pub mod budget_seed;
pub mod crd_check;
pub mod gauges;
pub mod leader;

pub use crd_check::{check_connection_crd_installed, check_crd_installed};

use crate::cache::{final_label, parked};
use crate::crd::DeviceOffboard;
use crate::lease_clock::LeaseClock;
use crate::metrics::Metrics;
use crate::nodes;
use crate::offboard::decision::Settings;
use crate::offboard::{Context, KubeStore, MdeCalls, poller, reconcile};
use crate::tasks::AbortOnDrop;
use crate::telemetry::{LogFormat, Probes, Readiness};
use crate::tenants::{self, Connections};
use crate::ttl;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use mde_client::{ConnectionArgs, DefenderClient, MdeError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
        LeaseClock::candidate()
    } else {
        LeaseClock::not_elected()
    };
    let ctx = Arc::new(Context {
        state: crate::offboard::state::OffboardState::with_lease(lease_clock.clone()),
        ..Context::with_connections(
            client.clone(),
            Connections::new(mde, args.connections),
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

/// With `--connections`, the DefenderConnection tasks beside the controller
/// (on the leader only: they write the connections' status).
pub async fn run_with_connections(
    args: &RunArgs,
    ctx: Arc<Context<DefenderClient>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let connections = args.connections.then(|| {
        let shared = tenants::controller::Shared {
            client: ctx.client.clone(),
            connections: ctx.connections.clone(),
            metrics: ctx.metrics.clone(),
            settings: tenants::controller::ClientSettings {
                rate_limits: args.connection.rate_limit.clone(),
                request_timeout: args.connection.request_timeout,
                allow_insecure_http: args.connection.allow_insecure_http,
                allowed_hosts: allowed_hosts(args),
            },
            budgets: tenants::controller::Budgets::default(),
            reporter: ctx.store.reporter.clone(),
        };
        AbortOnDrop(tokio::spawn(tenants::controller::run(
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
    ctx.state.adopt.use_window(args.adopt_window);
    budget_seed::seed_budget_from_history(&api, &ctx, args.connection.request_timeout).await;
    // Finished resources are left out of the watch (and so of memory), and
    // what the controller never reads is dropped before an object is cached.
    let watch = watcher::Config::default()
        .any_semantic()
        .labels(final_label::WATCH_SELECTOR);
    let (reader, writer) = reflector::store();
    // Resources that wait long are parked outside the cache, and read back
    // into its feed (`revived`) shortly before their time.
    let (revive, revived) = tokio::sync::mpsc::channel::<DeviceOffboard>(64);
    let revived = futures::stream::unfold(revived, |mut rx| async move {
        let obj = rx.recv().await?;
        Some((Ok(watcher::Event::Apply(obj)), rx))
    });
    let events = futures::stream::select(watcher(api.clone(), watch).default_backoff(), revived)
        .modify(final_label::trim_for_cache);
    let objects = parked::park_events(events, ctx.parked.clone())
        .reflect(writer)
        .applied_objects();
    let waker = AbortOnDrop(tokio::spawn(parked::wake(
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
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(error = %error, "controller event");
            }
        })
        .await;
    drop(poller);
    drop((gauges, ttl, nodes, waker));
}

/// How often the budget-left and in-flight-age gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
