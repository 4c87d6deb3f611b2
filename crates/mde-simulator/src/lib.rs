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

mod actions;
mod api;
mod auth;
mod config;
mod control;
mod faults;
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
    DEFAULT_RATE_LIMITS, DEFAULT_ROLES, FaultConfig, LostResponseMode, RateLimit, RateLimits,
    SimConfig, SimulateArgs, WindowMode, parse_rate_limits,
};
pub use machines::{EXAMPLE_MACHINES, ExampleMachine, ExampleOffboard};
pub use stats::SimStats;

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
