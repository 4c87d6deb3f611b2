//! Routing, request accounting and the connection loop.
//!
//! The loop drives hyper directly instead of `axum::serve` so that a handler can
//! make its connection close without an answer (a lost response): the service
//! returns an error, hyper stops the connection and drops the socket.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::api::{self, DropConnection};
use super::responses::not_found;
use super::store::{Family, Shared};
use super::{auth, control};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(auth::token))
        .route("/api/machines", get(api::list_machines))
        .route("/api/machines/{id}", get(api::get_machine))
        .route("/api/machines/{id}/offboard", post(api::offboard))
        .route("/api/machineactions", get(api::list_actions))
        .route("/api/machineactions/{id}", get(api::get_action))
        .route("/api/machineactions/{id}/cancel", post(api::cancel_action))
        .route("/_sim/stats", get(control::stats))
        .route("/_sim/throttle", post(control::throttle))
        .route("/_sim/revoke-tokens", post(control::revoke_tokens))
        .route("/_sim/token-outage", post(control::token_outage))
        .route("/_sim/faults", post(control::faults))
        .route("/_sim/roles", post(control::roles))
        .fallback(|request: Request| async move {
            not_found(format!("Resource {} was not found", request.uri().path()))
        })
        .layer(middleware::from_fn_with_state(shared.clone(), account))
        .with_state(shared)
}

/// The stats family of a request path; `None` for the simulator's own `/_sim` routes.
pub fn family_of(method: &Method, path: &str) -> Option<&'static str> {
    if path.starts_with("/_sim") {
        return None;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        [_, "oauth2", "v2.0", "token"] => Family::Token.as_str(),
        ["api", "machines", _, "offboard"] if method == Method::POST => Family::Offboard.as_str(),
        ["api", "machineactions", _, "cancel"] if method == Method::POST => Family::Cancel.as_str(),
        ["api", "machineactions", ..] => Family::MachineActions.as_str(),
        ["api", "machines", ..] => Family::Machines.as_str(),
        _ => "other",
    })
}

/// Counts every API answer in the stats and logs it (path only: queries and bodies
/// may be large, and headers carry tokens).
async fn account(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(family) = family_of(&method, &path) {
        let status = if response.extensions().get::<DropConnection>().is_some() {
            "dropped".to_owned()
        } else {
            response.status().as_str().to_owned()
        };
        shared.lock().stats.record_request(family, &status);
        tracing::debug!(
            %method,
            path,
            family,
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "simulator request"
        );
    }
    response
}

/// Returned to hyper to close a connection without answering.
#[derive(Debug)]
struct LostResponse;

impl std::fmt::Display for LostResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("response deliberately lost")
    }
}

impl std::error::Error for LostResponse {}

/// Accepts connections until `shutdown` turns true (or its sender is dropped).
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Usually too many open files; back off instead of spinning.
                tracing::warn!(%error, "simulator failed to accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let router = router.clone();
                async move {
                    let response = match router.oneshot(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    if response.extensions().get::<DropConnection>().is_some() {
                        Err(LostResponse)
                    } else {
                        Ok::<_, LostResponse>(response)
                    }
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "simulator connection closed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_follow_the_path() {
        let f = |m: Method, p: &str| family_of(&m, p);
        assert_eq!(f(Method::POST, "/t/oauth2/v2.0/token"), Some("token"));
        assert_eq!(
            f(Method::POST, "/api/machines/abc/offboard"),
            Some("offboard")
        );
        assert_eq!(f(Method::GET, "/api/machines/abc"), Some("machines"));
        assert_eq!(f(Method::GET, "/api/machines"), Some("machines"));
        assert_eq!(
            f(Method::GET, "/api/machineactions/x"),
            Some("machineactions")
        );
        assert_eq!(
            f(Method::POST, "/api/machineactions/x/cancel"),
            Some("cancel")
        );
        assert_eq!(f(Method::GET, "/_sim/stats"), None);
        assert_eq!(f(Method::GET, "/nothing"), Some("other"));
    }
}
