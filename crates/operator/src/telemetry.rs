//! Logs, the metrics/health endpoint and shutdown signals.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Whether the process is healthy; read by `/healthz`. A background task
/// that died (the poller) turns it red with a reason until it is restarted.
#[derive(Clone, Default)]
pub struct Liveness(Arc<std::sync::Mutex<Option<String>>>);

impl Liveness {
    pub fn failing(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
    }
    pub fn recovered(&self) {
        *self.lock() = None;
    }
    /// `None` while healthy, else why not.
    pub fn problem(&self) -> Option<String> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The probes `/healthz` and `/readyz` answer from.
#[derive(Clone, Default)]
pub struct Probes {
    pub readiness: Readiness,
    pub liveness: Liveness,
}

/// Set once the controller is watching, unless the operator's own
/// credentials cannot offboard and read; read by `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness {
    watching: Arc<AtomicBool>,
    access_problem: Arc<std::sync::Mutex<Option<String>>>,
}

impl Readiness {
    pub fn set(&self) {
        self.watching.store(true, Ordering::SeqCst)
    }
    /// What the operator's own credentials lack (`None`: nothing).
    pub fn set_access_problem(&self, problem: Option<String>) {
        *self
            .access_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = problem;
    }
    pub fn is_ready(&self) -> bool {
        self.problem().is_none()
    }
    /// Why `/readyz` fails, if it does.
    pub fn problem(&self) -> Option<String> {
        let access = self
            .access_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match access {
            Some(problem) => Some(problem),
            None if !self.watching.load(Ordering::SeqCst) => Some("starting".into()),
            None => None,
        }
    }
}

/// Logs to stderr, `RUST_LOG` filtering (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    probes: Probes,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>, probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(live_handler))
        .route("/readyz", get(ready_handler))
        .with_state(Health { metrics, probes })
}

async fn live_handler(State(health): State<Health>) -> impl IntoResponse {
    match health.probes.liveness.problem() {
        None => (StatusCode::OK, "ok".to_string()),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, problem),
    }
}

async fn metrics_handler(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

async fn ready_handler(State(health): State<Health>) -> impl IntoResponse {
    match health.probes.readiness.problem() {
        None => (StatusCode::OK, "ready".to_string()),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, problem),
    }
}

/// How the endpoint guards itself against clients that hold connections
/// open (it is reachable by whatever the network lets reach the pod).
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send its request's head.
    pub header_read_timeout: std::time::Duration,
    /// The longest a connection lives, its response included.
    pub connection_timeout: std::time::Duration,
}

impl Default for ServeLimits {
    /// A scraper and the kubelet's probes need a few connections, each a
    /// few milliseconds: 32 at once, 5 s for a request head, 30 s in all.
    fn default() -> Self {
        ServeLimits {
            max_connections: 32,
            header_read_timeout: std::time::Duration::from_secs(5),
            connection_timeout: std::time::Duration::from_secs(30),
        }
    }
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, probes: Probes) {
    serve_with(listener, router(metrics, probes), ServeLimits::default()).await
}

/// The accept loop. By hand because `axum::serve` sets neither a connection
/// limit nor a header-read timeout; hyper does the HTTP, with keep-alive off
/// so every connection ends with its one response (a scrape opens another).
pub async fn serve_with(listener: tokio::net::TcpListener, app: Router, limits: ServeLimits) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(%error, "could not accept a metrics connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::default());
        metrics.record_request("default", "offboard", 429);
        let probes = Probes::default();
        let readiness = probes.readiness.clone();
        let app = router(metrics, probes.clone());
        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
        probes.liveness.failing("the poller stopped; restarting it");
        let (status, text) = get(app.clone(), "/healthz").await;
        assert_eq!(
            (status, text.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the poller stopped; restarting it"
            )
        );
        probes.liveness.recovered();
        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(app.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        readiness.set();
        assert_eq!(get(app.clone(), "/readyz").await.0, StatusCode::OK);
        // The operator's own credentials lacking a permission: not ready,
        // and the probe says what to grant.
        readiness.set_access_problem(Some("PermissionDenied: grant Machine.Read.All".into()));
        let (status, text) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("Machine.Read.All"), "{text}");
        readiness.set_access_problem(None);
        assert_eq!(get(app.clone(), "/readyz").await.0, StatusCode::OK);
        let (status, text) = get(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains(
                r#"defender_offboard_mde_requests_total{connection="default",family="offboard",code="429"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"defender_offboard_mde_throttled_total{connection="default",family="offboard"} 1"#
            ),
            "{text}"
        );
    }

    /// A client that opens connections and sends nothing holds a slot for
    /// the header-read timeout at most: with every slot taken, a scrape
    /// waits and is then served.
    #[tokio::test]
    async fn idle_connections_are_closed_and_cannot_starve_a_scrape() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServeLimits {
            max_connections: 2,
            header_read_timeout: std::time::Duration::from_millis(300),
            connection_timeout: std::time::Duration::from_secs(5),
        };
        let app = router(Arc::new(Metrics::default()), Probes::default());
        let server = tokio::spawn(serve_with(listener, app, limits));
        let started = std::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            scrape.read_to_string(&mut answer),
        )
        .await
        .expect("the scrape is served once the idle connections time out")
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(250),
            "both slots were held by the idle connections"
        );
        for mut stream in idle {
            let mut buf = Vec::new();
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                stream.read_to_end(&mut buf),
            )
            .await;
            assert!(read.is_ok(), "an idle connection was closed");
        }
        server.abort();
    }
}
