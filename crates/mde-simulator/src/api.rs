//! The MDE API handlers: machines, offboard, machine actions and cancel.
//!
//! Every call passes [`admit`] first, in the order a real gateway would apply:
//! authentication (401), rate limits (429), injected latency and errors (500/503),
//! then application permissions (403).

use std::borrow::Borrow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::actions;
use super::auth::bearer;
use super::config::{NextLinkMode, PendingConflictWording};
use super::faults::{self, LostResponse};
use super::machines;
use super::odata;
use super::ratelimit::Decision;
use super::responses::{
    bad_request, bare_not_found, custom_query_option, invalid_query, mde_error, not_found,
    too_many_requests, unauthorized,
};
use super::stats::body_correlation_key;
use super::store::{Caller, CancelRefusal, Family, OffboardRefusal, Shared};

/// Largest `$top` MDE accepts.
pub const MAX_TOP: usize = 10_000;

/// The OData system query options MDE knows; any other option starting with `$`
/// is refused (`$select`, `$count` and `$expand` are accepted and ignored;
/// `$orderby` sorts by filterable properties).
pub const SYSTEM_QUERY_OPTIONS: &[&str] = &[
    "$filter", "$top", "$skip", "$select", "$orderby", "$count", "$expand",
];

/// Marks a response whose connection must be closed without answering.
#[derive(Clone, Copy, Debug)]
pub struct DropConnection;

const READ_ROLES: &[&str] = &["Machine.Read.All", "Machine.ReadWrite.All"];
const OFFBOARD_ROLES: &[&str] = &["Machine.Offboard"];

/// An offboard POST to count in the stats once it gets past the token and the limits.
#[derive(Clone, Copy, Debug)]
struct OffboardRequest<'a> {
    /// Correlation key from the comment's marker (`""` without one).
    key: &'a str,
    /// Machine id as the path names it.
    machine_id: &'a str,
    /// Set once it is counted as received.
    received: &'a AtomicBool,
}

/// Tells the store an offboard POST counted as received has been answered,
/// however its handler ends (its connection closed by the client included).
struct AnsweredOnDrop<'a> {
    shared: &'a Shared,
    machine_id: &'a str,
    received: &'a AtomicBool,
}

impl Drop for AnsweredOnDrop<'_> {
    fn drop(&mut self) {
        if self.received.load(Ordering::SeqCst) {
            self.shared
                .lock()
                .offboard_request_answered(self.machine_id);
        }
    }
}

/// Authenticates, rate-limits, injects faults and checks permissions for one call.
///
/// An offboard POST is counted as received (`offboard_requests_by_*`) as soon as
/// it passes the token and the limits, before anything can still fail (latency,
/// injected errors, permissions, body, refusals, lost answers); a `401` or `429`
/// counts it as refused instead.
async fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    family: Family,
    required_roles: &[&str],
    offboard: Option<OffboardRequest<'_>>,
) -> Result<Caller, Response> {
    let (caller, latency, injected) = {
        let mut store = shared.lock();
        let refused = |store: &mut super::store::Store| {
            if offboard.is_some() {
                store.stats.offboard_requests_refused += 1;
            }
        };
        let Some(token) = bearer(headers) else {
            refused(&mut store);
            return Err(unauthorized(
                "Authorization has been denied for this request: no bearer token.",
            ));
        };
        let Some(caller) = store.authenticate(token) else {
            refused(&mut store);
            return Err(unauthorized(
                "Authorization has been denied for this request: the token is invalid, expired or revoked.",
            ));
        };
        if let Decision::Throttled(wait) = store.admit(family, &caller) {
            refused(&mut store);
            return Err(too_many_requests(wait, store.config.faults.retry_after));
        }
        if let Some(request) = offboard {
            store.offboard_request_received(request.key, request.machine_id);
            request.received.store(true, Ordering::SeqCst);
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

/// `$filter`, `$orderby`, `$top` and `$skip` of a list call.
#[derive(Debug, Default, PartialEq)]
struct ListQuery {
    filter: Option<String>,
    orderby: Option<String>,
    top: Option<usize>,
    skip: usize,
    /// Parameters without a name (`=value`), as in MDE's mangled `@odata.nextLink`.
    mangled: bool,
}

/// Why a query is refused; both are `400`, in different shapes.
#[derive(Debug, PartialEq, Eq)]
enum QueryError {
    /// An option starting with `$` that OData does not know (MDE's empty-code answer).
    CustomOption(String),
    /// A known option with a bad value (`400 BadRequest` with this message).
    Invalid(String),
    /// A `$filter` or `$orderby` MDE cannot run: unparsable, naming a
    /// property the entity does not filter or sort on, or (`--fault-refuse-in`)
    /// using `in` (OData's empty-code `400`).
    Filter(String),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::CustomOption(option) => {
                write!(f, "custom query option '{option}' is not supported")
            }
            QueryError::Invalid(message) | QueryError::Filter(message) => f.write_str(message),
        }
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        match self {
            QueryError::CustomOption(option) => custom_query_option(&option),
            QueryError::Invalid(message) => bad_request("BadRequest", message),
            QueryError::Filter(message) => invalid_query(&message),
        }
    }
}

fn query_pairs(raw: Option<&str>) -> url::form_urlencoded::Parse<'_> {
    url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
}

/// Refuses options that start with `$` but are no OData system query option.
fn check_options(raw: Option<&str>) -> Result<(), QueryError> {
    match query_pairs(raw)
        .map(|(key, _)| key)
        .find(|key| key.starts_with('$') && !SYSTEM_QUERY_OPTIONS.contains(&key.as_ref()))
    {
        Some(option) => Err(QueryError::CustomOption(option.into_owned())),
        None => Ok(()),
    }
}

fn parse_query(raw: Option<&str>) -> Result<ListQuery, QueryError> {
    check_options(raw)?;
    let mut q = ListQuery::default();
    for (key, value) in query_pairs(raw) {
        match key.as_ref() {
            "$filter" => q.filter = Some(value.into_owned()),
            "$orderby" => q.orderby = Some(value.into_owned()),
            "$top" => {
                let top: usize = value.parse().map_err(|_| {
                    QueryError::Invalid(format!("$top must be a whole number, got '{value}'"))
                })?;
                if top > MAX_TOP {
                    return Err(QueryError::Invalid(format!(
                        "$top must be at most {MAX_TOP}, got {top}"
                    )));
                }
                q.top = Some(top);
            }
            "$skip" => {
                q.skip = value.parse().map_err(|_| {
                    QueryError::Invalid(format!("$skip must be a whole number, got '{value}'"))
                })?;
            }
            "" => q.mangled = true,
            // Other system options are accepted and ignored; custom options without
            // `$` are ignored, as OData does.
            _ => {}
        }
    }
    Ok(q)
}

/// How a list pages: the page size without `$top`, and the link quirk; and
/// whether a `$filter` with `in` is refused (`--fault-refuse-in`).
#[derive(Clone, Copy, Debug)]
struct Paging {
    page_size: usize,
    next_link: NextLinkMode,
    refuse_in: bool,
}

fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// One page of a filtered (and `$orderby` sorted) collection, the way MDE pages:
/// - with `$top`, up to `$top` entities after `$skip` and never an `@odata.nextLink`
///   (`$top` caps the total);
/// - without, up to `page_size` entities and an `@odata.nextLink` when more remain,
///   shaped by `paging.next_link`.
fn list_page<V: Borrow<Value>>(
    items: &[V],
    raw_query: Option<&str>,
    entity_set: &str,
    path: &str,
    filterable: &[&str],
    paging: Paging,
    base: &str,
) -> Result<Value, QueryError> {
    list_page_whole(items, raw_query, entity_set, path, filterable, paging, base).map(|(b, _)| b)
}

/// [`list_page`], and whether the page holds all the query matched (from
/// the first entity on, none left over).
fn list_page_whole<V: Borrow<Value>>(
    items: &[V],
    raw_query: Option<&str>,
    entity_set: &str,
    path: &str,
    filterable: &[&str],
    paging: Paging,
    base: &str,
) -> Result<(Value, bool), QueryError> {
    let query = parse_query(raw_query)?;
    let entity = path.trim_start_matches("/api/");
    let filter = match &query.filter {
        Some(text) => {
            let parsed = odata::parse(text)
                .and_then(|f| f.check_fields(entity, filterable).map(|()| f))
                .map_err(|e| QueryError::Filter(format!("Invalid $filter '{text}': {e}")))?;
            if paging.refuse_in && parsed.uses_in() {
                return Err(QueryError::Filter(format!(
                    "Invalid $filter '{text}': the operator 'in' is not supported."
                )));
            }
            Some(parsed)
        }
        None => None,
    };
    let order = match &query.orderby {
        Some(text) => odata::parse_orderby(text, entity, filterable)
            .map_err(|e| QueryError::Filter(format!("Invalid $orderby '{text}': {e}")))?,
        None => Vec::new(),
    };
    let mut matching: Vec<&Value> = items
        .iter()
        .map(Borrow::borrow)
        .filter(|v| filter.as_ref().is_none_or(|f| f.matches(v)))
        .collect();
    odata::order_by(&mut matching, &order);
    let available = matching.len().saturating_sub(query.skip);
    let page_size = paging.page_size.max(1);
    let (take, more) = match query.top {
        Some(top) => (top.min(available), false),
        None => {
            let take = page_size.min(available);
            (take, available > take)
        }
    };
    let whole = query.skip == 0 && take == matching.len();
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
    let link = match paging.next_link {
        _ if query.top.is_some() => None,
        NextLinkMode::Normal if more => {
            let mut link = format!("{base}{path}?");
            if let Some(f) = &query.filter {
                link.push_str(&format!("$filter={}&", encode(f)));
            }
            if let Some(o) = &query.orderby {
                link.push_str(&format!("$orderby={}&", encode(o)));
            }
            link.push_str(&format!("$skip={}", query.skip + take));
            Some(link)
        }
        NextLinkMode::Repeat if more => Some(match raw_query.filter(|q| !q.is_empty()) {
            Some(raw) => format!("{base}{path}?{raw}"),
            None => format!("{base}{path}"),
        }),
        // Once mangled, the links keep coming (each answer is still finite).
        NextLinkMode::Mangled if more || query.mangled => Some(mangled_link(
            base,
            path,
            raw_query,
            page_size,
            query.skip.saturating_add(page_size),
            query.mangled,
        )),
        _ => None,
    };
    if let Some(link) = link {
        body["@odata.nextLink"] = Value::String(link);
    }
    Ok((body, whole))
}

/// MDE's mangled `@odata.nextLink`: `$skip` survives, every other parameter loses
/// its name (`?=onboardingstatus+eq+%27Onboarded%27&=10000&$skip=10000`).
fn mangled_link(
    base: &str,
    path: &str,
    raw_query: Option<&str>,
    page_size: usize,
    next_skip: usize,
    already_mangled: bool,
) -> String {
    let mut parts: Vec<String> = query_pairs(raw_query)
        .filter(|(key, _)| key != "$skip")
        .map(|(_, value)| format!("={}", encode(&value)))
        .collect();
    if !already_mangled {
        parts.push(format!("={page_size}"));
    }
    parts.push(format!("$skip={next_skip}"));
    format!("{base}{path}?{}", parts.join("&"))
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

/// The checks a write (offboard, cancel) goes through: token, limits, roles,
/// then a body with a `Comment`.
async fn admit_write(
    shared: &Shared,
    headers: &HeaderMap,
    family: Family,
    body: &[u8],
    offboard: Option<OffboardRequest<'_>>,
) -> Result<(Caller, String), Response> {
    let caller = admit(shared, headers, family, OFFBOARD_ROLES, offboard).await?;
    let comment = comment(body).map_err(|message| bad_request("InvalidRequestBody", message))?;
    Ok((caller, comment))
}

/// Reads `{"Comment": "..."}`; the name is case-sensitive and the value must not be empty.
/// Refusals are `400 InvalidRequestBody` with the returned message.
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

fn nulled_values(body: &mut Value, null: fn(&mut Value)) {
    if let Some(values) = body.get_mut("value").and_then(Value::as_array_mut) {
        values.iter_mut().for_each(null);
    }
}

/// `GET /api/machines/{id}`.
pub async fn get_machine(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::Machines, READ_ROLES, None).await {
        return r;
    }
    if let Err(e) = check_options(query.as_deref()) {
        return e.into_response();
    }
    let base = base_url(&shared, &headers);
    let store = shared.lock();
    match store.machine(&id) {
        Some(m) => {
            let mut json = serde_json::to_value(m).expect("machine serialises");
            if store.config.faults.nulls {
                machines::null_optional_fields(&mut json);
            }
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
    if let Err(r) = admit(&shared, &headers, Family::Machines, READ_ROLES, None).await {
        return r;
    }
    let base = base_url(&shared, &headers);
    let (items, paging, nulls) = {
        let store = shared.lock();
        (
            store.machines_json(),
            paging(&store.config),
            store.config.faults.nulls,
        )
    };
    match list_page(
        &items,
        query.as_deref(),
        "Machines",
        "/api/machines",
        machines::FILTERABLE,
        paging,
        &base,
    ) {
        Ok(mut body) => {
            if nulls {
                nulled_values(&mut body, machines::null_optional_fields);
            }
            Json(body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

fn paging(config: &super::config::SimConfig) -> Paging {
    Paging {
        page_size: config.page_size,
        next_link: config.faults.next_link,
        refuse_in: config.faults.refuse_in,
    }
}

/// `POST /api/machines/{id}/offboard`.
pub async fn offboard(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let key = body_correlation_key(&body);
    let received = AtomicBool::new(false);
    // Declared before the store's lock is taken, so dropped after it is released.
    let _answered = AnsweredOnDrop {
        shared: &shared,
        machine_id: &id,
        received: &received,
    };
    let request = OffboardRequest {
        key: &key,
        machine_id: &id,
        received: &received,
    };
    let (caller, comment) =
        match admit_write(&shared, &headers, Family::Offboard, &body, Some(request)).await {
            Ok(admitted) => admitted,
            Err(r) => return r,
        };
    let base = base_url(&shared, &headers);
    let mut store = shared.lock();
    let mut action = match store.offboard(&id, &caller.client_id, &comment) {
        Ok(action) => action,
        Err(OffboardRefusal::NotFound) => return not_found(format!("Machine {id} was not found")),
        Err(OffboardRefusal::NotOnboarded(status)) => {
            return bad_request(
                "BadRequest",
                format!(
                    "Machine {id} is not onboarded (onboardingStatus {status}): only onboarded machines can be offboarded."
                ),
            );
        }
        Err(OffboardRefusal::PlatformNotSupported(platform)) => {
            return bad_request(
                "OsPlatformNotSupported",
                format!("Offboard is not supported on OS platform {platform} (machine {id})."),
            );
        }
        Err(OffboardRefusal::ActiveRequestAlreadyExists(existing)) => {
            return match store.config.faults.pending_conflict_wording {
                PendingConflictWording::Code => bad_request(
                    "ActiveRequestAlreadyExists",
                    format!("Action is already in progress (action {existing})."),
                ),
                PendingConflictWording::MessageOnly => {
                    bad_request("BadRequest", "Action is already in progress")
                }
            };
        }
    };
    let faults = store.config.faults.clone();
    if faults.nulls {
        actions::null_optional_fields(&mut action);
    }
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

/// `GET /api/machineactions/{id}`: finds an action at once, whatever the list lag.
pub async fn get_action(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::MachineActions, READ_ROLES, None).await {
        return r;
    }
    if let Err(e) = check_options(query.as_deref()) {
        return e.into_response();
    }
    let base = base_url(&shared, &headers);
    let store = shared.lock();
    match store.action_json(&id) {
        Some(mut action) => {
            if store.config.faults.nulls {
                actions::null_optional_fields(&mut action);
            }
            Json(with_context(action, &base, "MachineActions/$entity")).into_response()
        }
        None => not_found(format!("Action {id} was not found")),
    }
}

/// `GET /api/machineactions` with OData paging.
pub async fn list_actions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = admit(&shared, &headers, Family::MachineActions, READ_ROLES, None).await {
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
    let created_from = filter
        .as_ref()
        .and_then(|f| f.lower_time_bound("creationDateTimeUtc"));
    let (items, paging, covered) = {
        let mut store = shared.lock();
        if machine_ids.is_some() {
            store.stats.machine_action_lists += 1;
        }
        // A poll of actions by id says nothing of what else a machine has.
        let covered = if ids.is_none() {
            store.covered_by_list(machine_ids.as_deref(), created_from)
        } else {
            Vec::new()
        };
        (
            store.actions_json(ids.as_deref(), machine_ids.as_deref(), created_from),
            paging(&store.config),
            covered,
        )
    };
    let (mut body, whole) = match list_page_whole(
        &items,
        query.as_deref(),
        "MachineActions",
        "/api/machineactions",
        actions::FILTERABLE,
        paging,
        &base,
    ) {
        Ok(page) => page,
        Err(e) => return e.into_response(),
    };
    // A valid query may still be answered 404 (`--fault-list-404-rate`).
    let (missing, nulls) = {
        let mut store = shared.lock();
        let faults = store.config.faults.clone();
        let missing = faults::list_not_found(&mut store.fault_rng, &faults);
        if !missing {
            let shown = body["value"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            store.action_list_answered(covered, shown, whole);
        }
        (missing, faults.nulls)
    };
    if missing {
        return bare_not_found();
    }
    if nulls {
        nulled_values(&mut body, actions::null_optional_fields);
    }
    Json(body).into_response()
}

/// `POST /api/machineactions/{id}/cancel`.
pub async fn cancel_action(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (caller, comment) = match admit_write(&shared, &headers, Family::Cancel, &body, None).await
    {
        Ok(admitted) => admitted,
        Err(r) => return r,
    };
    let base = base_url(&shared, &headers);
    let mut store = shared.lock();
    *store
        .stats
        .cancel_requests_by_action
        .entry(id.to_ascii_lowercase())
        .or_default() += 1;
    match store.cancel(&id, &caller.client_id, &comment) {
        Ok(mut action) => {
            if store.config.faults.nulls {
                actions::null_optional_fields(&mut action);
            }
            Json(with_context(action, &base, "MachineActions/$entity")).into_response()
        }
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

    fn page_with(n: usize, query: &str, page_size: usize, next_link: NextLinkMode) -> Value {
        list_page(
            &items(n),
            Some(query),
            "Things",
            "/api/things",
            &["id", "n"],
            Paging {
                page_size,
                next_link,
                refuse_in: false,
            },
            "http://h",
        )
        .unwrap()
    }

    fn page(n: usize, query: &str, page_size: usize) -> Value {
        page_with(n, query, page_size, NextLinkMode::Normal)
    }

    fn len(page: &Value) -> usize {
        page["value"].as_array().unwrap().len()
    }

    #[test]
    fn pages_link_to_the_rest() {
        let first = page(5, "$filter=n ge 1", 2);
        assert_eq!(len(&first), 2);
        assert_eq!(
            first["@odata.nextLink"],
            "http://h/api/things?$filter=n+ge+1&$skip=2"
        );
        let last = page(5, "$filter=n+ge+1&$skip=2", 2);
        assert_eq!(last["value"][1]["id"], "m4");
        assert!(last.get("@odata.nextLink").is_none());
    }

    #[test]
    fn top_caps_the_total_and_never_links() {
        // Like MDE: `$top` answers up to `$top` entities at once, whatever the page size.
        let first = page(10, "$top=3", 2);
        assert_eq!(len(&first), 3);
        assert!(first.get("@odata.nextLink").is_none());
        let skipped = page(10, "$top=5&$skip=8", 2);
        assert_eq!(len(&skipped), 2);
        assert!(skipped.get("@odata.nextLink").is_none());
        for mode in [NextLinkMode::Repeat, NextLinkMode::Mangled] {
            assert!(
                page_with(10, "$top=3", 2, mode)
                    .get("@odata.nextLink")
                    .is_none()
            );
        }
    }

    #[test]
    fn repeat_links_to_the_same_page() {
        let first = page_with(5, "$filter=n ge 1", 2, NextLinkMode::Repeat);
        assert_eq!(
            first["@odata.nextLink"],
            "http://h/api/things?$filter=n ge 1"
        );
        let single = page_with(2, "$filter=n ge 1", 2, NextLinkMode::Repeat);
        assert!(
            single.get("@odata.nextLink").is_none(),
            "one page needs no link"
        );
    }

    #[test]
    fn mangled_links_keep_skip_and_lose_names() {
        let first = page_with(5, "$filter=n ge 3", 1, NextLinkMode::Mangled);
        let link = first["@odata.nextLink"].as_str().unwrap();
        assert_eq!(link, "http://h/api/things?=n+ge+3&=1&$skip=1");
        // Following it: the filter is gone (messy data) and the links keep coming,
        // each answer finite.
        let query = link.split_once('?').unwrap().1;
        let second = page_with(5, query, 1, NextLinkMode::Mangled);
        assert_eq!(second["value"][0]["id"], "m1", "unfiltered");
        assert_eq!(
            second["@odata.nextLink"],
            "http://h/api/things?=n+ge+3&=1&$skip=2"
        );
        let beyond = page_with(5, "=x&=1&$skip=50", 1, NextLinkMode::Mangled);
        assert_eq!(len(&beyond), 0);
        assert_eq!(
            beyond["@odata.nextLink"],
            "http://h/api/things?=x&=1&$skip=51"
        );
        let single = page_with(1, "$filter=n ge 0", 1, NextLinkMode::Mangled);
        assert!(single.get("@odata.nextLink").is_none());
    }

    #[test]
    fn bad_queries_are_refused() {
        let err = |q: &str| parse_query(Some(q)).unwrap_err();
        assert!(err("$top=10001").to_string().contains("at most 10000"));
        assert!(err("$skip=x").to_string().contains("$skip"));
        assert_eq!(parse_query(Some("%24top=5")).unwrap().top, Some(5));
        assert_eq!(err("$stop=5"), QueryError::CustomOption("$stop".into()));
        assert_eq!(
            err("$top=10001&%24Filter=x"),
            QueryError::CustomOption("$Filter".into()),
            "unknown options are refused first; names are case-sensitive"
        );
        let known = "$filter=id eq 'a'&$select=id&$orderby=id&$count=true&$expand=x&custom=1";
        assert_eq!(
            parse_query(Some(known)).unwrap().filter.as_deref(),
            Some("id eq 'a'")
        );
        assert!(parse_query(Some("=x&$skip=1")).unwrap().mangled);
    }
}
