//! The command line of `run` and `offboard`: clap lives here, in the binary's
//! package, and nowhere else. Each flag struct turns into the plain
//! configuration the library crates take (`runtime::Config`, `NodeOptions`,
//! `mde_client::ClientConfig`).

use mde_client::auth::{ClientIdentity, Secret};
use mde_client::{BudgetWait, ClientConfig, Cloud, Endpoints, RateLimits};
use offboard_operator::nodes::{DeviceNameTemplate, NAME_PLACEHOLDER, NodeOptions, NodeSelector};
use offboard_operator::offboard::decision::{
    DEFAULT_MAX_OFFBOARDS_PER_HOUR, NamePattern, NodeIdentityMode, Protection, Settings,
};
use offboard_operator::runtime::{self, leader::LeaseTiming};
use offboard_operator::telemetry::LogFormat;
use offboard_operator::tenants::DefaultNamespaces;
use offboard_operator::tenants::controller::ClientSettings;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Connection flags shared by `run`, `offboard` and `plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// Microsoft cloud: sets the login and API hosts.
    #[arg(long, default_value = "commercial", env = "DEFENDER_CLOUD", value_parser = cloud_parser())]
    pub cloud: Cloud,
    /// MDE API base URL (overrides the cloud preset).
    #[arg(long, env = "DEFENDER_API_URL")]
    pub api_url: Option<String>,
    /// Entra ID login host (overrides the cloud preset).
    #[arg(long, env = "AZURE_AUTHORITY_HOST")]
    pub authority_host: Option<String>,
    /// Allow plain-http --api-url/--authority-host off loopback (a simulator in a
    /// test cluster). Never use it with a real tenant.
    #[arg(long, env = "DEFENDER_ALLOW_INSECURE_HTTP")]
    pub allow_insecure_http: bool,
    /// Own rate budget per API family: never more than CALLS in any WINDOW.
    #[arg(
        long,
        default_value = "100/60s,1500/3600s",
        env = "DEFENDER_RATE_LIMIT"
    )]
    pub rate_limit: RateLimits,
    /// Timeout of one MDE request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "DEFENDER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
    #[arg(long, env = "AZURE_TENANT_ID", hide_env_values = true)]
    pub tenant_id: Option<String>,
    #[arg(long, env = "AZURE_CLIENT_ID", hide_env_values = true)]
    pub client_id: Option<String>,
    /// From the environment only (`AZURE_CLIENT_SECRET`), never a flag: a
    /// command line is visible to every local user in `ps`. Prefer the file.
    #[arg(skip = secret_from_env())]
    pub client_secret: Option<Secret>,
    /// A file holding the client secret (re-read at every sign-in).
    #[arg(long, env = "AZURE_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    pub federated_token_file: Option<PathBuf>,
}

/// Devices never offboarded, shared by `run`, `offboard` and `plan`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProtectionArgs {
    /// Never offboard a device carrying this MDE machine tag (compared
    /// without case; repeat the flag, or separate tags with commas): its
    /// DeviceOffboard ends Failed with reason DeviceProtected, nothing sent.
    #[arg(long = "protected-tag", value_name = "TAG", env = "DEFENDER_PROTECTED_TAGS", value_delimiter = ',', value_parser = protected_tag)]
    pub protected_tags: Vec<String>,
    /// Never offboard a device whose computerDnsName this regular expression
    /// matches (searched without case: anchor it, e.g. `^dc-`). Repeatable;
    /// the environment variable holds one pattern (join several with `|`).
    #[arg(
        long = "protected-name",
        value_name = "REGEX",
        env = "DEFENDER_PROTECTED_NAME"
    )]
    pub protected_names: Vec<NamePattern>,
}

impl ProtectionArgs {
    pub fn protection(&self) -> Protection {
        Protection::from_flags(&self.protected_tags, &self.protected_names)
    }
}

fn protected_tag(text: &str) -> Result<String, String> {
    match text.trim() {
        "" => Err(
            "an empty tag protects nothing: give the MDE machine tag, e.g. do-not-offboard".into(),
        ),
        tag => Ok(tag.to_string()),
    }
}

/// `--cloud`: one of [`Cloud::NAMES`], listed in `--help`.
fn cloud_parser() -> impl clap::builder::TypedValueParser<Value = Cloud> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Cloud::NAMES.map(|(name, _)| name))
        .try_map(|name| Cloud::from_name(&name).ok_or(format!("unknown cloud {name:?}")))
}

impl ConnectionArgs {
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let endpoints = Endpoints::with_http_policy(
            self.cloud,
            self.api_url.as_deref(),
            self.authority_host.as_deref(),
            self.allow_insecure_http,
        )?;
        let identity = ClientIdentity::from_parts(
            self.tenant_id.clone(),
            self.client_id.clone(),
            self.client_secret.as_ref().map(|s| s.expose().to_string()),
            self.client_secret_file.clone(),
            self.federated_token_file.clone(),
        )?;
        Ok(ClientConfig {
            endpoints,
            identity,
            rate_limits: self.rate_limit.clone(),
            request_timeout: self.request_timeout,
            budget_wait: BudgetWait::Wait,
        })
    }
}

/// `AZURE_CLIENT_SECRET`, if set and not empty.
fn secret_from_env() -> Option<Secret> {
    std::env::var("AZURE_CLIENT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .map(Secret::new)
}

/// Flags of `defender-offboard run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Resources reconciled at the same time for each connection (the
    /// operator's own credentials and each `DefenderConnection`); all
    /// connections together at most 16 times as many.
    #[arg(long, default_value_t = 8, env = "DEFENDER_CONCURRENCY")]
    pub concurrency: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Take a Lease before reconciling, so only one replica acts.
    #[arg(long, env = "LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name or host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Leader lease duration; a standby takes over after this long without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// The leader stops all work if it cannot renew within this (must be < lease duration).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_renew_deadline: Duration,
    /// How often the lease is renewed or checked.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,
    #[arg(long, default_value = "text", env = "LOG_FORMAT", value_parser = log_format_parser())]
    pub log_format: LogFormat,
    /// How often in-flight actions are polled (one batched call for all of them).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Pause before looking an action up after an ambiguous send. Keep it at
    /// least a minute above --request-timeout: a request that timed out may
    /// still be processed by MDE, and its action listed only later.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub lookup_delay: Duration,
    /// How far MDE's clock may be from ours: a poll's window of offboard
    /// actions starts this much before the earliest time one may have been created.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub clock_skew: Duration,
    /// How far back another request's Succeeded offboard may stand for a
    /// machine not seen since (MDE keeps 180 days), and how far back the
    /// index of this operator's offboards reaches: a first send for a machine
    /// without one in the index needs no read of the machine's actions. 0
    /// turns both off: one read per first send, and a finished offboard of
    /// another request is never adopted.
    #[arg(long, default_value = "180d", value_parser = humantime::parse_duration)]
    pub adopt_window: Duration,
    /// Retry delay after a transient failure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Retry delay after a credentials or permission failure.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub access_backoff: Duration,
    /// How often finished resources are checked against spec.ttlSecondsAfterFinished
    /// (a resource falling due sooner is deleted on time).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ttl_sweep_interval: Duration,
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub protection: ProtectionArgs,
    /// Use DefenderConnections: a DeviceOffboard with spec.connectionRef is
    /// offboarded through that tenant and app (docs/tenants.md). The
    /// operator's own credentials become optional.
    #[arg(long, env = "DEFENDER_CONNECTIONS")]
    pub connections: bool,
    /// The namespaces whose DeviceOffboards without spec.connectionRef use
    /// the operator's own credentials: `*` for all, or a comma-separated
    /// list. Default: all without --connections (one tenant for the
    /// cluster); with --connections, only the operator's own namespace, so
    /// no namespace reaches the operator's tenant unless listed.
    #[arg(long, env = "DEFENDER_DEFAULT_CONNECTION_NAMESPACES", value_parser = DefaultNamespaces::parse)]
    pub default_connection_namespaces: Option<DefaultNamespaces>,
    /// Hosts (`host` or `host:port`) besides Microsoft's login and MDE API
    /// hosts that a DefenderConnection's apiUrl/loginUrl may name, e.g. a
    /// simulator. The operator's own --api-url and --authority-host are allowed.
    #[arg(long, value_delimiter = ',', env = "DEFENDER_CONNECTION_ALLOWED_HOSTS")]
    pub connection_allowed_hosts: Vec<String>,
    /// The blast-radius breaker: at most this many new offboards per MDE
    /// tenant in any hour; the rest wait in Pending (reason BreakerOpen)
    /// until the hour frees a slot, or until a resource is annotated
    /// defender.offboard.dev/release-breaker=true. Resends, adopts and
    /// cancels do not count. 0 turns it off (docs/operations.md, "Breaker").
    #[arg(long, default_value_t = DEFAULT_MAX_OFFBOARDS_PER_HOUR, env = "DEFENDER_MAX_OFFBOARDS_PER_HOUR")]
    pub max_offboards_per_hour: u32,
    /// The two-person rule: send nothing for a DeviceOffboard until its
    /// defender.offboard.dev/approved-by annotation names someone other
    /// than its defender.offboard.dev/created-by (the chart's admission
    /// policies make both the requester's own username).
    #[arg(long, env = "DEFENDER_REQUIRE_APPROVAL")]
    pub require_approval: bool,
}

impl RunArgs {
    /// Node offboarding's options; its namespace defaults to the watched
    /// namespace, else the pod's.
    pub fn node_options(&self) -> NodeOptions {
        self.nodes
            .options(self.namespace.as_deref().unwrap_or(&self.lease_namespace))
    }

    pub fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            lease_duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        }
    }

    /// The runtime's configuration from these flags.
    pub fn config(&self) -> runtime::Config {
        runtime::Config {
            namespace: self.namespace.clone(),
            clients: ClientSettings {
                rate_limits: self.connection.rate_limit.clone(),
                request_timeout: self.connection.request_timeout,
                allow_insecure_http: self.connection.allow_insecure_http,
                allowed_hosts: self.allowed_hosts(),
            },
            concurrency: self.concurrency,
            metrics_addr: self.metrics_addr,
            leader_elect: self.leader_elect,
            lease_namespace: self.lease_namespace.clone(),
            identity: self.identity.clone(),
            lease_timing: self.lease_timing(),
            log_format: self.log_format,
            poll_interval: self.poll_interval,
            clock_skew: self.clock_skew,
            adopt_window: self.adopt_window,
            settings: Settings {
                lookup_delay: self.lookup_delay,
                retry_backoff: self.retry_backoff,
                access_backoff: self.access_backoff,
                adopt_window: self.adopt_window,
                node_identity: self.nodes.node_identity,
                node_grace: self.nodes.node_offboard_grace,
                protection: self.protection.protection(),
                max_offboards_per_hour: self.max_offboards_per_hour,
                require_approval: self.require_approval,
            },
            ttl_sweep_interval: self.ttl_sweep_interval,
            nodes: self.node_options(),
            offboard_deleted_nodes: self.nodes.offboard_deleted_nodes,
            remove_node_finalizers: self.nodes.remove_node_finalizers,
            stop_deployment: self.nodes.stop_deployment.clone(),
            connections: self.connections,
            default_namespaces: self.default_namespaces(),
        }
    }

    /// `--default-connection-namespaces`, or its default (see the flag).
    pub fn default_namespaces(&self) -> DefaultNamespaces {
        match (&self.default_connection_namespaces, self.connections) {
            (Some(given), _) => given.clone(),
            (None, false) => DefaultNamespaces::All,
            (None, true) => {
                DefaultNamespaces::Only([self.lease_namespace.clone()].into_iter().collect())
            }
        }
    }

    /// The operator's own client settings; `None` when it runs with
    /// `--connections` and no credentials of its own (no AZURE_TENANT_ID nor
    /// AZURE_CLIENT_ID), and for `--remove-node-finalizers`, which needs only
    /// the Kubernetes API. Half-given credentials are an error otherwise.
    pub fn own_client(&self) -> Result<Option<mde_client::ClientConfig>, String> {
        if self.nodes.remove_node_finalizers {
            return Ok(None);
        }
        let own = &self.connection;
        let none_given = own.tenant_id.as_deref().is_none_or(str::is_empty)
            && own.client_id.as_deref().is_none_or(str::is_empty);
        if self.connections && none_given {
            return Ok(None);
        }
        Ok(Some(mde_client::ClientConfig {
            // A worker never waits for budget: the resource is requeued instead.
            budget_wait: mde_client::BudgetWait::Refuse,
            ..own.client_config()?
        }))
    }

    /// `--connection-allowed-hosts`, and the hosts of the operator's own
    /// `--api-url` and `--authority-host`.
    fn allowed_hosts(&self) -> Vec<String> {
        let own = [&self.connection.api_url, &self.connection.authority_host]
            .into_iter()
            .flatten()
            .filter_map(|u| url::Url::parse(u).ok())
            .filter_map(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)));
        self.connection_allowed_hosts
            .iter()
            .filter(|h| !h.trim().is_empty())
            .cloned()
            .chain(own)
            .collect()
    }
}

/// `--log-format`: `json` or `text`.
fn log_format_parser() -> impl clap::builder::TypedValueParser<Value = LogFormat> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["json", "text"]).try_map(|name| match name.as_str() {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        other => Err(format!("unknown log format {other:?}")),
    })
}

/// Flags of node offboarding (part of `run`).
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// When a Node matching --node-selector is deleted, create a DeviceOffboard for its device.
    #[arg(long, env = "OFFBOARD_DELETED_NODES")]
    pub offboard_deleted_nodes: bool,
    /// Which Nodes are offboarded: equality-based label selector (`k=v`, `k!=v`, `k`, `!k`, comma-separated); by default every Node a kubelet registered (Windows, Linux), MDE decides what it can offboard.
    #[arg(long, default_value = "kubernetes.io/os", value_parser = NodeSelector::parse)]
    pub node_selector: NodeSelector,
    /// Namespace of the DeviceOffboards made for deleted Nodes (default: --namespace, else the pod's namespace).
    #[arg(long)]
    pub node_offboard_namespace: Option<String>,
    /// The device's computerDnsName in MDE: `{name}` is the Node's name, e.g. `{name}.corp.contoso.com`.
    #[arg(long, default_value = NAME_PLACEHOLDER, value_parser = DeviceNameTemplate::parse)]
    pub node_device_name: DeviceNameTemplate,
    /// spec.ttlSecondsAfterFinished of the DeviceOffboards made for deleted Nodes (default: kept).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=315_360_000))]
    pub node_offboard_ttl_seconds: Option<i64>,
    /// How a deleted Node's device is told apart in MDE. `required`: only a
    /// record whose Azure vmMetadata matches the Node's providerID or
    /// systemUUID; `preferred`: that record, else one without vmMetadata by
    /// name; `name`: by name (a record naming another VM is never chosen).
    #[arg(long, default_value = "required", env = "NODE_IDENTITY", value_parser = node_identity_parser())]
    pub node_identity: NodeIdentityMode,
    /// How long a deleted Node's DeviceOffboard waits before anything is sent:
    /// a Node of the same name or cloud identity back by then, and nothing is.
    /// It never holds the Node's deletion.
    #[arg(long, default_value = "5m", env = "NODE_OFFBOARD_GRACE", value_parser = humantime::parse_duration)]
    pub node_offboard_grace: Duration,
    /// The longest a Node deletion waits for its DeviceOffboard while the operator runs.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub node_finalizer_max_age: Duration,
    /// Record the offboards of Nodes already being deleted, remove the operator's
    /// finalizer from every Node, and exit (the chart's uninstall hook).
    #[arg(long)]
    pub remove_node_finalizers: bool,
    /// With --remove-node-finalizers: first scale this Deployment (in the pod's
    /// namespace) to zero and wait for it, so no replica adds a finalizer again.
    #[arg(long, requires = "remove_node_finalizers")]
    pub stop_deployment: Option<String>,
}

/// `--node-identity`: one of its modes, listed in `--help`.
fn node_identity_parser() -> impl clap::builder::TypedValueParser<Value = NodeIdentityMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["required", "preferred", "name"])
        .try_map(|mode| mode.parse::<NodeIdentityMode>())
}

impl NodeArgs {
    pub fn options(&self, default_namespace: &str) -> NodeOptions {
        NodeOptions {
            selector: self.node_selector.clone(),
            namespace: self
                .node_offboard_namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string()),
            device_name: self.node_device_name.clone(),
            ttl_seconds: self.node_offboard_ttl_seconds,
            max_age: self.node_finalizer_max_age,
        }
    }
}

#[cfg(test)]
mod connection_args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        connection: ConnectionArgs,
    }

    fn config(args: &[&str]) -> Result<ClientConfig, String> {
        let mut argv = vec![
            "x",
            "--tenant-id",
            "t",
            "--client-id",
            "c",
            "--client-secret-file",
            "/run/secrets/client-secret",
        ];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .unwrap()
            .connection
            .client_config()
    }

    #[test]
    fn a_secret_is_never_taken_from_the_command_line() {
        let error = Cli::try_parse_from(["x", "--client-secret", "s3cr3t"])
            .err()
            .expect("no --client-secret flag");
        assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn plain_http_off_loopback_needs_the_explicit_flag() {
        let sim = [
            "--api-url",
            "http://mde-simulator.test:8090",
            "--authority-host",
            "http://mde-simulator.test:8090",
        ];
        assert!(config(&sim).unwrap_err().contains("--allow-insecure-http"));
        let mut allowed = sim.to_vec();
        allowed.push("--allow-insecure-http");
        assert_eq!(
            config(&allowed).unwrap().endpoints.api.host_str(),
            Some("mde-simulator.test")
        );
    }
}

#[cfg(test)]
mod node_args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn settings(args: &[&str]) -> Result<Settings, clap::Error> {
        let mut argv = vec!["run"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.run.config().settings)
    }

    #[test]
    fn node_identity_is_required_and_the_grace_five_minutes_by_default() {
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults.node_identity, NodeIdentityMode::Required);
        assert_eq!(defaults.node_grace, Duration::from_secs(300));
        let given = settings(&[
            "--node-identity",
            "preferred",
            "--node-offboard-grace",
            "2s",
        ])
        .unwrap();
        assert_eq!(given.node_identity, NodeIdentityMode::Preferred);
        assert_eq!(given.node_grace, Duration::from_secs(2));
        assert_eq!(
            settings(&["--node-identity", "name"])
                .unwrap()
                .node_identity,
            NodeIdentityMode::Name
        );
    }

    #[test]
    fn an_unknown_node_identity_mode_names_the_valid_ones() {
        let error = settings(&["--node-identity", "uuid"])
            .err()
            .unwrap()
            .to_string();
        for mode in ["required", "preferred", "name"] {
            assert!(error.contains(mode), "{error}");
        }
        assert!(settings(&["--node-offboard-grace", "soon"]).is_err());
    }
}
