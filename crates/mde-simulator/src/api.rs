//! The MDE API handlers: machines, offboard, machine actions and cancel.
//!
//! Every call passes [`admit`] first, in the order a real gateway would apply:
//! authentication (401), rate limits (429), injected latency and errors (500/503),
//! then application permissions (403).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::actions;
use super::auth::bearer;
use super::faults::{self, LostResponse};
use super::machines;
use super::odata;
use super::ratelimit::Decision;
use super::responses::{bad_request, mde_error, not_found, too_many_requests, unauthorized};
use super::store::{Caller, CancelRefusal, Family, OffboardRefusal, Shared};

/// Largest `$top` MDE accepts.
pub const MAX_TOP: usize = 10_000;

/// Marks a response whose connection must be closed without answering.
#[derive(Clone, Copy, Debug)]
pub struct DropConnection;

const READ_ROLES: &[&str] = &["Machine.Read.All", "Machine.ReadWrite.All"];
const OFFBOARD_ROLES: &[&str] = &["Machine.Offboard"];

/// Authenticates, rate-limits, injects faults and checks permissions for one call.
async fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    family: Family,
    required_roles: &[&str],
) -> Result<Caller, Response> {
    let (caller, latency, injected) = {
        let mut store = shared.lock();
        let Some(token) = bearer(headers) else {
            return Err(unauthorized(
                "Authorization has been denied for this request: no bearer token.",
            ));
        };
        let Some(caller) = store.authenticate(token) else {
            return Err(unauthorized(
                "Authorization has been denied for this request: the token is invalid, expired or revoked.",
            ));
        };
        if let Decision::Throttled(wait) = store.admit(family, &caller) {
            return Err(too_many_requests(wait));
        }
        let latency = store.config.scaled(store.config.faults.latency);
        let faults = store.config.faults.clone();
        let injected = faults::injected_error(&mut store.fault_rng, &faults);
        if injected.is_some() {
            store.stats.injected_errors += 1;
        }
        (caller, latency, injected)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(status) = injected {
        let code = if status == StatusCode::SERVICE_UNAVAILABLE {
            "ServiceUnavailable"
        } else {
            "InternalServerError"
        };
        return Err(mde_error(
            status,
            code,
            "An unexpected error occurred (injected fault).",
        ));
    }
    let roles = shared.lock().config.roles.clone();
    if !required_roles
        .iter()
        .any(|r| roles.iter().any(|have| have == r))
    {
        return Err(mde_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "The application does not have any of the required application permissions ({}) to access the resource.",
                required_roles.join(", ")
            ),
        ));
    }
    Ok(caller)
}

/// `http://host` the client used, so `@odata.nextLink` leads back here.
fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    match headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(host) if !host.is_empty() => format!("http://{host}"),
        _ => format!("http://{}", shared.local_addr),
    }
}

/// `$filter`, `$top` and `$skip` of a list call.
#[derive(Debug, Default, PartialEq)]
struct ListQuery {
    filter: Option<String>,
    top: Option<usize>,
    skip: usize,
}

fn parse_query(raw: Option<&str>) -> Result<ListQuery, String> {
    let mut q = ListQuery::default();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "$filter" => q.filter = Some(value.into_owned()),
            "$top" => {
                let top: usize = value
                    .parse()
                    .map_err(|_| format!("$top must be a whole number, got '{value}'"))?;
                if top > MAX_TOP {
                    return Err(format!("$top must be at most {MAX_TOP}, got {top}"));
                }
                q.top = Some(top);
            }
            "$skip" => {
                q.skip = value
                    .parse()
                    .map_err(|_| format!("$skip must be a whole number, got '{value}'"))?;
            }
            _ => {}
        }
    }
    Ok(q)
}

/// One page of a filtered collection, with `@odata.nextLink` when more remain.
fn list_page(
    items: &[Value],
    raw_query: Option<&str>,
    entity_set: &str,
    path: &str,
    filterable: &[&str],
    page_size: usize,
    base: &str,
) -> Result<Value, String> {
    let query = parse_query(raw_query)?;
    let filter = match &query.filter {
        Some(text) => {
            let parsed = odata::parse(text)
                .and_then(|f| {
                    f.check_fields(path.trim_start_matches("/api/"), filterable)
                        .map(|()| f)
                })
                .map_err(|e| format!("Invalid $filter '{text}': {e}"))?;
            Some(parsed)
        }
        None => None,
    };
    let matching: Vec<&Value> = items
        .iter()
        .filter(|v| filter.as_ref().is_none_or(|f| f.matches(v)))
        .collect();
    let wanted = query.top.unwrap_or(usize::MAX);
    let available = matching.len().saturating_sub(query.skip);
    let take = wanted.min(page_size.max(1)).min(available);
    let page: Vec<Value> = matching
        .into_iter()
        .skip(query.skip)
        .take(take)
        .cloned()
        .collect();
    let mut body = json!({
        "@odata.context": format!("{base}/api/$metadata#{entity_set}"),
        "value": page,
    });
    if available > take && wanted > take {
        let mut link = format!("{base}{path}?");
        if let Some(f) = &query.filter {
            let encoded: String = url::form_urlencoded::byte_serialize(f.as_bytes()).collect();
            link.push_str(&format!("$filter={encoded}&"));
        }
        if let Some(top) = query.top {
            link.push_str(&format!("$top={}&", top - take));
        }
        link.push_str(&format!("$skip={}", query.skip + take));
        body["@odata.nextLink"] = Value::String(link);
    }
    Ok(body)
}

fn with_context(mut entity: Value, base: &str, context: &str) -> Value {
    if let Value::Object(map) = &mut entity {
        map.insert(
            "@odata.context".into(),
            Value::String(format!("{base}/api/$metadata#{context}")),
        );
    }
    entity
}

/// Reads `{"Comment": "..."}`; the name is case-sensitive and the value must not be empty.
/// Refusals are `400 InvalidRequestBody` with the returned message.
/// The checks a write (offboard, cancel) goes through: token, limits, roles,
/// then a body with a `Comment`.
async fn admit_write(
    shared: &Shared,
    headers: &HeaderMap,
    family: Family,
    body: &[u8],
) -> Result<(Caller, String), Response> {
    let caller = admit(shared, headers, family, OFFBOARD_ROLES).await?;
    let comment = comment(body).map_err(|message| bad_request("InvalidRequestBody", message))?;
    Ok((caller, comment))
}

fn comment(body: &[u8]) -> Result<String, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("Request body is not valid JSON: {e}"))?;
    match value.get("Comment").and_then(Value::as_str).map(str::trim) {
        Some(c) if !c.is_empty() => Ok(c.to_owned()),
        _ => Err(
            "Request body must contain a non-empty 'Comment' (property names are case-sensitive)."
                .to_owned(),
        ),
    }
}

/// `GET /api/machines/{id}`.
pub async fn get_machine(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::Machines, READ_ROLES).await {
        return r;
    }
    let base = base_url(&shared, &headers);
    let store = shared.lock();
    match store.machine(&id) {
        Some(m) => {
            let json = serde_json::to_value(m).expect("machine serialises");
            Json(with_context(json, &base, "Machines/$entity")).into_response()
        }
        None => not_found(format!("Machine {id} was not found")),
    }
}

/// `GET /api/machines` with OData paging.
pub async fn list_machines(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::Machines, READ_ROLES).await {
        return r;
    }
    let base = base_url(&shared, &headers);
    let (items, page_size) = {
        let store = shared.lock();
        (store.machines_json(), store.config.page_size)
    };
    list_response(
        &items,
        query.as_deref(),
        "Machines",
        "/api/machines",
        machines::FILTERABLE,
        page_size,
        &base,
    )
}

/// One page of a collection as MDE answers it, or a 400 naming what is wrong
/// with the query.
fn list_response(
    items: &[serde_json::Value],
    query: Option<&str>,
    entity: &str,
    path: &str,
    filterable: &[&str],
    page_size: usize,
    base: &str,
) -> Response {
    match list_page(items, query, entity, path, filterable, page_size, base) {
        Ok(body) => Json(body).into_response(),
        Err(message) => bad_request("BadRequest", message),
    }
}

/// `POST /api/machines/{id}/offboard`.
pub async fn offboard(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (caller, comment) = match admit_write(&shared, &headers, Family::Offboard, &body).await {
        Ok(admitted) => admitted,
        Err(r) => return r,
    };
    let base = base_url(&shared, &headers);
    let mut store = shared.lock();
    let action = match store.offboard(&id, &caller.client_id, &comment) {
        Ok(action) => action,
        Err(OffboardRefusal::NotFound) => return not_found(format!("Machine {id} was not found")),
        Err(OffboardRefusal::PlatformNotSupported(platform)) => {
            return bad_request(
                "OsPlatformNotSupported",
                format!("Offboard is not supported on OS platform {platform} (machine {id})."),
            );
        }
        Err(OffboardRefusal::ActiveRequestAlreadyExists(existing)) => {
            return bad_request(
                "ActiveRequestAlreadyExists",
                format!("Action is already in progress (action {existing})."),
            );
        }
    };
    let faults = store.config.faults.clone();
    match faults::lost_response(&mut store.fault_rng, &faults) {
        None => (
            StatusCode::CREATED,
            Json(with_context(action, &base, "MachineActions/$entity")),
        )
            .into_response(),
        Some(lost) => {
            store.stats.lost_responses += 1;
            match lost {
                LostResponse::Drop => {
                    let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
                    response.extensions_mut().insert(DropConnection);
                    response
                }
                LostResponse::GatewayTimeout => mde_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "GatewayTimeout",
                    "The upstream service did not answer in time.",
                ),
            }
        }
    }
}

/// `GET /api/machineactions/{id}`.
pub async fn get_action(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::MachineActions, READ_ROLES).await {
        return r;
    }
    let base = base_url(&shared, &headers);
    let store = shared.lock();
    match store.action_json(&id) {
        Some(action) => Json(with_context(action, &base, "MachineActions/$entity")).into_response(),
        None => not_found(format!("Action {id} was not found")),
    }
}

/// `GET /api/machineactions` with OData paging.
pub async fn list_actions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::MachineActions, READ_ROLES).await {
        return r;
    }
    let base = base_url(&shared, &headers);
    // Status depends on time, so action JSON is built per call; narrow first by the
    // ids a poll names (`id in (...)`) to keep large polls cheap.
    let filter = parse_query(query.as_deref())
        .ok()
        .and_then(|q| q.filter)
        .and_then(|f| odata::parse(&f).ok());
    let ids = filter.as_ref().and_then(|f| f.equality_values("id"));
    let machine_ids = filter.as_ref().and_then(|f| f.equality_values("machineId"));
    let (items, page_size) = {
        let store = shared.lock();
        (
            store.actions_json(ids.as_deref(), machine_ids.as_deref()),
            store.config.page_size,
        )
    };
    list_response(
        &items,
        query.as_deref(),
        "MachineActions",
        "/api/machineactions",
        actions::FILTERABLE,
        page_size,
        &base,
    )
}

/// `POST /api/machineactions/{id}/cancel`.
pub async fn cancel_action(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (caller, comment) = match admit_write(&shared, &headers, Family::Cancel, &body).await {
        Ok(admitted) => admitted,
        Err(r) => return r,
    };
    let base = base_url(&shared, &headers);
    let mut store = shared.lock();
    match store.cancel(&id, &caller.client_id, &comment) {
        Ok(action) => Json(with_context(action, &base, "MachineActions/$entity")).into_response(),
        Err(CancelRefusal::NotFound) => not_found(format!("Action {id} was not found")),
        Err(CancelRefusal::AlreadyFinal(status)) => bad_request(
            "BadRequest",
            format!("Action {id} is already {status:?} and can no longer be cancelled."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| json!({"id": format!("m{i}"), "n": i}))
            .collect()
    }

    fn page(n: usize, query: &str, page_size: usize) -> Value {
        list_page(
            &items(n),
            Some(query),
            "Things",
            "/api/things",
            &["id", "n"],
            page_size,
            "http://h",
        )
        .unwrap()
    }

    #[test]
    fn pages_link_to_the_rest() {
        let first = page(5, "$filter=n ge 1", 2);
        assert_eq!(first["value"].as_array().unwrap().len(), 2);
        assert_eq!(
            first["@odata.nextLink"],
            "http://h/api/things?$filter=n+ge+1&$skip=2"
        );
        let last = page(5, "$filter=n+ge+1&$skip=2", 2);
        assert_eq!(last["value"][1]["id"], "m4");
        assert!(last.get("@odata.nextLink").is_none());
    }

    #[test]
    fn top_limits_the_total_across_pages() {
        let first = page(10, "$top=3", 2);
        assert_eq!(
            first["@odata.nextLink"],
            "http://h/api/things?$top=1&$skip=2"
        );
        let second = page(10, "$top=1&$skip=2", 2);
        assert_eq!(second["value"].as_array().unwrap().len(), 1);
        assert!(second.get("@odata.nextLink").is_none());
    }

    #[test]
    fn bad_queries_are_refused() {
        assert!(
            parse_query(Some("$top=10001"))
                .unwrap_err()
                .contains("at most 10000")
        );
        assert!(parse_query(Some("$skip=x")).unwrap_err().contains("$skip"));
        assert_eq!(parse_query(Some("%24top=5")).unwrap().top, Some(5));
    }
}
