//! Microsoft Defender for Endpoint API client: sign-in, clouds, typed calls,
//! one error taxonomy and the rate budget. It knows nothing of Kubernetes.

pub mod auth;
pub mod client;
pub mod cloud;
pub mod error;
pub mod limiter;
pub mod types;

pub use auth::{
    ClientIdentity, Credential, CredentialSource, FetchedCredential, Secret, token_roles,
};
pub use client::{
    BudgetWait, CallObserver, ClientConfig, DefenderClient, NoObserver, comment_with_marker,
    correlation_marker, has_marker, marker_key,
};
pub use cloud::{Cloud, Endpoints};
pub use error::{ErrorClass, MdeError};
pub use limiter::{ApiFamily, RateBudget, RateLimits};
pub use types::{ActionStatus, Machine, MachineAction};

use std::path::PathBuf;
use std::time::Duration;

/// Connection flags shared by `run` and `offboard`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// Microsoft cloud: sets the login and API hosts.
    #[arg(long, value_enum, default_value = "commercial", env = "DEFENDER_CLOUD")]
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

#[cfg(test)]
mod tests {
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
