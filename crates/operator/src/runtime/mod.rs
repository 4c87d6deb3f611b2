//! The runtime room: the composition root of `defender-offboard run`. It
//! builds every room's parts from the configuration, checks the CRDs, takes
//! the leader's lease, seeds the budgets and supervises the background tasks.
//! Nothing else in the crate imports it. See docs/architecture.md.

pub(crate) mod budget_seed;
pub(crate) mod crd_check;
pub(crate) mod gauges;
pub mod leader;

pub use crd_check::{check_connection_crd_installed, check_crd_installed};

use crate::cache::{final_label, parked, stray_label};
use crate::crd::DeviceOffboard;
use crate::lease_clock::LeaseClock;
use crate::metrics::Metrics;
use crate::nodes;
use crate::nodes::NodeOptions;
use crate::offboard::decision::Settings;
use crate::offboard::{Context, KubeStore, MdeCalls, poller, reconcile};
use crate::runtime::leader::LeaseTiming;
use crate::tasks::AbortOnDrop;
use crate::telemetry::{LogFormat, Probes, Readiness};
use crate::tenants::controller::ClientSettings;
use crate::tenants::{self, Connections};
use crate::ttl;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use mde_client::{ClientConfig, DefenderClient, MdeError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What `defender-offboard run` runs with, built from the command line at
/// the edge (the binary's `cli`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch one namespace only (`None`: all).
    pub namespace: Option<String>,
    /// What every tenant's client shares.
    pub clients: ClientSettings,
    pub concurrency: u16,
    pub metrics_addr: SocketAddr,
    pub leader_elect: bool,
    pub lease_namespace: String,
    pub identity: Option<String>,
    pub lease_timing: LeaseTiming,
    pub log_format: LogFormat,
    pub poll_interval: Duration,
    pub clock_skew: Duration,
    /// Zero turns the adopt index off; otherwise it covers
    /// `settings.adopt_window`, the window of the rule it serves.
    pub adopt_window: Duration,
    pub settings: Settings,
    pub ttl_sweep_interval: Duration,
    pub nodes: NodeOptions,
    pub offboard_deleted_nodes: bool,
    pub remove_node_finalizers: bool,
    pub stop_deployment: Option<String>,
    pub connections: bool,
    /// The namespaces the operator's own credentials serve.
    pub default_namespaces: crate::tenants::DefaultNamespaces,
}

/// `defender-offboard run`, with the operator's own MDE client (`None`:
/// without credentials of its own, only connections serve resources).
pub async fn run(
    args: Config,
    own_client: Option<ClientConfig>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    crate::telemetry::init(args.log_format);
    if args.remove_node_finalizers {
        return remove_node_finalizers(&args).await;
    }
    if args.leader_elect {
        args.lease_timing.validate()?;
    }
    if let Some(warning) = crate::offboard::decision::lookup_delay_warning(
        args.settings.lookup_delay,
        args.clients.request_timeout,
    ) {
        tracing::warn!("{warning}");
    }
    let metrics = Arc::new(Metrics::default());
    let mde = match own_client {
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
    let _own_access = mde
        .clone()
        .map(|mde| AbortOnDrop(tokio::spawn(watch_own_access(mde, readiness.clone()))));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-addr {}: {e}", args.metrics_addr))?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("defender-offboard-{}", uuid::Uuid::new_v4()));
    warn_about_timings(&args);
    let settings = args.settings.clone();
    let lease_clock = if args.leader_elect {
        LeaseClock::candidate()
    } else {
        LeaseClock::not_elected()
    };
    let ctx = Arc::new(Context {
        state: crate::offboard::state::OffboardState::with_lease(lease_clock.clone()),
        ..Context::with_connections(
            client.clone(),
            Connections::new(mde, args.connections)
                .with_default_namespaces(args.default_namespaces.clone()),
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
            timing: args.lease_timing,
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

/// `run --remove-node-finalizers` (the chart's uninstall hook): needs no MDE
/// credentials, only the Kubernetes API.
async fn remove_node_finalizers(
    args: &Config,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (in-cluster config or KUBECONFIG): {e}"))?;
    let stop = args
        .stop_deployment
        .as_deref()
        .map(|name| (args.lease_namespace.as_str(), name));
    let released =
        nodes::remove_finalizers(&client, &args.nodes, stop, &Metrics::default()).await?;
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

/// The operator's own credentials, judged as a connection's are (may they
/// offboard and read?) now and every [`tenants::controller::RECHECK_READY`]:
/// `/readyz` fails with what to grant while they cannot, so a rollout with
/// an app lacking `Machine.Read.All` stops at the first pod.
async fn watch_own_access(mde: DefenderClient, readiness: Readiness) {
    let mut last: Option<tenants::access::Readiness> = None;
    loop {
        let now = tenants::access::check(&mde).await;
        if last.as_ref() != Some(&now) {
            if now.ready {
                tracing::info!(reason = now.reason, "{}", now.message);
            } else {
                tracing::error!(
                    reason = now.reason,
                    "the operator's own credentials: {}",
                    now.message
                );
            }
        }
        readiness.set_access_problem(
            (!now.ready && !now.is_transient()).then(|| format!("{}: {}", now.reason, now.message)),
        );
        last = Some(now);
        tokio::time::sleep(tenants::controller::RECHECK_READY).await;
    }
}

fn warn_about_timings(args: &Config) {
    if args.settings.lookup_delay < args.clients.request_timeout {
        tracing::warn!(
            lookup_delay = ?args.settings.lookup_delay,
            request_timeout = ?args.clients.request_timeout,
            "--lookup-delay is shorter than --request-timeout: a timed-out request may still be processed by MDE after the lookup"
        );
    }
}

/// With `--connections`, the DefenderConnection tasks beside the controller
/// (on the leader only: they write the connections' status).
pub async fn run_with_connections(
    args: &Config,
    ctx: Arc<Context<DefenderClient>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    ctx.slots.set_per_connection(args.concurrency.into());
    let http = match mde_client::SharedHttp::new(args.clients.request_timeout) {
        Ok(http) => Some(http),
        Err(error) => {
            tracing::error!(error = %error, "DefenderConnections are not served");
            None
        }
    };
    let connections = http.filter(|_| args.connections).map(|http| {
        let shared = tenants::controller::Shared {
            client: ctx.client.clone(),
            connections: ctx.connections.clone(),
            metrics: ctx.metrics.clone(),
            settings: args.clients.clone(),
            budgets: tenants::controller::Budgets::default(),
            http,
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

/// The controller and the batch poller, until `shutdown` resolves.
pub async fn run_controller<M: MdeCalls>(
    args: &Config,
    ctx: Arc<Context<M>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<DeviceOffboard> = match &args.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // The index covers exactly the window in which another request's
    // succeeded offboard may stand for a machine, so whether it holds an
    // action or not never changes what is decided (zero: no index).
    let index_window = if args.adopt_window.is_zero() {
        Duration::ZERO
    } else {
        args.settings.adopt_window
    };
    ctx.state.adopt.use_window(index_window);
    budget_seed::seed_budget_from_history(&api, &ctx, args.clients.request_timeout).await;
    // Finished resources are left out of the watch (and so of memory), and
    // what the controller never reads is dropped before an object is cached.
    let watch = watcher::Config::default()
        .page_size(crate::pages::FULL_OBJECT_PAGE)
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
        .with_config(ControllerConfig::default().concurrency(
            crate::offboard::tenant_slots::global_concurrency(args.concurrency),
        ))
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
    // A final label on a resource whose status is not final hides it from
    // the watch above: removed here, beside the controller (it writes, so
    // only on the leader), by a watch of its own that keeps no store.
    let stray_labels = AbortOnDrop(tokio::spawn(stray_label::run(
        api.clone(),
        ctx.store.reporter.clone(),
        ctx.metrics.clone(),
    )));
    // Only where the controller runs: on the leader when leader election is on.
    let nodes = args.offboard_deleted_nodes.then(|| {
        AbortOnDrop(tokio::spawn(nodes::run(
            ctx.client.clone(),
            args.nodes.clone(),
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
    drop((gauges, ttl, nodes, waker, stray_labels));
}

/// How often the budget-left and in-flight-age gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
