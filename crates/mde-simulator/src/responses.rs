//! Error bodies in the shapes MDE and Azure AD use.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ratelimit::retry_after_secs;

/// `{"error":{"code","message","target"}}`; `target` is a fresh request id, as in MDE.
pub fn mde_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error": {
            "code": code,
            "message": message.into(),
            "target": uuid::Uuid::new_v4().to_string(),
        }
    });
    (status, Json(body)).into_response()
}

/// `429 TooManyRequests` with `Retry-After` in whole seconds (rounded up, at least 1).
pub fn too_many_requests(wait: Duration) -> Response {
    let secs = retry_after_secs(wait);
    let mut response = mde_error(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        format!("Rate limit is exceeded. Try again in {secs} seconds."),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

pub fn unauthorized(message: &str) -> Response {
    let mut response = mde_error(StatusCode::UNAUTHORIZED, "Unauthorized", message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

pub fn bad_request(code: &str, message: impl Into<String>) -> Response {
    mde_error(StatusCode::BAD_REQUEST, code, message)
}

pub fn not_found(message: impl Into<String>) -> Response {
    mde_error(StatusCode::NOT_FOUND, "ResourceNotFound", message)
}

/// Azure AD v2 token endpoint error.
pub fn aad_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let trace_id = uuid::Uuid::new_v4();
    let correlation_id = uuid::Uuid::new_v4();
    let timestamp = jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M:%SZ")
        .to_string();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id.to_string(),
        "correlation_id": correlation_id.to_string(),
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, Json(body)).into_response()
}
