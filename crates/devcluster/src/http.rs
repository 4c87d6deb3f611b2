//! HTTP routing: kube-apiserver's URL layout, query parameters, content
//! negotiation (JSON, YAML bodies, the Table form) and Status errors.

use super::discovery;
use super::openapi;
use super::ops::{Shared, WriteParams, Written, to_external};
use super::paging::PageRequest;
use super::patch::PatchKind;
use super::protobuf;
use super::registry::ResourceType;
use super::scale;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::table;
use super::token;
use super::validation::FieldValidation;
use super::watch::{self, WatchParams};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a deleted namespace stays `Terminating` before its objects are deleted.
const NAMESPACE_CASCADE_DELAY: Duration = Duration::from_millis(500);

/// What every handler needs.
#[derive(Debug)]
pub struct App {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
}

pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(app)
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `201` or `200`, with one `Warning: 299` header per pruned unknown field, as kube-apiserver sends.
fn written_response(written: &Written) -> Response {
    let mut response = json_response(if written.created { 201 } else { 200 }, &written.object);
    for warning in &written.warnings {
        let text = format!("299 - {}", serde_json::Value::from(warning.as_str()));
        if let Ok(value) = header::HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

fn error_response(error: &ApiError) -> Response {
    json_response(error.code, &error.to_status())
}

/// Where a resource request points.
#[derive(Debug, Clone)]
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// Split the part after `/api/v1` or `/apis/g/v` into namespace, resource, name and subresource.
fn parse_rest(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let namespaced_form = rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"));
    let (namespace, rest) = if namespaced_form {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    if rest.is_empty() || rest.len() > 3 {
        return None;
    }
    Some(Target {
        group: group.into(),
        version: version.into(),
        plural: rest[0].into(),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    matches!(
        query.get(name).map(String::as_str),
        Some("true") | Some("1")
    )
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if body.starts_with(b"k8s\0") {
        return protobuf::to_json(body);
    }
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return Ok(value);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    serde_yaml_ng::from_slice::<Value>(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body ({content_type}) is neither JSON nor YAML: {e}"
        ))
    })
}

/// The representation asked for in `Accept` (`as=Table`, `as=PartialObjectMetadata[List]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Object,
    Table,
    Metadata,
}

fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn form(headers: &HeaderMap) -> Form {
    let accept = accept(headers);
    // The first media type kube-apiserver can serve wins; all of these are JSON.
    for media in accept.split(',') {
        if media.contains("as=Table") {
            return Form::Table;
        }
        if media.contains("as=PartialObjectMetadata") {
            return Form::Metadata;
        }
        if media.contains("json") || media.contains("*/*") {
            return Form::Object;
        }
    }
    Form::Object
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    tracing::debug!(%method, %uri, "request");
    match route(&app, &method, &uri, &headers, &body).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(%method, %uri, %error, "request failed");
            error_response(&error)
        }
    }
}

async fn route(
    app: &Arc<App>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let registry = app.shared.registry();
    let get_only = |value: Option<Value>| -> Result<Response, ApiError> {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        value
            .map(|v| json_response(200, &v))
            .ok_or_else(ApiError::path_not_found)
    };
    match segments.as_slice() {
        ["version"] => get_only(Some(discovery::version())),
        ["healthz"] | ["readyz"] | ["livez"] => Ok((StatusCode::OK, "ok").into_response()),
        ["metrics"] if method == Method::GET => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            app.shared.metrics(),
        )
            .into_response()),
        // Not kube-apiserver's: lets tests force what etcd compaction plus a watch timeout do.
        ["_dev", "compact"] if method == Method::POST => {
            app.shared.compact();
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        ["api"] | ["apis"]
            if method == Method::GET && discovery::wants_aggregated(accept(headers)) =>
        {
            let body = discovery::aggregated(&registry, segments[0] == "api");
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, discovery::AGGREGATED_V2)],
                body.to_string(),
            )
                .into_response())
        }
        ["api"] => get_only(Some(discovery::core_versions(&app.addr.to_string()))),
        ["apis"] => get_only(Some(discovery::group_list(&registry))),
        ["openapi", "v3"] => get_only(Some(openapi::v3_index(&registry))),
        ["openapi", "v3", "api", version] => get_only(openapi::v3_document(&registry, "", version)),
        ["openapi", "v3", "apis", group, version] => {
            get_only(openapi::v3_document(&registry, group, version))
        }
        ["openapi", "v2"] => get_only(Some(openapi::v2_document(&registry))),
        // No authorization here: `kubectl auth can-i` is always told yes.
        [
            "apis",
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
        ] if method == Method::POST => Ok(json_response(201, &discovery::access_allowed())),
        ["api", version] => get_only(discovery::resource_list(&registry, "", version)),
        ["apis", group] => get_only(discovery::group(&registry, group)),
        ["apis", group, version] => get_only(discovery::resource_list(&registry, group, version)),
        ["api", version, rest @ ..] => {
            let target = parse_rest("", version, rest).ok_or_else(ApiError::path_not_found)?;
            resource(app, target, method, uri, headers, body).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = parse_rest(group, version, rest).ok_or_else(ApiError::path_not_found)?;
            resource(app, target, method, uri, headers, body).await
        }
        _ => Err(ApiError::path_not_found()),
    }
}

fn write_params(query: &HashMap<String, String>, headers: &HeaderMap) -> WriteParams {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    WriteParams {
        dry_run: query.contains_key("dryRun"),
        field_manager: query.get("fieldManager").cloned(),
        force: flag(query, "force"),
        // kube-apiserver names the manager after the User-Agent's program name.
        default_manager: agent.split('/').next().unwrap_or_default().to_string(),
        field_validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str)),
    }
}

fn page_request(query: &HashMap<String, String>) -> Result<PageRequest<'_>, ApiError> {
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(raw) => raw
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {raw:?}")))?
            .max(0) as usize,
    };
    Ok(PageRequest {
        limit,
        token: query
            .get("continue")
            .map(String::as_str)
            .filter(|t| !t.is_empty()),
    })
}

fn selectors(
    rt: &ResourceType,
    query: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels =
        LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let extra: &[&str] = if rt.kind == "Secret" {
        &["type"]
    } else if rt.is_namespaces() {
        &["status.phase"]
    } else {
        &[]
    };
    let fields = FieldSelector::parse(
        query.get("fieldSelector").map(String::as_str).unwrap_or(""),
        rt.is_events(),
        extra,
    )?;
    Ok((labels, fields))
}

async fn resource(
    app: &Arc<App>,
    target: Target,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let shared = &app.shared;
    let rt = shared
        .registry()
        .find(&target.group, &target.version, &target.plural)
        .ok_or_else(ApiError::path_not_found)?;
    if target.namespace.is_some() && !rt.namespaced {
        return Err(ApiError::path_not_found());
    }
    if rt.namespaced && target.namespace.is_none() && target.name.is_some() {
        return Err(ApiError::path_not_found());
    }
    let subresource = target.subresource.clone().unwrap_or_default();
    let served = match subresource.as_str() {
        "" => true,
        "status" => rt.status_subresource,
        "finalize" => rt.is_namespaces(),
        "scale" => rt.scale.is_some(),
        "token" => rt.serves_token(),
        _ => false,
    };
    if !served {
        return Err(ApiError::path_not_found());
    }
    if subresource == "scale" {
        let (ns, name) = (target.namespace.as_deref(), target.name.as_deref());
        return scale_request(shared, &rt, ns, name, method, uri, headers, body);
    }
    if subresource == "token" {
        // Only `create` is served on the token subresource.
        if method != Method::POST {
            return Err(ApiError::method_not_allowed());
        }
        let (Some(ns), Some(name)) = (target.namespace.as_deref(), target.name.as_deref()) else {
            return Err(ApiError::path_not_found());
        };
        let request = token::create(shared, &rt, ns, name, &parse_body(headers, body)?)?;
        return Ok(json_response(201, &request));
    }
    let query = query_map(uri);
    let ns = target.namespace.as_deref();
    let form = form(headers);
    let include = query
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".into());
    let params = write_params(&query, headers);
    match (method.clone(), target.name.as_deref()) {
        (Method::GET, None) => {
            let (labels, fields) = selectors(&rt, &query)?;
            if flag(&query, "watch") {
                return watch_response(app, rt, ns, &query, labels, fields, form, include);
            }
            let selector = query.get("labelSelector").map(String::as_str).unwrap_or("");
            tokio::select! {
                () = shared.holds.pass(&rt.plural, selector) => {}
                () = shared.shutdown.cancelled() => {
                    return Err(ApiError::new(503, "ServiceUnavailable", "the API is shutting down"));
                }
            }
            let page = shared.list_page(&rt, ns, &labels, &fields, page_request(&query)?)?;
            let objects: Vec<Value> = page.items.iter().map(|o| to_external(&rt, o)).collect();
            let rv = page.rv;
            let mut body = match form {
                Form::Table => table::table(&rt, &objects, Some(rv), &include),
                Form::Metadata => table::partial_metadata_list(&objects, rv),
                Form::Object => serde_json::json!({
                    "apiVersion": rt.api_version(),
                    "kind": rt.list_kind,
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": objects,
                }),
            };
            if let Some(token) = page.continue_token {
                body["metadata"]["continue"] = token.into();
            }
            if let Some(remaining) = page.remaining {
                body["metadata"]["remainingItemCount"] = remaining.into();
            }
            Ok(json_response(200, &body))
        }
        (Method::GET, Some(name)) => {
            let object = shared.get(&rt, ns, name)?;
            let body = match form {
                Form::Table => table::table(&rt, &[object], None, &include),
                Form::Metadata => table::partial_metadata(&object),
                Form::Object => object,
            };
            Ok(json_response(200, &body))
        }
        (Method::POST, None) if rt.namespaced && ns.is_none() => {
            Err(ApiError::method_not_allowed())
        }
        (Method::POST, None) => {
            let written = shared.create(&rt, ns, parse_body(headers, body)?, &params)?;
            Ok(written_response(&written))
        }
        (Method::PUT, Some(name)) => {
            let written = shared.update(
                &rt,
                ns,
                name,
                &subresource,
                parse_body(headers, body)?,
                &params,
            )?;
            Ok(written_response(&written))
        }
        (Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let kind = PatchKind::from_content_type(content_type)?;
            let patch = parse_body(headers, body)?;
            let written = shared.patch(&rt, ns, name, &subresource, kind, &patch, &params)?;
            Ok(written_response(&written))
        }
        (Method::DELETE, Some(name)) => {
            let options = parse_body(headers, body).unwrap_or(Value::Null);
            let object = shared.delete(&rt, ns, name, &options, &params)?;
            if rt.is_namespaces() && !params.dry_run {
                // kube's namespace controller empties a terminating namespace shortly after.
                let shared = shared.clone();
                let name = name.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(NAMESPACE_CASCADE_DELAY).await;
                    shared.finish_namespace(&name);
                });
            }
            Ok(json_response(200, &object))
        }
        (Method::DELETE, None) => {
            let (labels, fields) = selectors(&rt, &query)?;
            let (items, _) = shared.list_stored(&rt, ns, &labels, &fields);
            let mut deleted = Vec::new();
            for item in items {
                let name = item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let item_ns = item["metadata"]["namespace"].as_str().map(String::from);
                if let Ok(object) =
                    shared.delete(&rt, item_ns.as_deref(), &name, &Value::Null, &params)
                {
                    deleted.push(object);
                }
            }
            Ok(json_response(
                200,
                &serde_json::json!({"apiVersion": rt.api_version(), "kind": rt.list_kind,
                    "metadata": {"resourceVersion": shared.current_rv().to_string()}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

#[allow(clippy::too_many_arguments)]
fn scale_request(
    shared: &Shared,
    rt: &ResourceType,
    ns: Option<&str>,
    name: Option<&str>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let name = name.ok_or_else(ApiError::path_not_found)?;
    let params = write_params(&query_map(uri), headers);
    let scale = match *method {
        Method::GET => scale::get(shared, rt, ns, name)?,
        Method::PUT => scale::update(shared, rt, ns, name, &parse_body(headers, body)?, &params)?,
        Method::PATCH => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let kind = PatchKind::from_content_type(content_type)?;
            scale::patch(
                shared,
                rt,
                ns,
                name,
                kind,
                &parse_body(headers, body)?,
                &params,
            )?
        }
        _ => return Err(ApiError::method_not_allowed()),
    };
    Ok(json_response(200, &scale))
}

#[allow(clippy::too_many_arguments)]
fn watch_response(
    app: &Arc<App>,
    rt: Arc<ResourceType>,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
    labels: LabelSelector,
    fields: FieldSelector,
    form: Form,
    include: String,
) -> Result<Response, ApiError> {
    let params = WatchParams {
        namespace: namespace.map(String::from),
        resource_version: query.get("resourceVersion").cloned(),
        labels,
        fields,
        bookmarks: flag(query, "allowWatchBookmarks"),
        timeout: query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs),
        send_initial_events: flag(query, "sendInitialEvents"),
    };
    let render: watch::Render = match form {
        Form::Table => Arc::new(move |rt: &ResourceType, object: Value| {
            table::table(rt, &[object], None, &include)
        }),
        Form::Metadata => {
            Arc::new(|_: &ResourceType, object: Value| table::partial_metadata(&object))
        }
        Form::Object => Arc::new(|_: &ResourceType, object: Value| object),
    };
    let rx = watch::start(app.shared.clone(), rt, params, render)?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            error_response(&ApiError::new(
                500,
                "InternalError",
                "could not start the watch",
            ))
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_layout() {
        let t = parse_rest("", "v1", &["namespaces", "default", "secrets", "s"]).unwrap();
        assert_eq!(
            (t.namespace.as_deref(), t.plural.as_str(), t.name.as_deref()),
            (Some("default"), "secrets", Some("s"))
        );
        let t = parse_rest("", "v1", &["namespaces", "prod", "status"]).unwrap();
        assert_eq!(
            (
                t.namespace,
                t.plural.as_str(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            (None, "namespaces", Some("prod"), Some("status"))
        );
        let t = parse_rest("g", "v", &["things"]).unwrap();
        assert_eq!((t.namespace, t.name), (None, None));
    }
}
