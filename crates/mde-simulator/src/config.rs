//! Simulator settings: the `simulate` command line and the in-process [`SimConfig`].

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::history::{BulkHistory, MachineHistory, PriorCalls};

/// Default roles granted to the simulated application.
pub const DEFAULT_ROLES: &str = "Machine.Read.All,Machine.Offboard";
/// Default share of generated machines whose offboard does not succeed.
pub const DEFAULT_UNSUCCESSFUL_SHARE: f64 = 0.07;

/// Default MDE limits for each API family: 100 calls a minute and 1500 an hour.
pub const DEFAULT_RATE_LIMITS: &str = "100/60s,1500/3600s";

/// Everything the simulator can be told. `Default` mirrors MDE as closely as known.
#[derive(Clone)]
pub struct SimConfig {
    pub tenant_id: String,
    pub client_id: String,
    /// Never printed: `Debug` redacts it.
    pub client_secret: String,
    /// Application roles the app registration holds (e.g. `Machine.Offboard`).
    pub roles: Vec<String>,
    /// Token lifetime in simulated time.
    pub token_lifetime: Duration,
    /// Generated machines, in addition to [`super::EXAMPLE_MACHINES`].
    pub machines: usize,
    /// Seed for generated machines, their offboard outcomes and faults.
    pub seed: u64,
    /// Share of generated machines whose offboard ends `Failed` or `TimeOut`
    /// (0..1; MDE does not say how often, this is a guess that keeps those
    /// paths exercised).
    pub unsuccessful_share: f64,
    /// Largest page a list without `$top` answers before it adds `@odata.nextLink`
    /// (a list with `$top` answers up to `$top` entities at once, without a link).
    pub page_size: usize,
    /// How long a new action stays `Pending` (simulated time).
    pub pending_for: Duration,
    /// How long an action stays `InProgress` before it is final (simulated time).
    pub in_progress_for: Duration,
    /// Limits applied to each API family separately, per tenant and client.
    pub rate_limits: Vec<RateLimit>,
    pub window_mode: WindowMode,
    /// Simulated seconds per wall-clock second: windows, delays, token lifetime and
    /// latency are divided by it.
    pub time_scale: f64,
    pub faults: FaultConfig,
    /// Machines with a past: when MDE last saw each and the offboards it
    /// already holds for it (see [`super::MachineHistory`]).
    pub history: Vec<MachineHistory>,
    /// Many past offboards of machines gone from the inventory.
    pub bulk_history: BulkHistory,
    /// Calls the application made before the start that the rate-limit
    /// windows still count (a process before a restart).
    pub prior_calls: Vec<PriorCalls>,
    /// A tenant as they are after years of use: every example name also has
    /// a stale record (`Inactive`, last seen 30 to 170 days ago) and every
    /// generated machine a record found by device discovery
    /// (`CanBeOnboarded`), each with an id of its own.
    pub real_tenant: bool,
    /// Issue access tokens without a `roles` claim (Entra asks clients not
    /// to read it); calls are still authorised by [`Self::roles`].
    pub token_without_roles: bool,
    /// Which platforms the offboard API accepts.
    pub offboard_platforms: OffboardPlatforms,
    /// PEM texts of the certificates registered on the app: a client
    /// assertion that names a certificate (`x5t` or `x5t#S256`) must be
    /// signed with one of them. Other blocks (a private key) are ignored.
    pub client_certificates: Vec<String>,
}

/// `--offboard-platforms`: the platforms MDE's offboard API accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OffboardPlatforms {
    /// Windows, Linux and macOS (Microsoft's current Offboard machine page).
    #[default]
    All,
    /// Windows only: Linux and macOS are answered `400 OsPlatformNotSupported`
    /// (the page's older version).
    WindowsOnly,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            tenant_id: "sim-tenant".into(),
            client_id: "sim-client".into(),
            client_secret: "sim-secret".into(),
            roles: parse_roles(DEFAULT_ROLES),
            token_lifetime: Duration::from_secs(3600),
            machines: 50,
            seed: 1,
            unsuccessful_share: DEFAULT_UNSUCCESSFUL_SHARE,
            page_size: 10_000,
            pending_for: Duration::from_secs(2),
            in_progress_for: Duration::from_secs(3),
            rate_limits: RateLimits::mde().0,
            window_mode: WindowMode::Sliding,
            time_scale: 1.0,
            faults: FaultConfig::default(),
            history: Vec::new(),
            bulk_history: BulkHistory::default(),
            prior_calls: Vec::new(),
            real_tenant: false,
            token_without_roles: false,
            offboard_platforms: OffboardPlatforms::All,
            client_certificates: Vec::new(),
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("roles", &self.roles)
            .field("token_lifetime", &self.token_lifetime)
            .field("machines", &self.machines)
            .field("seed", &self.seed)
            .field("unsuccessful_share", &self.unsuccessful_share)
            .field("page_size", &self.page_size)
            .field("pending_for", &self.pending_for)
            .field("in_progress_for", &self.in_progress_for)
            .field("rate_limits", &self.rate_limits)
            .field("window_mode", &self.window_mode)
            .field("time_scale", &self.time_scale)
            .field("faults", &self.faults)
            .field("history", &self.history)
            .field("bulk_history", &self.bulk_history)
            .field("prior_calls", &self.prior_calls)
            .field("real_tenant", &self.real_tenant)
            .field("token_without_roles", &self.token_without_roles)
            .field("offboard_platforms", &self.offboard_platforms)
            .field("client_certificates", &self.client_certificates.len())
            .finish()
    }
}

impl SimConfig {
    /// Turns a simulated duration into wall-clock time.
    pub fn scaled(&self, simulated: Duration) -> Duration {
        scale(simulated, self.time_scale)
    }

    /// Why this configuration cannot be served (a past that cannot have
    /// happened, calls of an unknown API family, a certificate that cannot
    /// be read).
    pub fn check(&self) -> Result<(), String> {
        super::history::check(&self.history, &self.prior_calls, |family| {
            super::store::Family::parse_limited(family).is_some()
        })?;
        for (i, pem) in self.client_certificates.iter().enumerate() {
            super::certificates::parse_certificates(pem)
                .map_err(|e| format!("client_certificates[{i}]: {e}"))?;
        }
        Ok(())
    }
}

pub(crate) fn scale(simulated: Duration, time_scale: f64) -> Duration {
    if time_scale > 0.0 && time_scale.is_finite() {
        simulated.div_f64(time_scale)
    } else {
        simulated
    }
}

/// Fault injection knobs; also the JSON of `POST /_sim/faults` (every field optional there).
///
/// `Default` is MDE as documented: no faults, no quirks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultConfig {
    /// Share of API calls answered 500 or 503 before anything happens.
    pub error_rate: f64,
    /// Added to every API call (simulated time).
    #[serde(with = "humantime_serde_compat")]
    pub latency: Duration,
    /// Share of offboard calls whose action is created but whose answer is lost.
    pub lost_response_rate: f64,
    pub lost_response_mode: LostResponseMode,
    /// Eventual consistency: a new action stays out of `GET /api/machineactions`
    /// list answers for this long after its creation (simulated time);
    /// `GET /api/machineactions/{id}` finds it at once.
    #[serde(with = "humantime_serde_compat")]
    pub list_lag: Duration,
    /// How `@odata.nextLink` looks on lists without `$top` that need more than one page.
    pub next_link: NextLinkMode,
    /// How `429` answers carry `Retry-After`.
    pub retry_after: RetryAfterMode,
    /// How a second offboard of a machine with one pending is refused.
    pub pending_conflict_wording: PendingConflictWording,
    /// Serve machines and machine actions with `null` for every optional field
    /// (machines keep `id` and `computerDnsName`; actions keep `id`, `type`,
    /// `status`, `machineId`, `computerDnsName`, `requestorComment` and
    /// `creationDateTimeUtc`). `$filter` still sees the real values.
    pub nulls: bool,
    /// Share of machine-action list answers that are `404 ResourceNotFound` instead
    /// of the real (possibly non-empty) answer.
    pub list_404_rate: f64,
    /// Refuse every `$filter` that uses `in` with `400` (MDE documents
    /// `in` for no machine-action property).
    pub refuse_in: bool,
}

/// `--fault-next-link`: how `@odata.nextLink` behaves on lists without `$top`
/// that need more than one page (lists with `$top` never carry one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NextLinkMode {
    /// The link leads to the next page (`$filter` kept, `$skip` advanced).
    #[default]
    Normal,
    /// The link leads to the same page again, forever.
    Repeat,
    /// MDE's bug: the link keeps `$skip` but loses the other parameters' names
    /// (`?=onboardingstatus+eq+%27Onboarded%27&=10000&$skip=10000`), so following it
    /// lists without the filter; answers to such links keep carrying a mangled link.
    Mangled,
}

/// `--fault-retry-after`: how a `429` carries `Retry-After`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterMode {
    /// Whole seconds, rounded up (`Retry-After: 3`).
    #[default]
    Seconds,
    /// An RFC 7231 HTTP date (`Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`), the
    /// wait rounded up to the next whole second.
    HttpDate,
    /// No `Retry-After` header at all (the message still names the seconds).
    Missing,
    /// `Retry-After: 1e19`, which fits no integer type; clients must cap it.
    Huge,
}

/// `--fault-pending-conflict-wording`: how MDE refuses an offboard while one is pending.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PendingConflictWording {
    /// `400` with code `ActiveRequestAlreadyExists`.
    #[default]
    Code,
    /// `400` with code `BadRequest` and message `Action is already in progress`:
    /// recognisable only by the message.
    MessageOnly,
}

/// How a lost offboard answer looks to the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LostResponseMode {
    /// Close the connection without answering.
    #[default]
    Drop,
    /// Answer `504 Gateway Timeout` after the action was committed.
    #[serde(rename = "504")]
    #[value(name = "504")]
    GatewayTimeout,
    /// Either of the two, chosen by the seeded generator.
    Mixed,
}

/// How calls are counted against a limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WindowMode {
    /// A call counts for exactly one window length after it was made.
    #[default]
    Sliding,
    /// Counters reset at window boundaries measured from simulator start.
    Fixed,
}

/// One limit the simulator enforces: at most `calls` in a window of `window`.
///
/// The simulator parses its limits itself rather than borrowing the client's
/// parser: a double must not share the code it is meant to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub calls: u32,
    #[serde(with = "humantime_serde_compat")]
    pub window: Duration,
}

/// The limits of every API family, e.g. `100/60s,1500/3600s`; empty serves without limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimits(pub Vec<RateLimit>);

impl RateLimits {
    /// MDE's documented limits: 100 calls a minute and 1500 an hour.
    pub fn mde() -> Self {
        parse_rate_limits(DEFAULT_RATE_LIMITS).expect("the default limits parse")
    }
}

impl std::str::FromStr for RateLimits {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_rate_limits(s)
    }
}

/// `--rate-limit` (and `dev --sim-rate-limit`): `CALLS/WINDOW` pairs separated by
/// commas, windows as humantime (`600ms`, `60s`, `1h`); `none` or empty serves
/// without any limit.
pub fn parse_rate_limits(s: &str) -> Result<RateLimits, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(RateLimits(Vec::new()));
    }
    let mut limits = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (calls, window) = part.split_once('/').ok_or_else(|| {
            format!("rate limit {part:?} must look like CALLS/WINDOW, e.g. 100/60s, or be `none`")
        })?;
        let calls = calls
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| {
                format!("rate limit {part:?}: {calls:?} is not a positive number of calls")
            })?;
        let window = humantime::parse_duration(window.trim())
            .ok()
            .filter(|w| !w.is_zero())
            .ok_or_else(|| {
                format!("rate limit {part:?}: {window:?} is not a positive duration such as 60s")
            })?;
        limits.push(RateLimit { calls, window });
    }
    Ok(RateLimits(limits))
}

fn parse_roles(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(String::from)
        .collect()
}

/// A share between 0 and 1 (`--fault-error-rate 0.1`), for `simulate` and `dev --sim-*`.
pub fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} must be between 0 and 1"))
    }
}

/// A time scale greater than zero (`--time-scale 10`), for `simulate` and `dev --sim-*`.
pub fn parse_time_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("time scale {s:?} must be greater than zero"))
    }
}

/// Command-line arguments of `defender-offboard simulate`.
#[derive(clap::Args, Clone)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
    /// Tenant the token endpoint accepts.
    #[arg(long, default_value = "sim-tenant")]
    pub tenant_id: String,
    /// Client (application) id the token endpoint accepts.
    #[arg(long, default_value = "sim-client")]
    pub client_id: String,
    /// Client secret the token endpoint accepts (never printed).
    #[arg(
        long,
        env = "SIM_CLIENT_SECRET",
        hide_env_values = true,
        default_value = "sim-secret"
    )]
    pub client_secret: String,
    /// Comma-separated application roles granted to the client.
    #[arg(long, default_value = DEFAULT_ROLES)]
    pub roles: String,
    /// Lifetime of issued tokens (simulated time), e.g. 3600s or 1h.
    #[arg(long, default_value = "3600s", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,
    /// Number of generated machines (the fixed example machines are always added).
    #[arg(long, default_value_t = 50)]
    pub machines: usize,
    /// Seed for generated machines, outcomes and faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of generated machines whose offboard ends Failed or TimeOut (0..1).
    #[arg(long, default_value = "0.07", value_parser = parse_share)]
    pub unsuccessful_share: f64,
    /// Largest page of a list without `$top` before `@odata.nextLink` is added.
    #[arg(long, default_value_t = 10_000)]
    pub page_size: usize,
    /// How long a new action stays Pending (simulated time).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub pending_for: Duration,
    /// How long an action stays InProgress (simulated time).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub in_progress_for: Duration,
    /// Limits per API family, tenant and client, e.g. `100/60s,1500/3600s`; `none` disables.
    #[arg(long, default_value = DEFAULT_RATE_LIMITS, value_parser = parse_rate_limits)]
    pub rate_limit: RateLimits,
    /// How calls are counted against the limits.
    #[arg(long, value_enum, default_value = "sliding")]
    pub window_mode: WindowMode,
    /// Simulated seconds per real second (divides windows, delays, token lifetime, latency).
    #[arg(long, default_value = "1.0", value_parser = parse_time_scale)]
    pub time_scale: f64,
    /// Share of API calls answered 500/503 before doing anything (0..1).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub fault_error_rate: f64,
    /// Latency added to every API call (simulated time).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub fault_latency: Duration,
    /// Share of offboard calls that create the action and then lose the answer (0..1).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub fault_lost_response_rate: f64,
    /// How the answer is lost.
    #[arg(long, value_enum, default_value = "drop")]
    pub fault_lost_response_mode: LostResponseMode,
    /// New actions stay invisible to machine-action list queries for this long
    /// (simulated time); fetching one by id finds it at once.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub fault_list_lag: Duration,
    /// `@odata.nextLink` on lists without `$top` that need more than one page.
    #[arg(long, value_enum, default_value = "normal")]
    pub fault_next_link: NextLinkMode,
    /// How 429 answers carry `Retry-After`.
    #[arg(long, value_enum, default_value = "seconds")]
    pub fault_retry_after: RetryAfterMode,
    /// How a second offboard of a machine with one pending is refused.
    #[arg(long, value_enum, default_value = "code")]
    pub fault_pending_conflict_wording: PendingConflictWording,
    /// Serve machines and machine actions with `null` for optional fields.
    #[arg(long)]
    pub fault_nulls: bool,
    /// Share of machine-action list answers that are 404 ResourceNotFound (0..1).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub fault_list_404_rate: f64,
    /// Answer every `$filter` that uses `in` with 400.
    #[arg(long)]
    pub fault_refuse_in: bool,
    /// Add a stale record beside every example machine and a discovered one
    /// (CanBeOnboarded) beside every generated machine.
    #[arg(long)]
    pub real_tenant: bool,
    /// Issue tokens without a `roles` claim (calls are still authorised by --roles).
    #[arg(long)]
    pub token_without_roles: bool,
    /// Platforms the offboard API accepts: `all` (Windows, Linux, macOS) or
    /// `windows-only` (Linux and macOS answered 400 OsPlatformNotSupported).
    #[arg(long, value_enum, default_value = "all")]
    pub offboard_platforms: OffboardPlatforms,
    /// A PEM file holding a certificate registered on the app (repeatable);
    /// certificate assertions must be signed with one of them.
    #[arg(long = "client-certificate", value_name = "PEM_FILE", value_parser = read_certificate_file)]
    pub client_certificates: Vec<String>,
}

/// `--client-certificate`: the PEM text of the file, refused when it holds
/// no certificate this simulator can verify assertions with.
fn read_certificate_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the certificate file {path:?}: {e}"))?;
    super::certificates::parse_certificates(&text).map_err(|e| format!("{path:?}: {e}"))?;
    Ok(text)
}

impl fmt::Debug for SimulateArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulateArgs")
            .field("listen", &self.listen)
            .field("config", &self.clone().into_config())
            .finish()
    }
}

impl SimulateArgs {
    pub fn into_config(self) -> SimConfig {
        SimConfig {
            tenant_id: self.tenant_id,
            client_id: self.client_id,
            client_secret: self.client_secret,
            roles: parse_roles(&self.roles),
            token_lifetime: self.token_lifetime,
            machines: self.machines,
            seed: self.seed,
            unsuccessful_share: self.unsuccessful_share,
            page_size: self.page_size.max(1),
            pending_for: self.pending_for,
            in_progress_for: self.in_progress_for,
            rate_limits: self.rate_limit.0,
            window_mode: self.window_mode,
            time_scale: self.time_scale,
            faults: FaultConfig {
                error_rate: self.fault_error_rate,
                latency: self.fault_latency,
                lost_response_rate: self.fault_lost_response_rate,
                lost_response_mode: self.fault_lost_response_mode,
                list_lag: self.fault_list_lag,
                next_link: self.fault_next_link,
                retry_after: self.fault_retry_after,
                pending_conflict_wording: self.fault_pending_conflict_wording,
                nulls: self.fault_nulls,
                list_404_rate: self.fault_list_404_rate,
                refuse_in: self.fault_refuse_in,
            },
            real_tenant: self.real_tenant,
            token_without_roles: self.token_without_roles,
            offboard_platforms: self.offboard_platforms,
            client_certificates: self.client_certificates,
            ..SimConfig::default()
        }
    }
}

impl From<SimulateArgs> for SimConfig {
    fn from(args: SimulateArgs) -> Self {
        args.into_config()
    }
}

/// Serialises durations as humantime strings ("250ms") and accepts either such a
/// string or a number of milliseconds.
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(t) => humantime::parse_duration(&t)
                .map_err(|e| D::Error::custom(format!("{t:?} is not a duration: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_default_and_subsecond_limits() {
        let limits = parse_rate_limits("100/60s, 1500/3600s,5/600ms").unwrap();
        assert_eq!(
            limits.0,
            vec![
                RateLimit {
                    calls: 100,
                    window: Duration::from_secs(60)
                },
                RateLimit {
                    calls: 1500,
                    window: Duration::from_secs(3600)
                },
                RateLimit {
                    calls: 5,
                    window: Duration::from_millis(600)
                },
            ]
        );
        assert!(parse_rate_limits("none").unwrap().0.is_empty());
        assert!(parse_rate_limits(" ").unwrap().0.is_empty());
        assert!(parse_rate_limits("100").is_err());
        assert!(parse_rate_limits("0/1s").is_err());
        assert_eq!(
            parse_rate_limits(DEFAULT_RATE_LIMITS).unwrap().0,
            SimConfig::default().rate_limits
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let config = SimConfig {
            client_secret: "hunter2".into(),
            ..SimConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
