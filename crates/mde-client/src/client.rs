//! Typed calls to the MDE API, each within the tenant's rate budget.

use super::auth::{ClientIdentity, TokenSource};
use super::cloud::{Endpoints, same_origin};
use super::error::{
    BodyError, CallKind, MdeError, error_chain, parse_retry_after, read_capped, request_id,
};
use super::limiter::{ApiFamily, Permit, RateBudget, RateLimits};
use super::types::{CountedPage, ErrorBody, Machine, MachineAction, WindowAction};
use jiff::Timestamp;
use reqwest::Method;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use url::Url;

/// The most pages one list follows: 100 pages of up to 10,000 items.
pub const MAX_PAGES: usize = 100;

/// Whether `comment` carries `marker` as the operator writes it: its leading
/// token ([`comment_with_marker`]). A marker anywhere else is someone's text
/// (a comment quoting another request's marker) and attributes nothing.
pub fn has_marker(comment: &str, marker: &str) -> bool {
    comment.split_whitespace().next() == Some(marker)
}

/// How many action ids go in one filter: keeps the URL well under common
/// 8 KiB limits in either form (about 45 encoded characters a GUID with
/// `in`, 60 with `or`; see [`ids_filter`]).
pub const IDS_PER_QUERY: usize = 50;

/// The most items MDE returns for one list call (`$top` up to 10,000).
pub const MAX_TOP: usize = 10_000;

/// The largest API answer read: 32 MiB. The largest legitimate one is a page
/// of [`MAX_TOP`] machine actions; an action is under 1 KB of JSON, 1.6 KB
/// with a comment of the longest length the operator writes, so a full page
/// is at most about 16 MB and the cap leaves twice that. A larger cap (64 MiB)
/// would let one answer plus its parse pass the pod's 128 MiB memory limit
/// next to the operator's own working set (~33 MiB at 10,000 resources).
pub const MAX_API_BODY: usize = 32 * 1024 * 1024;

/// Everything needed to talk to one tenant's MDE.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub endpoints: Endpoints,
    pub identity: ClientIdentity,
    pub rate_limits: RateLimits,
    pub request_timeout: Duration,
    pub budget_wait: BudgetWait,
}

/// What a call does when the rate budget has no slot for it now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BudgetWait {
    /// Wait for the slot (the CLI: one request, nothing else to do).
    #[default]
    Wait,
    /// Answer [`MdeError::BudgetSpent`] at once (the controller: a worker
    /// must never sit on a budget wait; the resource is requeued instead).
    Refuse,
}

/// The MDE client: sign-in, rate budget and typed calls.
#[derive(Clone)]
pub struct DefenderClient {
    inner: Arc<Inner>,
}

/// The tenant, app (client id) and API host a client speaks for, lower-case.
/// Machine ids are unique within a tenant of one API host, and MDE counts
/// its rate limits per tenant and app: two connections (or the operator's own
/// credentials and a connection) to one tenant reach the same machines.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account {
    pub tenant: String,
    pub app: String,
    pub api: String,
}

impl Account {
    /// The tenant alone (any app): whose machines these are.
    pub fn tenant_only(&self) -> Account {
        Account {
            app: String::new(),
            ..self.clone()
        }
    }
}

struct Inner {
    http: reqwest::Client,
    account: Account,
    api: Url,
    tokens: TokenSource,
    budget: RateBudget,
    limits: RateLimits,
    budget_wait: BudgetWait,
    observer: Arc<dyn CallObserver>,
    /// MDE refused an `id in (...)` filter once: poll by id with `or` from then on.
    ids_with_or: AtomicBool,
}

/// One API call: what it is, and whether it can change something at MDE.
struct Call {
    family: ApiFamily,
    method: Method,
    url: Url,
    body: Option<serde_json::Value>,
    kind: CallKind,
}

impl Call {
    fn read(family: ApiFamily, url: Url) -> Self {
        Call {
            family,
            method: Method::GET,
            url,
            body: None,
            kind: CallKind::Read,
        }
    }
}

/// What the client reports about its calls, so the operator can count them
/// without this crate knowing its metrics.
pub trait CallObserver: Send + Sync {
    /// A call got an answer with this HTTP status (0: no answer at all).
    fn request_finished(&self, _family: ApiFamily, _status: u16) {}
    /// A call waited this long for rate budget before it was sent.
    fn budget_waited(&self, _family: ApiFamily, _waited: Duration) {}
}

/// An observer that ignores everything (the CLI, tests).
pub struct NoObserver;

impl CallObserver for NoObserver {}

/// The marker that ties an action to the request that created it. It travels in
/// the action's `requestorComment`, the only free-text field MDE gives back.
pub fn correlation_marker(key: &str) -> String {
    format!("[defender-offboard:{key}]")
}

/// The key in the marker a comment starts with (`[defender-offboard:KEY] ...`),
/// if it carries one: which request (resource uid or CLI key) created an action.
pub fn marker_key(comment: &str) -> Option<&str> {
    let token = comment.split_whitespace().next()?;
    token.strip_prefix("[defender-offboard:")?.strip_suffix(']')
}

/// The offboard comment with the marker appended.
/// The marker goes first, so a length cap at MDE can never cut it off.
pub fn comment_with_marker(comment: &str, key: &str) -> String {
    format!("{} {}", correlation_marker(key), comment.trim())
}

/// Whether every id in `expected` is among `actions`.
pub fn all_found(actions: &[MachineAction], expected: &[String]) -> bool {
    let read: std::collections::HashSet<&str> = actions.iter().map(|a| a.id.as_str()).collect();
    expected.iter().all(|id| read.contains(id.as_str()))
}

/// What a list read: the entries that read, and how many did not (see
/// `CountedPage`). Presence may be read from any list; absence ("no action
/// with this marker", "nothing pending", a short last page) only from one
/// that left nothing out.
struct Listed<T> {
    items: Vec<T>,
    unreadable: usize,
}

impl<T> Listed<T> {
    /// The entries, if every one read; otherwise an error naming the count,
    /// for answers that could show something absent.
    fn complete(self, path: &str) -> Result<Vec<T>, MdeError> {
        if self.unreadable == 0 {
            return Ok(self.items);
        }
        Err(MdeError::InvalidResponse {
            message: format!(
                "{} of the entries MDE answered for {path} do not read (no id, or a field of the wrong type); without them the answer cannot show that anything is absent",
                self.unreadable
            ),
        })
    }
}

impl<T> From<CountedPage<T>> for Listed<T> {
    fn from(page: CountedPage<T>) -> Self {
        Listed {
            items: page.items,
            unreadable: page.unreadable,
        }
    }
}

/// An OData string literal: single quotes doubled.
pub fn odata_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The `$filter` that finds the machines named `name`: a name with a dot is
/// a fully qualified name (what `computerDnsName` holds) and must match
/// whole; a dotless one is a host name, matched alone or with any domain.
pub fn machine_name_filter(name: &str) -> String {
    let quoted = odata_quote(name);
    if name.contains('.') {
        format!("computerDnsName eq {quoted}")
    } else {
        let prefix = odata_quote(&format!("{name}."));
        format!("computerDnsName eq {quoted} or startswith(computerDnsName,{prefix})")
    }
}

/// Whether a machine's `computerDnsName` answers to `name`, ASCII case
/// aside: equal, or `name.<domain>` for a dotless name. Applied to what MDE
/// answers too, since its matching may be looser than the filter asks.
pub fn machine_name_matches(name: &str, dns_name: &str) -> bool {
    let (name, dns_name) = (name.to_ascii_lowercase(), dns_name.to_ascii_lowercase());
    dns_name == name
        || (!name.contains('.')
            && dns_name
                .strip_prefix(&name)
                .is_some_and(|domain| domain.starts_with('.')))
}

/// How a batch of action ids is put in one `$filter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdsFilter {
    /// `id in ('a','b')`: short, used by public clients, not documented for
    /// machine actions.
    In,
    /// `id eq 'a' or id eq 'b'`: longer, built only of documented pieces.
    Or,
}

/// The `$filter` reading the actions `ids` in `form`.
pub fn ids_filter(ids: &[String], form: IdsFilter) -> String {
    let quoted = ids.iter().map(|id| odata_quote(id));
    match form {
        IdsFilter::In => format!("id in ({})", quoted.collect::<Vec<_>>().join(",")),
        IdsFilter::Or => quoted
            .map(|id| format!("id eq {id}"))
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

/// Whether MDE answered 400 (whatever its code or wording), the refusal of
/// a query it does not accept.
fn is_bad_request(error: &MdeError) -> bool {
    match error {
        MdeError::BadRequest { status, .. } => *status == 400,
        MdeError::AlreadyPending { .. } | MdeError::PlatformNotSupported { .. } => true,
        _ => false,
    }
}

/// What a 403 to a read of machines means, and the permission to grant.
fn read_forbidden(code: String, message: String) -> MdeError {
    MdeError::Forbidden {
        code,
        message: format!(
            "{message}; the app may not read machines: grant it the application permission Machine.Read.All or Machine.ReadWrite.All (WindowsDefenderATP) with admin consent in Microsoft Entra"
        ),
    }
}

/// One HTTP client (connection pool, TLS configuration, root certificates)
/// for every [`DefenderClient`] built with it: an operator serving hundreds
/// of tenants holds one, not one per tenant. Safe to share: nothing of a
/// tenant's lives in it (no cookies; each request carries its own token).
#[derive(Clone, Debug)]
pub struct SharedHttp(reqwest::Client);

/// Idle connections kept per host (reqwest keeps any number by default).
const IDLE_CONNECTIONS_PER_HOST: usize = 2;
/// How long an idle connection is kept (reqwest's default is 90 s).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

impl SharedHttp {
    pub fn new(request_timeout: Duration) -> Result<Self, MdeError> {
        reqwest::Client::builder()
            .user_agent(concat!("defender-offboard/", env!("CARGO_PKG_VERSION")))
            .timeout(request_timeout)
            .connect_timeout(Duration::from_secs(10))
            // Idle connections are what many tenants cost (each keeps its
            // buffers): a tenant's steady pace needs one or two at a time,
            // and a burst's extra connections close when they come back.
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            // Never follow redirects: a redirect could carry the bearer token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map(SharedHttp)
            .map_err(|e| MdeError::Credentials {
                message: format!("cannot build the HTTP client: {e}"),
            })
    }
}

impl DefenderClient {
    pub fn new(config: ClientConfig, observer: Arc<dyn CallObserver>) -> Result<Self, MdeError> {
        let budget = RateBudget::new(&config.rate_limits);
        Self::with_budget(config, observer, budget)
    }

    /// A client that spends `budget`, which other clients of the same tenant
    /// and app may share: MDE counts its limits per tenant and app.
    pub fn with_budget(
        config: ClientConfig,
        observer: Arc<dyn CallObserver>,
        budget: RateBudget,
    ) -> Result<Self, MdeError> {
        let http = SharedHttp::new(config.request_timeout)?;
        Self::with_http(config, observer, budget, &http)
    }

    /// A client that sends through `http`, which other clients share (its
    /// request timeout is `http`'s, not `config`'s).
    pub fn with_http(
        config: ClientConfig,
        observer: Arc<dyn CallObserver>,
        budget: RateBudget,
        http: &SharedHttp,
    ) -> Result<Self, MdeError> {
        let http = http.0.clone();
        let account = Account {
            tenant: config.identity.tenant_id.to_ascii_lowercase(),
            app: config.identity.client_id.to_ascii_lowercase(),
            api: config.endpoints.api.as_str().to_ascii_lowercase(),
        };
        let tokens = TokenSource::new(
            http.clone(),
            &config.endpoints.authority,
            config.endpoints.scope.clone(),
            config.identity,
        )?;
        Ok(DefenderClient {
            inner: Arc::new(Inner {
                http,
                account,
                api: config.endpoints.api,
                tokens,
                budget,
                limits: config.rate_limits,
                budget_wait: config.budget_wait,
                observer,
                ids_with_or: AtomicBool::new(false),
            }),
        })
    }

    pub fn budget(&self) -> &RateBudget {
        &self.inner.budget
    }

    /// Whose machines and whose rate limits this client reaches.
    pub fn account(&self) -> &Account {
        &self.inner.account
    }

    pub fn rate_limits(&self) -> &RateLimits {
        &self.inner.limits
    }

    /// Sign in now, to fail fast on bad credentials.
    pub async fn check_sign_in(&self) -> Result<(), MdeError> {
        self.inner.tokens.token().await.map(|_| ())
    }

    /// Sign in, and read the application roles the token grants (`None`:
    /// the token does not say, e.g. it is not a JWT).
    pub async fn granted_roles(&self) -> Result<Option<Vec<String>>, MdeError> {
        let token = self.inner.tokens.token().await?;
        Ok(crate::auth::token_roles(&token))
    }

    /// `POST /api/machines/{id}/offboard`. Not idempotent: on
    /// [`MdeError::OutcomeUnknown`] look the action up before sending again.
    pub async fn offboard(
        &self,
        machine_id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        self.offboard_reserved(None, machine_id, comment).await
    }

    /// [`DefenderClient::offboard`] in a budget slot the caller reserved
    /// (see [`RateBudget::try_reserve`]), so it never waits for budget.
    pub async fn offboard_reserved(
        &self,
        permit: Option<Permit>,
        machine_id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        let machine_id = Self::segment("machine id", machine_id)?;
        let url = self.api_url(&format!("api/machines/{machine_id}/offboard"), &[])?;
        let body = serde_json::json!({ "Comment": comment });
        let call = Call {
            family: ApiFamily::Offboard,
            method: Method::POST,
            url,
            body: Some(body),
            kind: CallKind::Write,
        };
        self.call(call, permit).await
    }

    /// `POST /api/machineactions/{id}/cancel` with `comment`, in a slot of
    /// `permit` when one was reserved. MDE cancels only actions that are not
    /// final; a refusal comes back as [`MdeError::BadRequest`].
    pub async fn cancel_action(
        &self,
        permit: Option<Permit>,
        action_id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        let action_id = Self::segment("action id", action_id)?;
        let url = self.api_url(&format!("api/machineactions/{action_id}/cancel"), &[])?;
        let call = Call {
            family: ApiFamily::Cancel,
            method: Method::POST,
            url,
            body: Some(serde_json::json!({ "Comment": comment })),
            kind: CallKind::Write,
        };
        self.call(call, permit).await
    }

    /// `GET /api/machines/{id}`.
    pub async fn get_machine(&self, machine_id: &str) -> Result<Machine, MdeError> {
        let machine_id = Self::segment("machine id", machine_id)?;
        let url = self.api_url(&format!("api/machines/{machine_id}"), &[])?;
        self.call(Call::read(ApiFamily::Machines, url), None).await
    }

    /// Machines whose `computerDnsName` answers to `name` (several when a
    /// device was re-imaged): the whole name for a fully qualified one, the
    /// name alone or with any domain for a dotless one
    /// ([`machine_name_filter`], [`machine_name_matches`]).
    pub async fn find_machines_by_name(&self, name: &str) -> Result<Vec<Machine>, MdeError> {
        let name = name.to_ascii_lowercase();
        let filter = machine_name_filter(&name);
        match self
            .list_all::<Machine>(ApiFamily::Machines, "api/machines", &filter)
            .await
        {
            Ok(mut machines) => {
                machines.retain(|m| {
                    m.computer_dns_name
                        .as_deref()
                        .is_some_and(|dns| machine_name_matches(&name, dns))
                });
                Ok(machines)
            }
            // The list answers 404 when it has no recent machines at all.
            Err(MdeError::NotFound { .. }) => Ok(Vec::new()),
            Err(other) => Err(other),
        }
    }

    /// A read of one machine (`GET /api/machines?$top=1`) within the
    /// machines budget: whether MDE lets this app read at all, judged by
    /// MDE's answer rather than by the token's claims. A 403 is
    /// [`MdeError::Forbidden`] naming the permission to grant; a 404 (MDE's
    /// answer when it has no recent machines) means the read was allowed.
    pub async fn probe_read(&self) -> Result<(), MdeError> {
        let url = self.api_url("api/machines", &[("$top", "1")])?;
        let answer: Result<serde::de::IgnoredAny, MdeError> =
            self.call(Call::read(ApiFamily::Machines, url), None).await;
        match answer {
            Ok(_) | Err(MdeError::NotFound { .. }) => Ok(()),
            Err(MdeError::Forbidden { code, message }) => Err(read_forbidden(code, message)),
            Err(other) => Err(other),
        }
    }

    /// `GET /api/machines?$filter=...`, following `@odata.nextLink`.
    pub async fn list_machines(&self, filter: &str) -> Result<Vec<Machine>, MdeError> {
        self.list_all(ApiFamily::Machines, "api/machines", filter)
            .await
    }

    /// `GET /api/machineactions/{id}`.
    pub async fn get_machine_action(&self, action_id: &str) -> Result<MachineAction, MdeError> {
        let action_id = Self::segment("action id", action_id)?;
        let url = self.api_url(&format!("api/machineactions/{action_id}"), &[])?;
        self.call(Call::read(ApiFamily::MachineActions, url), None)
            .await
    }

    /// `GET /api/machineactions?$filter=...`, following `@odata.nextLink`.
    /// A 404 is an error, never "none": a wrong path, host or gateway answers
    /// 404 too, and only a complete answer may prove that an action is absent
    /// (so an entry that does not read fails it too).
    pub async fn list_machine_actions(&self, filter: &str) -> Result<Vec<MachineAction>, MdeError> {
        self.list_all(ApiFamily::MachineActions, "api/machineactions", filter)
            .await
    }

    /// Many actions by id, one call per [`IDS_PER_QUERY`] ids. An id left out
    /// of the answer proves nothing (callers read it alone), so an entry that
    /// does not read is skipped, counted in the log, and the rest is answered.
    pub async fn machine_actions_by_ids(
        &self,
        ids: &[String],
    ) -> Result<Vec<MachineAction>, MdeError> {
        let mut actions = Vec::with_capacity(ids.len());
        let mut unreadable = 0;
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let listed = self.machine_actions_batch(chunk).await?;
            unreadable += listed.unreadable;
            actions.extend(listed.items);
        }
        if unreadable > 0 {
            tracing::warn!(
                unreadable,
                read = actions.len(),
                "machine actions by id: skipped entries of MDE's answer that do not read"
            );
        }
        Ok(actions)
    }

    /// One batch of [`Self::machine_actions_by_ids`]. `in` is not documented
    /// for machine actions: a 400 to it is answered by the same batch as
    /// `id eq ... or ...` once, and the client keeps to that form afterwards,
    /// so a tenant that refuses `in` never stalls a poll.
    async fn machine_actions_batch(
        &self,
        chunk: &[String],
    ) -> Result<Listed<MachineAction>, MdeError> {
        let path = "api/machineactions";
        if !self.inner.ids_with_or.load(Ordering::Relaxed) {
            let filter = ids_filter(chunk, IdsFilter::In);
            match self.list(ApiFamily::MachineActions, path, &filter).await {
                Err(error) if is_bad_request(&error) => {
                    tracing::warn!(%error, "MDE refused an `id in (...)` filter; reading actions by id with `or` from now on");
                    self.inner.ids_with_or.store(true, Ordering::Relaxed);
                }
                answered => return answered,
            }
        }
        let filter = ids_filter(chunk, IdsFilter::Or);
        self.list(ApiFamily::MachineActions, path, &filter).await
    }

    /// Every offboard action created at or after `since`, read in pages of
    /// `top` with `$top`/`$skip` (MDE never links the next page when `$top`
    /// is given: a short page is the last). The filter names only properties
    /// MDE documents for machine actions (`type`, `creationDateTimeUtc`), so
    /// one call answers for up to `top` actions in flight. A full page is
    /// followed by the next one unless every id in `expected` was read
    /// already: 10,000 in flight then cost one call, not two. Each action
    /// keeps only what a poll reads (id, type, status, machine, comments,
    /// creation time; see `WindowAction`).
    pub async fn offboard_actions_since(
        &self,
        since: Timestamp,
        top: usize,
        expected: &[String],
    ) -> Result<Vec<MachineAction>, MdeError> {
        let top = top.clamp(1, MAX_TOP);
        let mut actions = Vec::new();
        for page in 0..MAX_PAGES {
            let answer = self.offboard_actions_page(since, top, page * top).await?;
            let short = answer.len() < top;
            actions.extend(answer);
            if short || (!expected.is_empty() && all_found(&actions, expected)) {
                return Ok(actions);
            }
        }
        Err(MdeError::Paging {
            message: format!(
                "more than {MAX_PAGES} pages of {top} offboard actions since {since}; stopped rather than spend the read budget"
            ),
        })
    }

    /// One page of [`Self::offboard_actions_since`]: up to `top` offboard
    /// actions created at or after `since`, skipping the first `skip`. A page
    /// shorter than `top` is the last. The adopt index's fill reads page by
    /// page, so a read budget that runs out part way keeps what was read.
    pub async fn offboard_actions_page(
        &self,
        since: Timestamp,
        top: usize,
        skip: usize,
    ) -> Result<Vec<MachineAction>, MdeError> {
        let filter = format!(
            "type eq 'Offboard' and creationDateTimeUtc ge {}",
            since.strftime("%Y-%m-%dT%H:%M:%SZ")
        );
        let (top_text, skip_text) = (top.clamp(1, MAX_TOP).to_string(), skip.to_string());
        let url = self.api_url(
            "api/machineactions",
            &[
                ("$filter", &filter),
                // A fixed order (oldest first), so an action created while
                // the pages are read goes to the end rather than shifting
                // one already read into the next page or out of every page.
                ("$orderby", "creationDateTimeUtc"),
                ("$top", &top_text),
                ("$skip", &skip_text),
            ],
        )?;
        let answer: CountedPage<WindowAction> = self
            .call(Call::read(ApiFamily::MachineActions, url), None)
            .await?;
        // A page that left an entry out looks shorter than `top`, and a short
        // page ends the window as complete: it must not be answered as one.
        let kept = Listed::from(answer).complete("api/machineactions")?;
        Ok(kept.into_iter().map(MachineAction::from).collect())
    }

    /// The offboard action created with `marker` in its comment, if any: the
    /// lookup that must precede any resend after an ambiguous outcome.
    pub async fn find_offboard_action(
        &self,
        machine_id: &str,
        marker: &str,
    ) -> Result<Option<MachineAction>, MdeError> {
        let mut listed = self.offboard_actions_listed(machine_id).await?;
        let found = listed.items.iter().position(|a| {
            a.requestor_comment
                .as_deref()
                .is_some_and(|c| has_marker(c, marker))
        });
        match found {
            Some(at) => Ok(Some(listed.items.swap_remove(at))),
            // "None" would prove it absent: only from a list that read whole.
            None => listed.complete("api/machineactions").map(|_| None),
        }
    }

    /// The newest offboard action for this machine that is not final yet, if
    /// any: what an `ActiveRequestAlreadyExists` answer refers to.
    pub async fn find_pending_offboard(
        &self,
        machine_id: &str,
    ) -> Result<Option<MachineAction>, MdeError> {
        let mut listed = self.offboard_actions_listed(machine_id).await?;
        let pending = listed.items.iter().rposition(|a| !a.status.is_final());
        match pending {
            Some(at) => Ok(Some(listed.items.swap_remove(at))),
            None => listed.complete("api/machineactions").map(|_| None),
        }
    }

    /// Every offboard action of a machine, oldest first, from a complete answer
    /// (every page read): only such a list may prove that an action is absent.
    pub async fn offboard_actions(&self, machine_id: &str) -> Result<Vec<MachineAction>, MdeError> {
        self.offboard_actions_listed(machine_id)
            .await?
            .complete("api/machineactions")
    }

    /// [`Self::offboard_actions`] with the count of entries that did not read
    /// (an unreadable entry may be an offboard: its type is unknown too).
    async fn offboard_actions_listed(
        &self,
        machine_id: &str,
    ) -> Result<Listed<MachineAction>, MdeError> {
        // Only `machineId` in the filter: no Microsoft example combines it with
        // `type`, so the type is checked here instead.
        let filter = format!("machineId eq {}", odata_quote(machine_id));
        let mut listed: Listed<MachineAction> = self
            .list(ApiFamily::MachineActions, "api/machineactions", &filter)
            .await?;
        let actions = &mut listed.items;
        actions.retain(|a| a.action_type == "Offboard");
        // By time, not by text: MDE's timestamps vary in their fractions of a
        // second. An unreadable time sorts first (oldest).
        actions.sort_by_key(|a| {
            a.creation_date_time_utc
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
        });
        Ok(listed)
    }

    /// [`Self::list`], failing if any entry did not read.
    async fn list_all<T: DeserializeOwned>(
        &self,
        family: ApiFamily,
        path: &str,
        filter: &str,
    ) -> Result<Vec<T>, MdeError> {
        self.list(family, path, filter).await?.complete(path)
    }

    /// Every page of `path` for `filter`; entries that do not read as `T`
    /// are left out and counted.
    async fn list<T: DeserializeOwned>(
        &self,
        family: ApiFamily,
        path: &str,
        filter: &str,
    ) -> Result<Listed<T>, MdeError> {
        let mut url = self.api_url(path, &[("$filter", filter)])?;
        let mut items = Vec::new();
        let mut unreadable = 0;
        let mut seen = std::collections::HashSet::new();
        loop {
            // MDE has answered links that repeat or mangle their parameters
            // forever: stop on a link already followed, and after MAX_PAGES.
            if !seen.insert(url.to_string()) || seen.len() > MAX_PAGES {
                return Err(MdeError::Paging {
                    message: format!(
                        "the @odata.nextLink of {path} did not advance after {} pages (at most {MAX_PAGES} are followed); stopped rather than spend the read budget",
                        seen.len().min(MAX_PAGES)
                    ),
                });
            }
            let page: CountedPage<T> = self.call(Call::read(family, url), None).await?;
            items.extend(page.items);
            unreadable += page.unreadable;
            let Some(next) = page.next_link else {
                return Ok(Listed { items, unreadable });
            };
            let next = Url::parse(&next)
                .or_else(|_| self.inner.api.join(&next))
                .map_err(|e| MdeError::InvalidResponse {
                    message: format!("unusable @odata.nextLink: {e}"),
                })?;
            // The token must never leave the configured API host.
            if !same_origin(&self.inner.api, &next) {
                return Err(MdeError::InvalidResponse {
                    message: format!(
                        "refusing to follow @odata.nextLink to {} (not the configured API host)",
                        next.host_str().unwrap_or("?")
                    ),
                });
            }
            url = next;
        }
    }

    /// `id` as one path segment: MDE's machine ids are hex and action ids are
    /// GUIDs, so anything else (a `/`, `..`, `?`, `%`) is refused before a
    /// URL is built: an edited status must not steer a POST to another path.
    fn segment<'a>(what: &str, id: &'a str) -> Result<&'a str, MdeError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if valid {
            Ok(id)
        } else {
            Err(MdeError::BadRequest {
                status: 0,
                code: "InvalidId".into(),
                message: format!(
                    "{what} {id:?} is not an MDE id (letters, digits and '-' only); nothing was sent"
                ),
            })
        }
    }

    fn api_url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, MdeError> {
        let mut url = self
            .inner
            .api
            .join(path)
            .map_err(|e| MdeError::InvalidResponse {
                message: format!("cannot build a URL for {path}: {e}"),
            })?;
        if !query.is_empty() {
            // OData servers read '+' literally in some places: encode spaces as %20.
            let encoded: Vec<String> = query
                .iter()
                .map(|(k, v)| {
                    let value: String =
                        url::form_urlencoded::byte_serialize(v.as_bytes()).collect();
                    format!("{k}={}", value.replace('+', "%20"))
                })
                .collect();
            url.set_query(Some(&encoded.join("&")));
        }
        Ok(url)
    }

    /// One API call: token, budget, send, classify. Kept in one piece: the
    /// budget slot must be completed or given back on every path out, and that
    /// is only checkable when all the paths are in view. A 401 refreshes the token
    /// and tries once more (the API rejected the request before acting on it).
    async fn call<T: DeserializeOwned>(
        &self,
        call: Call,
        mut reserved: Option<Permit>,
    ) -> Result<T, MdeError> {
        let Call {
            family,
            method,
            url,
            body,
            kind,
        } = call;
        let inner = &self.inner;
        for attempt in 0..2 {
            let token = match inner.tokens.token().await {
                Ok(token) => token,
                Err(error) => {
                    // Nothing was sent: the reserved slot goes back.
                    if let Some(permit) = reserved.take() {
                        permit.cancel();
                    }
                    return Err(error);
                }
            };
            let waited = Instant::now();
            let permit = match (reserved.take(), inner.budget_wait) {
                (Some(permit), _) => permit,
                (None, BudgetWait::Wait) => inner.budget.acquire(family).await,
                (None, BudgetWait::Refuse) => {
                    inner
                        .budget
                        .try_reserve(family)
                        .map_err(|not_yet| MdeError::BudgetSpent {
                            family,
                            ready_in: not_yet
                                .retry_at
                                .map(|at| at.saturating_duration_since(Instant::now())),
                        })?
                }
            };
            inner.observer.budget_waited(family, waited.elapsed());
            let mut request = inner
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(token.expose());
            if let Some(body) = &body {
                request = request.json(body);
            }
            tracing::debug!(%family, %method, path = url.path(), "MDE call");
            let response = request.send().await;
            let response = match response {
                Ok(response) => response,
                Err(error) => {
                    permit.complete();
                    inner.observer.request_finished(family, 0);
                    return Err(MdeError::from_transport(&error, kind));
                }
            };
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_capped(response, MAX_API_BODY).await;
            permit.complete();
            inner.observer.request_finished(family, status);
            let bytes = bytes.map_err(|e| match (e, kind) {
                (BodyError::Cut(e), CallKind::Write) => MdeError::OutcomeUnknown {
                    reason: format!("answer {status} cut off: {}", error_chain(&e)),
                },
                (BodyError::Cut(e), CallKind::Read) => MdeError::Unavailable {
                    status,
                    message: format!("answer {status} cut off: {}", error_chain(&e)),
                },
                // An answer too large to read is no answer, whatever its
                // status: a write may have acted, a read is retried later.
                (too_large, kind) => {
                    let message = format!(
                        "{method} {}{} answered {status} with {}",
                        url.host_str().unwrap_or_default(),
                        url.path(),
                        too_large.describe(MAX_API_BODY)
                    );
                    match kind {
                        CallKind::Write => MdeError::OutcomeUnknown { reason: message },
                        CallKind::Read => MdeError::InvalidResponse { message },
                    }
                }
            })?;
            if (200..300).contains(&status) {
                return serde_json::from_slice(&bytes).map_err(|e| MdeError::InvalidResponse {
                    message: format!(
                        "{} {} answered {status} with a body that does not parse: {e}",
                        method,
                        url.path()
                    ),
                });
            }
            if status == 401 && attempt == 0 {
                tracing::info!(%family, "MDE answered 401; signing in again once");
                inner.tokens.invalidate(&token).await;
                continue;
            }
            return Err(self.refusal(family, kind, status, &bytes, retry_after.as_deref()));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The error an answer outside 2xx means; a 429 parks the family's budget
    /// until its `Retry-After`.
    fn refusal(
        &self,
        family: ApiFamily,
        kind: CallKind,
        status: u16,
        body: &[u8],
        retry_after: Option<&str>,
    ) -> MdeError {
        let body: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
        let retry_at = retry_after.and_then(|v| parse_retry_after(v, Timestamp::now()));
        let request_id = body.error.target.as_deref().and_then(request_id);
        let error = MdeError::from_status(
            status,
            body.error.code,
            body.error.message,
            family,
            retry_at,
            kind,
        )
        .with_request_id(request_id);
        if let MdeError::Throttled { retry_at, .. } = &error {
            let wait = retry_at.duration_since(Timestamp::now());
            let wait = Duration::try_from(wait).unwrap_or_default();
            tracing::warn!(%family, wait_ms = wait.as_millis() as u64, mde_request_id = request_id.unwrap_or_default(), "MDE answered 429; parking this family's budget");
            self.inner.budget.park(family, Instant::now() + wait);
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_match_as_whole_tokens_only() {
        let marker = correlation_marker("uid-1");
        assert!(has_marker(
            &comment_with_marker("retired", "uid-1"),
            &marker
        ));
        // Only as the operator writes it, first: a comment that carries a
        // marker elsewhere (typed by a person, or another request's comment
        // quoting it) attributes the action to no one.
        assert!(!has_marker(
            "moved by hand [defender-offboard:uid-1]",
            &marker
        ));
        assert!(!has_marker(
            &comment_with_marker("returned [defender-offboard:uid-1]", "uid-2"),
            &marker
        ));
        // Another resource's key that starts with this one's, or a quote of
        // the marker inside other text, is not this resource's action.
        assert!(!has_marker(
            &comment_with_marker("retired", "uid-10"),
            &marker
        ));
        assert!(!has_marker("see x[defender-offboard:uid-1]", &marker));
        assert!(!has_marker("see [defender-offboard:uid-1]).", &marker));
    }

    #[test]
    fn the_key_comes_from_the_leading_marker() {
        assert_eq!(
            marker_key(&comment_with_marker("retired", "uid-1")),
            Some("uid-1")
        );
        assert_eq!(marker_key("retired by hand"), None);
        assert_eq!(marker_key("retired [defender-offboard:uid-1]"), None);
        assert_eq!(marker_key(""), None);
    }

    /// A full batch of GUIDs fits common 8 KiB URL limits in either form,
    /// as the client encodes the query.
    #[test]
    fn a_full_batch_of_ids_fits_the_url_limit_in_either_form() {
        let ids: Vec<String> = (0..IDS_PER_QUERY)
            .map(|n| format!("7a6ab2c7-1f3b-4f5b-a2a4-{n:012}"))
            .collect();
        for form in [IdsFilter::In, IdsFilter::Or] {
            let filter = ids_filter(&ids, form);
            let encoded: String = url::form_urlencoded::byte_serialize(filter.as_bytes()).collect();
            let url = format!(
                "https://api.securitycenter.microsoft.com/api/machineactions?$filter={}",
                encoded.replace('+', "%20")
            );
            assert!(url.len() < 4096, "{form:?}: {} bytes", url.len());
        }
        assert_eq!(
            ids_filter(&["a'b".into(), "c".into()], IdsFilter::Or),
            "id eq 'a''b' or id eq 'c'"
        );
        assert_eq!(
            ids_filter(&["a'b".into(), "c".into()], IdsFilter::In),
            "id in ('a''b','c')"
        );
    }

    #[test]
    fn names_match_whole_or_as_a_host_in_a_domain() {
        for (name, dns, matches) in [
            ("pc-1", "pc-1", true),
            ("pc-1", "PC-1.contoso.com", true),
            ("PC-1", "pc-1.contoso.com", true),
            ("pc-1", "pc-10.contoso.com", false),
            ("pc-1", "xpc-1.contoso.com", false),
            ("pc-1", "pc-1x", false),
            ("pc-1.contoso.com", "pc-1.contoso.com", true),
            ("pc-1.contoso.com", "PC-1.Contoso.COM", true),
            ("pc-1.contoso.com", "pc-1.contoso.com.evil.example", false),
            ("pc-1.contoso.com", "pc-1", false),
        ] {
            assert_eq!(machine_name_matches(name, dns), matches, "{name} ~ {dns}");
        }
        assert_eq!(
            machine_name_filter("pc-1.contoso.com"),
            "computerDnsName eq 'pc-1.contoso.com'"
        );
        assert_eq!(
            machine_name_filter("o'brien"),
            "computerDnsName eq 'o''brien' or startswith(computerDnsName,'o''brien.')"
        );
    }

    /// The figure behind [`MAX_API_BODY`]: a page of [`MAX_TOP`] actions as
    /// MDE answers them, each with a comment of the longest length the
    /// operator writes (900 characters), fits the cap twice over.
    #[test]
    fn a_full_page_of_the_longest_actions_fits_the_cap_twice_over() {
        let key = "3f6c2a1e-8d4b-4c1e-9a7f-2b5d8e0c4a91";
        let comment = comment_with_marker(&"x".repeat(900), key);
        let action = serde_json::json!({
            "id": "7a6ab2c7-1f3b-4f5b-a2a4-7fd5e3a7b3c9", "type": "Offboard",
            "title": "Offboard machine", "scope": null,
            "requestor": "defender-offboard-app@contoso.onmicrosoft.com",
            "requestorComment": comment, "status": "Succeeded",
            "machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
            "computerDnsName": "finance-laptop-07.emea.corp.contoso.com",
            "creationDateTimeUtc": "2026-01-02T14:39:38.6716938Z",
            "lastUpdateDateTimeUtc": "2026-01-02T14:40:44.6596267Z",
            "cancellationRequestor": null, "cancellationComment": null,
            "cancellationDateTimeUtc": null, "errorHResult": 0, "externalId": null,
            "requestSource": "PublicApi", "relatedFileInfo": null, "commands": [],
            "troubleshootInfo": null
        });
        serde_json::from_value::<MachineAction>(action.clone()).unwrap();
        let one = action.to_string().len() + 1;
        assert!((1500..1700).contains(&one), "{one} bytes");
        assert!(one * MAX_TOP * 2 <= MAX_API_BODY, "{one} bytes each");
    }
}
