//! `/_sim/*`: runtime control and counters for tests and benchmarks (no authentication).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::faults::FaultUpdate;
use super::stats::SimStats;
use super::store::{Family, Shared};

fn refuse(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": message.into() })),
    )
        .into_response()
}

/// `GET /_sim/stats`.
pub async fn stats(State(shared): State<Arc<Shared>>) -> Json<SimStats> {
    Json(shared.lock().stats.clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Throttle {
    family: String,
    /// Wall-clock seconds (not scaled), so tests can reason about them directly.
    seconds: f64,
}

/// `POST /_sim/throttle`: as if another client of the tenant used up the family's budget.
pub async fn throttle(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Throttle>, JsonRejection>,
) -> Response {
    let Json(t) = match body {
        Ok(b) => b,
        Err(e) => {
            return refuse(format!(
                "expected {{\"family\": ..., \"seconds\": ...}}: {e}"
            ));
        }
    };
    let Some(family) = Family::parse_limited(&t.family) else {
        let known: Vec<_> = Family::LIMITED.iter().map(|f| f.as_str()).collect();
        return refuse(format!(
            "unknown family '{}'; use one of {}",
            t.family,
            known.join(", ")
        ));
    };
    if !(t.seconds.is_finite() && t.seconds >= 0.0) {
        return refuse("seconds must be a non-negative number");
    }
    shared
        .lock()
        .force_throttle(family, Duration::from_secs_f64(t.seconds));
    Json(json!({ "family": family.as_str(), "seconds": t.seconds })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Wall-clock seconds (not scaled).
    seconds: f64,
}

/// `POST /_sim/token-outage`: the token endpoint answers `503
/// temporarily_unavailable` for that long; issued tokens keep working.
pub async fn token_outage(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Outage>, JsonRejection>,
) -> Response {
    let Json(o) = match body {
        Ok(b) => b,
        Err(e) => return refuse(format!("expected {{\"seconds\": ...}}: {e}")),
    };
    if !(o.seconds.is_finite() && (0.0..=86_400.0).contains(&o.seconds)) {
        return refuse("seconds must be a number from 0 to 86400");
    }
    shared
        .lock()
        .token_outage(Duration::from_secs_f64(o.seconds));
    Json(json!({ "seconds": o.seconds })).into_response()
}

/// `POST /_sim/revoke-tokens`.
pub async fn revoke_tokens(State(shared): State<Arc<Shared>>) -> Response {
    let revoked = shared.lock().revoke_tokens();
    Json(json!({ "revoked": revoked })).into_response()
}

/// `POST /_sim/faults`: changes only the fields given; answers the settings now in force.
pub async fn faults(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<FaultUpdate>, JsonRejection>,
) -> Response {
    let Json(update) = match body {
        Ok(b) => b,
        Err(e) => return refuse(format!("invalid fault settings: {e}")),
    };
    let mut store = shared.lock();
    if let Err(e) = update.apply(&mut store.config.faults) {
        return refuse(e);
    }
    Json(store.config.faults.clone()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    roles: Vec<String>,
}

/// `POST /_sim/roles`: replaces the application's roles; applies to the next call.
pub async fn roles(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<Roles>, JsonRejection>,
) -> Response {
    let Json(r) = match body {
        Ok(b) => b,
        Err(e) => return refuse(format!("expected {{\"roles\": [...]}}: {e}")),
    };
    shared.lock().config.roles = r.roles.clone();
    Json(json!({ "roles": r.roles })).into_response()
}
