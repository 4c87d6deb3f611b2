//! A faithful Microsoft Defender for Endpoint API simulator (`defender-offboard simulate`).
//!
//! It serves the Azure AD v2 client-credentials token endpoint, machines (with OData
//! `$filter`/`$top`/`$skip` and `@odata.nextLink`), offboard, machine actions with
//! time-driven progression and cancel, MDE's rate limits with `Retry-After`, and
//! fault injection. `/_sim/*` routes expose counters and runtime controls.
//!
//! Time: `time_scale` divides rate-limit windows, action schedules, token lifetime
//! and injected latency, so an hour of MDE budget can pass in seconds. Everything a
//! client sees (`expires_in`, `Retry-After`, timestamps) is in wall-clock time under
//! those scaled durations, so a client that honours them behaves correctly unchanged.
//!
//! Embed it with [`spawn`]; run it standalone with [`run`].
//!
//! # Faults and quirks
//!
//! Each is a `simulate` flag, a field of [`FaultConfig`] and a field of the JSON
//! `POST /_sim/faults` takes (only the fields given change). The `dev` playground
//! passes them through with a `sim-` prefix (`--sim-fault-nulls`), using the public
//! value parsers ([`parse_share`], [`parse_rate_limits`], [`parse_time_scale`]) and
//! mode enums re-exported here.
//!
//! | flag | `/_sim/faults` field | effect |
//! |---|---|---|
//! | `--fault-error-rate SHARE` | `error_rate` | that share of API calls is answered 500/503 before anything happens |
//! | `--fault-latency DURATION` | `latency` | added to every API call (simulated time) |
//! | `--fault-lost-response-rate SHARE` | `lost_response_rate` | that share of offboards creates the action, then loses the answer |
//! | `--fault-lost-response-mode drop\|504\|mixed` | `lost_response_mode` | how it is lost ([`LostResponseMode`]) |
//! | `--fault-list-lag DURATION` | `list_lag` | a new action stays out of `GET /api/machineactions?$filter=...` answers that long after creation (simulated time); `GET /api/machineactions/{id}` finds it at once |
//! | `--fault-next-link normal\|repeat\|mangled` | `next_link` | `@odata.nextLink` of lists without `$top` that need more than one page: the next page, the same page forever, or MDE's mangled link (`?=...&=10000&$skip=N`) that lists unfiltered and keeps coming ([`NextLinkMode`]) |
//! | `--fault-retry-after seconds\|http-date\|missing\|huge` | `retry_after` | how a 429 carries `Retry-After`: seconds, an HTTP date, none, or `1e19` ([`RetryAfterMode`]) |
//! | `--fault-pending-conflict-wording code\|message-only` | `pending_conflict_wording` | a second offboard while one is pending: `400 ActiveRequestAlreadyExists`, or `400 BadRequest` "Action is already in progress" ([`PendingConflictWording`]) |
//! | `--fault-nulls` | `nulls` | machines and machine actions carry `null` for every optional field |
//! | `--fault-list-404-rate SHARE` | `list_404_rate` | that share of machine-action list answers is `404 {"error":{"code":"ResourceNotFound","message":"Not found","target":...}}` |
//! | `--fault-refuse-in` | `refuse_in` | every `$filter` using `in` (machines and machine actions) is answered `400` with OData's empty-code error |
//!
//! `POST /_sim/token-outage {"seconds": N}` takes the token endpoint down for N
//! wall-clock seconds (Azure AD's `503 temporarily_unavailable`); tokens already
//! issued keep working, so pair it with `POST /_sim/revoke-tokens` to make
//! clients sign in during the outage.
//!
//! Always on, as MDE does: a list with `$top` (at most 10000) answers up to `$top`
//! entities with no `@odata.nextLink`; a query option starting with `$` other than
//! `$filter`, `$top`, `$skip`, `$select`, `$orderby`, `$count` and `$expand` is
//! refused with MDE's `400` whose `code` is empty; `$orderby` (`property
//! [asc|desc]`, e.g. `creationDateTimeUtc desc`) sorts by a filterable
//! property and refuses any other the same way. String comparisons and
//! `startswith`/`endswith`/`contains` ignore case. Every error body carries
//! `target`, a fresh correlation id: `{"error":{"code","message","target"}}`.
//!
//! # Records, permissions, platforms, certificates
//!
//! Every machine has `onboardingStatus`, `healthStatus` (`null` for a device
//! found by device discovery, `CanBeOnboarded`), `lastSeen`, `osPlatform`,
//! and Azure VMs `vmMetadata` (`vmId`, `cloudProvider`, `resourceId`,
//! `subscriptionId`). [`EXAMPLE_MACHINES`] lists the fixed records, the `dev`
//! playground's Nodes among them (their [`ExampleVm`]); `dc-01.contoso.com`
//! carries the machine tag [`PROTECTED_EXAMPLE_TAG`]. An offboard of a
//! discovered record is refused `400 BadRequest`; one of a stale record
//! (`Inactive`) is never picked up and ends `TimeOut`.
//! [`SimConfig::real_tenant`] (`--real-tenant`) adds a stale twin beside every
//! example name and a discovered twin beside every generated name;
//! [`SimHandle::machines`] lists them all.
//!
//! Reads need `Machine.Read.All` or `Machine.ReadWrite.All` among
//! [`SimConfig::roles`], offboard `Machine.Offboard` (else `403 Forbidden`
//! naming them); [`SimConfig::token_without_roles`] (`--token-without-roles`)
//! leaves the `roles` claim out of tokens. [`SimConfig::offboard_platforms`]
//! (`--offboard-platforms all|windows-only`) says whether Linux and macOS are
//! refused `400 OsPlatformNotSupported`; `build-agent-03` is refused either way.
//!
//! A client assertion whose header names a certificate must be `PS256` with
//! `x5t#S256` (SHA-256 of the certificate's DER) or `RS256` with `x5t`
//! (SHA-1), signed by one of [`SimConfig::client_certificates`]
//! (`--client-certificate FILE`), with `aud` the token endpoint, `iss` =
//! `sub` = the client id, a `jti`, and now between `nbf` and `exp`;
//! otherwise Entra's `401 invalid_client` (`AADSTS700027` and kin). An
//! assertion naming no certificate (a federated token) is taken as it comes.
//!
//! # A tenant's past
//!
//! [`SimConfig::history`] seeds machines with offboards that ended before the
//! start ([`MachineHistory`], [`PastOffboard`]: e.g. a `Succeeded` one of 60
//! days ago carrying another request's marker) and sets when MDE last saw
//! each machine: seen after the offboard ended means onboarded again.
//! [`SimConfig::bulk_history`] adds thousands of old offboards of machines no
//! longer in the inventory, so a window read needs several pages of `$top`.
//! Like MDE, nothing older than [`ACTION_RETENTION`] (180 days) is kept.
//! [`SimConfig::prior_calls`] counts calls made before the start in the
//! rate-limit windows (a process before a restart, whose reads the next one
//! cannot know of): the first calls of a family are answered `429` until the
//! oldest of them leave. [`SimConfig::check`] refuses a past that cannot
//! have happened; [`spawn`] calls it.
//!
//! # Counting offboards and cancels
//!
//! [`SimStats::offboard_requests_by_key`] and
//! [`SimStats::offboard_requests_by_machine`] count every offboard POST that
//! could have created an action (all but `401`/`429` refusals) under the key
//! of the `[defender-offboard:KEY]` marker at the start of its `Comment`, and
//! under the machine; that, not [`SimStats::duplicate_offboards`] (actions
//! created), is where "exactly once" is asserted.
//! [`SimStats::unproven_offboard_requests_by_machine`] counts the POSTs for a
//! machine that followed an earlier one with no read in between showing that
//! nothing stands for the machine ("at most one POST per machine unless a
//! proving read showed none"), and [`SimStats::offboarded_again_by_machine`]
//! the actions created while the machine was offboarded already.
//! [`SimStats::cancel_requests_by_action`] counts cancel POSTs per action;
//! [`SimStats::first_offboard_request_ms`] says when the first offboard came.
//! A second offboard while one is `Pending` or `InProgress` is refused with
//! `400 ActiveRequestAlreadyExists`, as MDE does.

mod actions;
mod api;
mod auth;
mod certificates;
mod config;
mod control;
mod faults;
mod history;
mod machines;
mod odata;
mod ratelimit;
mod responses;
mod server;
mod stats;
mod store;

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use actions::Status as ActionStatus;
pub use config::{
    DEFAULT_RATE_LIMITS, DEFAULT_ROLES, FaultConfig, LostResponseMode, NextLinkMode,
    OffboardPlatforms, PendingConflictWording, RateLimit, RateLimits, RetryAfterMode, SimConfig,
    SimulateArgs, WindowMode, parse_rate_limits, parse_share, parse_time_scale,
};
pub use history::{ACTION_RETENTION, BulkHistory, MachineHistory, PastOffboard, PriorCalls};
pub use machines::{
    EXAMPLE_MACHINES, ExampleMachine, ExampleOffboard, ExampleRecord, ExampleVm,
    PLAYGROUND_SUBSCRIPTION, PROTECTED_EXAMPLE_TAG,
};
pub use stats::{CORRELATION_MARKER, SimStats, correlation_key};

use store::Shared;

/// A running simulator. Dropping it stops the server as well.
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, the base for both the token endpoint and the API.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Azure AD v2 token endpoint of `tenant`.
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base_url())
    }

    /// The configuration it serves (tenant, app, secret, limits).
    pub fn config(&self) -> SimConfig {
        self.shared.lock().config.clone()
    }

    /// Every machine record as `GET /api/machines` serves it (twins of
    /// [`SimConfig::real_tenant`] included), for tests that need the ids.
    pub fn machines(&self) -> Vec<serde_json::Value> {
        self.shared.lock().machines_json().as_ref().clone()
    }

    /// A snapshot of the counters (same as `GET /_sim/stats`).
    pub fn stats(&self) -> SimStats {
        self.shared.lock().stats.clone()
    }

    /// Stops accepting connections, lets open ones finish their current request and
    /// waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Starts the simulator on `listener` (bind port 0 for tests) in the background.
pub async fn spawn(config: SimConfig, listener: TcpListener) -> std::io::Result<SimHandle> {
    config
        .check()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(config, addr));
    let router = server::router(shared.clone());
    let (shutdown, receiver) = watch::channel(false);
    let task = tokio::spawn(server::serve(listener, router, receiver));
    Ok(SimHandle {
        addr,
        shared,
        shutdown,
        task: Some(task),
    })
}

/// `defender-offboard simulate`: serves until Ctrl-C or SIGTERM.
pub async fn run(args: SimulateArgs) -> Result<(), Box<dyn Error + Send + Sync>> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let listen = args.listen;
    let config = args.into_config();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} (--listen): {e}"))?;
    let (tenant, client) = (config.tenant_id.clone(), config.client_id.clone());
    let handle = spawn(config, listener).await?;
    let base = handle.base_url();
    // The secret is deliberately not printed.
    println!("MDE simulator listening on {base}");
    println!(
        "  token endpoint: {base}/{tenant}/oauth2/v2.0/token (tenant {tenant}, client {client})"
    );
    println!("  API base:       {base}/api");
    println!("  stats:          {base}/_sim/stats");
    wait_for_signal().await?;
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
