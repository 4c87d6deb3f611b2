//! Keeps one MDE client per `DefenderConnection` (`run --connections`): each
//! connection gets its own task that builds the client from the spec, signs
//! in, and writes whether that works (`Ready`) and the budget left into the
//! connection's status. A slow or refused tenant only ever holds its own task.

use super::protection::Protection;
use super::registry::Connections;
use crate::metrics::{ConnectionObserver, Metrics};
use crate::tenants::resource::{
    ConnectionBudget, DefenderConnection, DefenderConnectionSpec, DefenderConnectionStatus, reason,
};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret as KubeSecret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use mde_client::{
    ApiFamily, BudgetWait, ClientConfig, ClientIdentity, Credential, CredentialSource,
    DefenderClient, Endpoints, FetchedCredential, RateBudget, RateLimits, Secret,
};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The audience Microsoft Entra expects of a federated (workload identity) token.
pub const WORKLOAD_IDENTITY_AUDIENCE: &str = "api://AzureADTokenExchange";

/// DefenderConnections read per page when the watch (re)lists.
const CONNECTION_PAGE: u32 = crate::pages::FULL_OBJECT_PAGE;

/// The longest wait between sign-in attempts of a connection that keeps
/// failing (it starts at [`RECHECK_NOT_READY`] and doubles, with jitter): a
/// hundred broken connections must not keep the login host busy.
pub const RECHECK_NOT_READY_CAP: Duration = Duration::from_secs(600);

/// How often a connection that works is checked again and its budget written.
pub const RECHECK_READY: Duration = Duration::from_secs(60);
/// How soon a connection that does not work is tried again.
pub const RECHECK_NOT_READY: Duration = Duration::from_secs(30);

/// What every connection's client shares with the operator's own.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub rate_limits: RateLimits,
    pub request_timeout: Duration,
    /// `--allow-insecure-http`: the same host rules as the operator's own.
    pub allow_insecure_http: bool,
    /// `host[:port]`s besides Microsoft's that a connection may point at
    /// (`--connection-allowed-hosts`, and the operator's own `--api-url` and
    /// `--authority-host`).
    pub allowed_hosts: Vec<String>,
}

pub use super::access::Readiness;

/// Where a connection's tokens and requests go: its cloud's hosts, or its
/// overrides under the operator's own host rules, and only to Microsoft's
/// login and MDE API hosts or hosts the operator's administrator allowed:
/// a connection must not be able to send the Secret it names (which its
/// author may not be able to read) anywhere else.
pub fn endpoints(
    spec: &DefenderConnectionSpec,
    settings: &ClientSettings,
) -> Result<Endpoints, String> {
    let cloud = spec.cloud.map(Into::into).unwrap_or_default();
    let endpoints = Endpoints::named(
        cloud,
        (spec.api_url.as_deref(), spec.login_url.as_deref()),
        settings.allow_insecure_http,
        ("spec.apiUrl", "spec.loginUrl"),
    )?;
    for (field, url) in [
        ("spec.apiUrl", &endpoints.api),
        ("spec.loginUrl", &endpoints.authority),
    ] {
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{field} must not carry a user name or password: the operator signs in with the connection's credential only"
            ));
        }
        if !host_allowed(url, &settings.allowed_hosts) {
            return Err(format!(
                "{field} {url} is not a Microsoft login or MDE API host: the operator sends a connection's credential only to those, and to hosts its administrator allows with --connection-allowed-hosts"
            ));
        }
    }
    Ok(endpoints)
}

/// Microsoft's login hosts and MDE API hosts (every cloud, regional ones
/// included, over https), or an entry of `allowed`: `[scheme://]host[:port]`,
/// matched on the host and the port (no port: the scheme's default port, so
/// `sim.test` allows `https://sim.test` and not `https://sim.test:8443`), and
/// on the scheme when the entry names one (without, the operator's http
/// rules decide which schemes may be used at all).
pub fn host_allowed(url: &url::Url, allowed: &[String]) -> bool {
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    let microsoft = matches!(
        host.as_str(),
        "login.microsoftonline.com"
            | "login.microsoftonline.us"
            | "api.security.microsoft.com"
            | "api.securitycenter.microsoft.com"
            | "api-gcc.securitycenter.microsoft.us"
            | "api-gov.securitycenter.microsoft.us"
    ) || host.ends_with(".api.security.microsoft.com")
        || (host.starts_with("api-") && host.ends_with(".securitycenter.microsoft.com"));
    if microsoft && url.scheme() == "https" {
        return true;
    }
    allowed
        .iter()
        .any(|entry| entry_allows(&entry.trim().to_ascii_lowercase(), url, &host))
}

/// Whether one allow-list entry (`[scheme://]host[:port]`, lower-case)
/// allows `url`, whose host is `host`.
fn entry_allows(entry: &str, url: &url::Url, host: &str) -> bool {
    let (scheme, rest) = match entry.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, entry),
    };
    if scheme.is_some_and(|s| s != url.scheme()) {
        return false;
    }
    let rest = rest.trim_end_matches('/');
    let (entry_host, entry_port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(port) => (h, Some(port)),
            // Not a port: not an entry this operator understands.
            Err(_) => return false,
        },
        None => (rest, None),
    };
    let default_port = match url.scheme() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    entry_host == host && url.port_or_known_default() == entry_port.or(default_port)
}

/// A client secret read from a key of a Secret in the connection's namespace
/// at every sign-in (get only: the operator never lists or watches Secrets).
#[derive(Clone)]
struct SecretKeySource {
    api: Api<KubeSecret>,
    namespace: String,
    name: String,
    key: String,
    /// PEM certificate and key rather than a client secret.
    certificate: bool,
}

impl std::fmt::Debug for SecretKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret {}/{} key {}",
            self.namespace, self.name, self.key
        )
    }
}

impl CredentialSource for SecretKeySource {
    fn fetch(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<FetchedCredential, String>> + Send + '_>> {
        async move {
            let what = format!("Secret {:?} in namespace {:?}", self.name, self.namespace);
            let field = if self.certificate {
                "spec.credential.certificate"
            } else {
                "spec.credential.clientSecret"
            };
            let secret = self.api.get(&self.name).await.map_err(|e| match e {
                kube::Error::Api(s) if s.is_not_found() => {
                    format!("{what} does not exist: create it, or fix {field}.name")
                }
                kube::Error::Api(s) if s.code == 403 => format!(
                    "the operator may not read {what} ({}): list the namespace in the chart's connections.namespaces",
                    s.message
                ),
                other => format!("cannot read {what}: {other}"),
            })?;
            let value = secret
                .data
                .as_ref()
                .and_then(|d| d.get(&self.key))
                .map(|bytes| String::from_utf8_lossy(&bytes.0).trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!(
                        "{what} has no key {:?} (or it is empty): fix {field}.key",
                        self.key
                    )
                })?;
            Ok(if self.certificate {
                FetchedCredential::Certificate(Secret::new(value))
            } else {
                FetchedCredential::ClientSecret(Secret::new(value))
            })
        }
        .boxed()
    }
}

/// The annotation by which a ServiceAccount's owner lets connections of its
/// namespace use it: the connections' names, comma-separated, or `*`. RBAC
/// cannot narrow `serviceaccounts/token: create` to some ServiceAccounts, so
/// without this anyone who may create a connection could borrow any
/// ServiceAccount of the namespace that has an Entra federation.
pub const TOKEN_OPT_IN_ANNOTATION: &str = "defender.offboard.dev/connections";

/// Whether `account`'s annotations let connection `connection` use it.
pub fn opted_in(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    connection: &str,
) -> bool {
    annotations
        .and_then(|a| a.get(TOKEN_OPT_IN_ANNOTATION))
        .is_some_and(|names| {
            names
                .split(',')
                .map(str::trim)
                .any(|name| name == "*" || name == connection)
        })
}

/// A federated token of a ServiceAccount in the connection's namespace,
/// requested at every sign-in (TokenRequest, the Workload ID audience), only
/// once the ServiceAccount is seen to opt in ([`TOKEN_OPT_IN_ANNOTATION`]).
#[derive(Clone)]
struct ServiceAccountTokenSource {
    api: Api<ServiceAccount>,
    namespace: String,
    name: String,
    connection: String,
}

impl std::fmt::Debug for ServiceAccountTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceAccount {}/{}", self.namespace, self.name)
    }
}

impl CredentialSource for ServiceAccountTokenSource {
    fn fetch(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<FetchedCredential, String>> + Send + '_>> {
        async move {
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: Some(vec![WORKLOAD_IDENTITY_AUDIENCE.into()]),
                    // The shortest Kubernetes allows: it is exchanged at once.
                    expiration_seconds: Some(600),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let what = format!("ServiceAccount {:?} in namespace {:?}", self.name, self.namespace);
            let account = self.api.get(&self.name).await.map_err(|e| match e {
                kube::Error::Api(s) if s.is_not_found() => format!(
                    "{what} does not exist: create it, or fix spec.credential.workloadIdentity.serviceAccountName"
                ),
                kube::Error::Api(s) if s.code == 403 => format!(
                    "the operator may not read {what} ({}): list the namespace in the chart's connections.namespaces",
                    s.message
                ),
                other => format!("cannot read {what}: {other}"),
            })?;
            if !opted_in(account.metadata.annotations.as_ref(), &self.connection) {
                return Err(format!(
                    "{what} does not let this connection use it: its owner opts in with the annotation {TOKEN_OPT_IN_ANNOTATION}={:?} (or a comma-separated list of connections, or \"*\"); no token was requested",
                    self.connection
                ));
            }
            let answer = self
                .api
                .create_token_request(&self.name, &PostParams::default(), &request)
                .await
                .map_err(|e| match e {
                    kube::Error::Api(s) if s.is_not_found() => format!(
                        "{what} does not exist: create it, or fix spec.credential.workloadIdentity.serviceAccountName"
                    ),
                    kube::Error::Api(s) if s.code == 403 => format!(
                        "the operator may not request a token for {what} ({}): list the namespace in the chart's connections.namespaces",
                        s.message
                    ),
                    other => format!("cannot request a token for {what}: {other}"),
                })?;
            let token = answer
                .status
                .and_then(|s| s.token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| format!("the token request for {what} came back without a token"))?;
            Ok(FetchedCredential::ClientAssertion(Secret::new(token)))
        }
        .boxed()
    }
}

/// The credential a connection's spec names, in its own namespace.
fn credential(
    client: &kube::Client,
    namespace: &str,
    connection: &str,
    spec: &DefenderConnectionSpec,
) -> Result<Credential, String> {
    let credential = &spec.credential;
    let secret_key = |reference: &crate::tenants::resource::SecretKeyRef, certificate| {
        Arc::new(SecretKeySource {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.into(),
            name: reference.name.clone(),
            key: reference.key.clone(),
            certificate,
        })
    };
    let source: Arc<dyn CredentialSource> = match (
        &credential.client_secret,
        &credential.certificate,
        &credential.workload_identity,
    ) {
        (Some(secret), None, None) => secret_key(secret, false),
        (None, Some(certificate), None) => secret_key(certificate, true),
        (None, None, Some(identity)) => Arc::new(ServiceAccountTokenSource {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.into(),
            name: identity.service_account_name.clone(),
            connection: connection.into(),
        }),
        _ => {
            return Err(
                "spec.credential needs exactly one of clientSecret, certificate or workloadIdentity"
                    .into(),
            );
        }
    };
    Ok(Credential::Fetched(source))
}

/// Rate budgets by tenant, app and API host: MDE counts its limits per tenant
/// and app, so two connections of the same app share one budget.
#[derive(Default, Clone)]
pub struct Budgets(Arc<Mutex<HashMap<AppKey, RateBudget>>>);

/// Tenant, app (client id) and API host.
type AppKey = (String, String, String);

impl Budgets {
    pub fn for_app(
        &self,
        tenant: &str,
        client: &str,
        api: &str,
        limits: &RateLimits,
    ) -> RateBudget {
        let mut budgets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A budget no client holds any more, with nothing left in its
        // windows, is dropped: a connection deleted, or recreated with
        // another tenant, frees its budget here once its last calls age out
        // (while they count, a connection recreated for that tenant must see them).
        budgets.retain(|_, budget| budget.is_shared() || !budget.is_idle());
        budgets
            .entry((
                tenant.to_lowercase(),
                client.to_lowercase(),
                api.to_string(),
            ))
            .or_insert_with(|| RateBudget::new(limits))
            .clone()
    }

    /// Budgets kept (for the memory tests).
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a connection's task needs.
#[derive(Clone)]
pub struct Shared {
    pub client: kube::Client,
    pub connections: Arc<Connections<DefenderClient>>,
    pub metrics: Arc<Metrics>,
    pub settings: ClientSettings,
    pub budgets: Budgets,
    /// One HTTP client for every connection's MDE client.
    pub http: mde_client::SharedHttp,
    pub reporter: Reporter,
}

/// The client a connection's spec describes, or why there is none.
fn build_client(
    shared: &Shared,
    namespace: &str,
    name: &str,
    spec: &DefenderConnectionSpec,
) -> Result<DefenderClient, Readiness> {
    let invalid = |message: String| Readiness::not(reason::INVALID_SPEC, message);
    let endpoints = endpoints(spec, &shared.settings).map_err(invalid)?;
    let credential = credential(&shared.client, namespace, name, spec).map_err(invalid)?;
    let identity = ClientIdentity {
        tenant_id: spec.tenant_id.clone(),
        client_id: spec.client_id.clone(),
        credential,
    };
    let budget = shared.budgets.for_app(
        &spec.tenant_id,
        &spec.client_id,
        endpoints.api.as_str(),
        &shared.settings.rate_limits,
    );
    let config = ClientConfig {
        endpoints,
        identity,
        rate_limits: shared.settings.rate_limits.clone(),
        request_timeout: shared.settings.request_timeout,
        // A worker never waits for budget: the resource is requeued instead.
        budget_wait: BudgetWait::Refuse,
    };
    let observer = Arc::new(ConnectionObserver {
        metrics: shared.metrics.clone(),
        connection: format!("{namespace}/{name}"),
    });
    DefenderClient::with_http(config, observer, budget, &shared.http)
        .map_err(|e| Readiness::not(reason::INVALID_SPEC, e.to_string()))
}

/// The connection's own protection rules (`spec.protectedTags`,
/// `spec.protectedNamePatterns`), or why they cannot be used.
fn connection_protection(
    spec: &DefenderConnectionSpec,
    name: &str,
) -> Result<Protection, Readiness> {
    Protection::from_connection(name, &spec.protected_tags, &spec.protected_name_patterns)
        .map_err(|message| Readiness::not(reason::INVALID_SPEC, message))
}

/// One connection, until its task is aborted (spec changed, deleted, or the
/// controller stopped): check, write the status, wait, again.
async fn keep(shared: Shared, connection: DefenderConnection) {
    let namespace = connection.namespace().unwrap_or_default();
    let name = connection.name_any();
    // The connection's protected devices are known before its client is
    // usable; rules that cannot be read leave it unusable (nothing is sent).
    let client = connection_protection(&connection.spec, &name)
        .map(|rules| shared.connections.set_protection(&namespace, &name, rules))
        .and_then(|()| build_client(&shared, &namespace, &name, &connection.spec));
    let mut last: Option<Readiness> = None;
    let mut failing = not_ready_waits();
    loop {
        let readiness = match &client {
            Err(refused) => refused.clone(),
            Ok(client) => super::access::check(client).await,
        };
        match (&client, readiness.ready) {
            (Ok(client), true) => {
                shared
                    .connections
                    .set_ready(&namespace, &name, Arc::new(client.clone()))
            }
            // The login host briefly down: a connection that worked keeps
            // its client (its sends retry on their own); others wait.
            _ if readiness.is_transient() && last.as_ref().is_some_and(|l| l.ready) => {}
            _ => shared.connections.set_not_ready(
                &namespace,
                &name,
                readiness.reason,
                &readiness.message,
            ),
        }
        let budget = client.as_ref().ok().map(|c| budget_left(c.budget()));
        if let Err(error) = write_status(&shared, &connection, &readiness, budget).await {
            tracing::warn!(connection = %format!("{namespace}/{name}"), error = %error, "could not write the DefenderConnection's status");
        }
        if last.as_ref().map(|l| (l.ready, l.reason)) != Some((readiness.ready, readiness.reason)) {
            publish(&shared, &connection, &readiness).await;
            tracing::info!(connection = %format!("{namespace}/{name}"), reason = readiness.reason, ready = readiness.ready, "connection checked");
        }
        let wait = if readiness.ready {
            failing = not_ready_waits();
            RECHECK_READY
        } else {
            failing.next().unwrap_or(RECHECK_NOT_READY_CAP)
        };
        last = Some(readiness);
        tokio::time::sleep(wait).await;
    }
}

/// The waits between sign-ins of a connection that is not ready: doubling
/// from [`RECHECK_NOT_READY`] to [`RECHECK_NOT_READY_CAP`], jittered so
/// connections that failed together do not retry together.
fn not_ready_waits() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(RECHECK_NOT_READY)
        .with_max_delay(RECHECK_NOT_READY_CAP)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .map(|wait| wait.min(RECHECK_NOT_READY_CAP))
}

/// Calls left now in the tightest window, per family.
fn budget_left(budget: &RateBudget) -> ConnectionBudget {
    ConnectionBudget {
        offboards_left: budget.remaining(ApiFamily::Offboard),
        reads_left: budget.remaining(ApiFamily::MachineActions),
        cancels_left: budget.remaining(ApiFamily::Cancel),
    }
}

async fn write_status(
    shared: &Shared,
    connection: &DefenderConnection,
    readiness: &Readiness,
    budget: Option<ConnectionBudget>,
) -> Result<(), kube::Error> {
    let api: Api<DefenderConnection> = Api::namespaced(
        shared.client.clone(),
        &connection.namespace().unwrap_or_default(),
    );
    let now = Time(jiff::Timestamp::now());
    let previous = connection
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let value = if readiness.ready { "True" } else { "False" };
    let transition = previous
        .filter(|c| c.status == value)
        .map_or(now.clone(), |c| c.last_transition_time.clone());
    let status = DefenderConnectionStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: value.into(),
            reason: readiness.reason.into(),
            message: readiness.message.clone(),
            last_transition_time: transition,
            observed_generation: connection.metadata.generation,
        }],
        observed_generation: connection.metadata.generation,
        budget,
        checked_at: Some(now),
    };
    api.patch_status(
        &connection.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map(|_| ())
}

/// An Event on the connection when its readiness changes.
async fn publish(shared: &Shared, connection: &DefenderConnection, readiness: &Readiness) {
    let recorder = Recorder::new(shared.client.clone(), shared.reporter.clone());
    let event = Event {
        type_: if readiness.ready {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: readiness.reason.into(),
        note: Some(readiness.message.chars().take(1024).collect()),
        action: "SignIn".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &connection.object_ref(&())).await {
        tracing::debug!(error = %error, "could not publish the connection's Event");
    }
}

/// A running connection task, aborted when dropped.
struct Task {
    generation: Option<i64>,
    spec: DefenderConnectionSpec,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Watch `DefenderConnection`s (all namespaces, or `namespace`) and keep one
/// task per connection; a changed spec restarts its task, a deleted one
/// ends it and takes its client away.
pub async fn run(shared: Shared, namespace: Option<String>) {
    let api: Api<DefenderConnection> = match &namespace {
        Some(ns) => Api::namespaced(shared.client.clone(), ns),
        None => Api::all(shared.client.clone()),
    };
    let mut tasks: HashMap<(String, String), Task> = HashMap::new();
    let mut relisted: Option<std::collections::HashSet<(String, String)>> = None;
    let config = watcher::Config::default().page_size(CONNECTION_PAGE);
    // Only the spec, name and status are read: annotations (256 KiB each, set
    // by anyone who may edit the connection) and managedFields are dropped
    // before a task keeps its copy.
    let mut events = watcher(api, config)
        .default_backoff()
        .modify(|connection| {
            connection.metadata.managed_fields = None;
            connection.metadata.annotations = None;
        })
        .boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(error = %error, "watching DefenderConnections failed; retrying");
                continue;
            }
        };
        match event {
            watcher::Event::Init => relisted = Some(Default::default()),
            watcher::Event::InitApply(connection) | watcher::Event::Apply(connection) => {
                let key = (
                    connection.namespace().unwrap_or_default(),
                    connection.name_any(),
                );
                if let Some(seen) = relisted.as_mut() {
                    seen.insert(key.clone());
                }
                let unchanged = tasks.get(&key).is_some_and(|t| {
                    t.generation == connection.metadata.generation && t.spec == connection.spec
                });
                if !unchanged {
                    shared.connections.set_checking(&key.0, &key.1);
                    let task = Task {
                        generation: connection.metadata.generation,
                        spec: connection.spec.clone(),
                        handle: tokio::spawn(keep(shared.clone(), connection)),
                    };
                    tasks.insert(key, task);
                }
            }
            watcher::Event::Delete(connection) => {
                let (namespace, name) = (
                    connection.namespace().unwrap_or_default(),
                    connection.name_any(),
                );
                tasks.remove(&(namespace.clone(), name.clone()));
                shared.connections.remove(&namespace, &name);
            }
            watcher::Event::InitDone => {
                shared.connections.mark_synced();
                if let Some(seen) = relisted.take() {
                    let gone: Vec<_> = tasks
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for (namespace, name) in gone {
                        tasks.remove(&(namespace.clone(), name.clone()));
                        shared.connections.remove(&namespace, &name);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::resource::{ConnectionCredential, SecretKeyRef};

    fn spec(api_url: Option<&str>) -> DefenderConnectionSpec {
        DefenderConnectionSpec {
            tenant_id: "t".into(),
            client_id: "c".into(),
            cloud: None,
            api_url: api_url.map(Into::into),
            login_url: None,
            credential: ConnectionCredential {
                client_secret: Some(SecretKeyRef {
                    name: "s".into(),
                    key: "k".into(),
                }),
                certificate: None,
                workload_identity: None,
            },
            protected_tags: Vec::new(),
            protected_name_patterns: Vec::new(),
        }
    }

    fn settings(allow_insecure_http: bool, allowed_hosts: &[&str]) -> ClientSettings {
        ClientSettings {
            rate_limits: RateLimits::default(),
            request_timeout: Duration::from_secs(30),
            allow_insecure_http,
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    /// A connection's credential goes to Microsoft's hosts, or to hosts the
    /// administrator allowed, under the operator's http rules; never to a
    /// host the connection's author picked.
    #[test]
    fn a_connection_sends_its_credential_only_to_allowed_hosts() {
        let none = settings(false, &[]);
        assert!(endpoints(&spec(None), &none).is_ok());
        assert!(endpoints(&spec(Some("https://eu.api.security.microsoft.com")), &none).is_ok());
        assert!(
            endpoints(
                &spec(Some("https://api-us.securitycenter.microsoft.com")),
                &none
            )
            .is_ok()
        );
        let error = endpoints(&spec(Some("https://evil.example")), &none).unwrap_err();
        assert!(
            error.contains("spec.apiUrl") && error.contains("--connection-allowed-hosts"),
            "{error}"
        );
        let error = endpoints(
            &spec(Some("https://api.security.microsoft.com.evil.example")),
            &none,
        )
        .unwrap_err();
        assert!(error.contains("spec.apiUrl"), "{error}");
        let error = endpoints(&spec(Some("http://evil.example")), &none).unwrap_err();
        assert!(
            error.contains("spec.apiUrl") && error.contains("plain http"),
            "{error}"
        );
        // Loopback plain http is allowed by the http rules, but not as a host.
        assert!(endpoints(&spec(Some("http://127.0.0.1:9")), &none).is_err());
        let simulator = settings(false, &["127.0.0.1:9"]);
        let mut both = spec(Some("http://127.0.0.1:9"));
        both.login_url = Some("http://127.0.0.1:9".into());
        assert!(endpoints(&both, &simulator).is_ok());
        assert!(endpoints(&spec(Some("http://127.0.0.1:10")), &simulator).is_err());
        let test_cluster = settings(true, &["sim.test:8090"]);
        let mut in_cluster = spec(Some("http://sim.test:8090"));
        in_cluster.login_url = Some("http://sim.test:8090".into());
        assert!(endpoints(&in_cluster, &test_cluster).is_ok());
    }

    /// An allow-list entry is matched on host and port (no port: the
    /// scheme's default), and on the scheme when it names one; a URL with a
    /// user name or password is refused whatever its host.
    #[test]
    fn allowed_hosts_match_scheme_host_and_port_and_userinfo_is_refused() {
        let url = |u: &str| url::Url::parse(u).unwrap();
        let rows = [
            ("proxy.corp", "https://proxy.corp", true),
            ("proxy.corp", "https://proxy.corp:8443", false),
            ("proxy.corp:8443", "https://proxy.corp:8443", true),
            ("https://proxy.corp", "https://proxy.corp", true),
            ("https://proxy.corp", "http://proxy.corp", false),
            ("https://proxy.corp:8443/", "https://proxy.corp:8443", true),
            ("proxy.corp", "https://proxy.corp.evil.example", false),
            ("127.0.0.1:9", "http://127.0.0.1:9", true),
            ("127.0.0.1", "http://127.0.0.1:9", false),
            ("proxy.corp:notaport", "https://proxy.corp", false),
        ];
        for (entry, target, allowed) in rows {
            assert_eq!(
                host_allowed(&url(target), &[entry.to_string()]),
                allowed,
                "{entry} -> {target}"
            );
        }
        let none = settings(false, &[]);
        for field in ["apiUrl", "loginUrl"] {
            let mut with_user = spec(None);
            let with = Some("https://user:secret@api.security.microsoft.com".to_string());
            if field == "apiUrl" {
                with_user.api_url = with;
            } else {
                with_user.login_url = Some("https://user@login.microsoftonline.com".into());
            }
            let error = endpoints(&with_user, &none).unwrap_err();
            assert!(
                error.contains(&format!("spec.{field}")) && error.contains("user name"),
                "{error}"
            );
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn one_budget_per_tenant_and_app() {
        let budgets = Budgets::default();
        let limits = RateLimits::default();
        let a = budgets.for_app("T", "c", "https://api", &limits);
        let b = budgets.for_app("t", "C", "https://api", &limits);
        let other = budgets.for_app("t2", "c", "https://api", &limits);
        a.try_reserve(ApiFamily::Offboard).unwrap().complete();
        assert_eq!(
            b.remaining(ApiFamily::Offboard),
            a.remaining(ApiFamily::Offboard)
        );
        assert!(other.remaining(ApiFamily::Offboard) > a.remaining(ApiFamily::Offboard));
    }

    /// A `tenantId` edited (a connection recreated) in a loop must not keep
    /// one budget per tenant it ever named: a budget no client holds and
    /// nothing counts in is dropped, one whose calls still count is kept.
    #[tokio::test(start_paused = true)]
    async fn budgets_of_gone_connections_are_freed_once_their_calls_age_out() {
        let budgets = Budgets::default();
        let limits: RateLimits = "5/10s".parse().unwrap();
        for tenant in 0..1000 {
            let client = budgets.for_app(&format!("t{tenant}"), "c", "https://api", &limits);
            drop(client);
        }
        assert!(budgets.len() <= 1, "{} budgets kept", budgets.len());
        let used = budgets.for_app("busy", "c", "https://api", &limits);
        used.try_reserve(ApiFamily::Offboard).unwrap().complete();
        drop(used);
        let _other = budgets.for_app("other", "c", "https://api", &limits);
        let again = budgets.for_app("busy", "c", "https://api", &limits);
        assert_eq!(
            again.remaining(ApiFamily::Offboard),
            4,
            "its call still counts"
        );
        drop(again);
        tokio::time::advance(std::time::Duration::from_secs(11)).await;
        let _third = budgets.for_app("third", "c", "https://api", &limits);
        assert_eq!(budgets.len(), 2, "busy aged out; other and third are held");
    }

    #[test]
    fn sign_in_waits_double_to_the_cap() {
        let waits: Vec<Duration> = not_ready_waits().take(12).collect();
        assert!(waits[0] >= RECHECK_NOT_READY);
        assert!(waits.windows(2).take(3).all(|w| w[1] >= w[0]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= RECHECK_NOT_READY_CAP));
        assert_eq!(waits[11], RECHECK_NOT_READY_CAP);
    }
}
