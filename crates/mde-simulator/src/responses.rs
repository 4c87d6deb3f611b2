//! Error bodies in the shapes MDE and Azure AD use.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::config::RetryAfterMode;
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

/// `429 TooManyRequests`; `Retry-After` as `mode` says (by default whole seconds,
/// rounded up, at least 1).
pub fn too_many_requests(wait: Duration, mode: RetryAfterMode) -> Response {
    let secs = retry_after_secs(wait);
    let mut response = mde_error(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        format!("Rate limit is exceeded. Try again in {secs} seconds."),
    );
    let value = match mode {
        RetryAfterMode::Seconds => Some(HeaderValue::from(secs)),
        RetryAfterMode::HttpDate => Some(http_date_after(wait)),
        RetryAfterMode::Missing => None,
        RetryAfterMode::Huge => Some(HeaderValue::from_static("1e19")),
    };
    if let Some(value) = value {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// The IMF-fixdate (RFC 7231) of now + `wait`, rounded up to a whole second so a
/// client that waits until then has waited long enough.
fn http_date_after(wait: Duration) -> HeaderValue {
    let at = jiff::SignedDuration::try_from(wait)
        .ok()
        .and_then(|wait| jiff::Timestamp::now().checked_add(wait).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    let whole = if at.subsec_nanosecond() > 0 {
        at.as_second().saturating_add(1)
    } else {
        at.as_second()
    };
    let at = jiff::Timestamp::from_second(whole).unwrap_or(jiff::Timestamp::MAX);
    let text = jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&at)
        .unwrap_or_else(|_| "Fri, 31 Dec 9999 23:59:59 GMT".to_owned());
    HeaderValue::from_str(&text).expect("an HTTP date is a valid header value")
}

/// MDE's OData refusal of a query: `400` with an *empty* code, `details`,
/// and the `target` every MDE error carries.
fn odata_refusal(message: String) -> Response {
    let body = json!({
        "error": {
            "code": "",
            "message": message,
            "details": [],
            "target": uuid::Uuid::new_v4().to_string(),
        }
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// MDE's answer to an unknown `$` query option.
pub fn custom_query_option(option: &str) -> Response {
    odata_refusal(format!(
        "The query specified in the URI is not valid. Custom query option '{option}' that starts with '$' is not supported."
    ))
}

/// MDE's refusal of a query it cannot run (a property it does not filter or
/// order on, a filter it cannot parse), shaped as for an unknown `$` option.
pub fn invalid_query(detail: &str) -> Response {
    odata_refusal(format!(
        "The query specified in the URI is not valid. {detail}"
    ))
}

/// The bare `404` a machine-action list sometimes answers (`--fault-list-404-rate`).
pub fn bare_not_found() -> Response {
    mde_error(StatusCode::NOT_FOUND, "ResourceNotFound", "Not found")
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
