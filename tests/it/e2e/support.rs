//! Helpers of the end-to-end tests: child processes that die with the test,
//! the cluster under test (a `dev` playground or a real cluster), kubectl, and
//! the simulator's HTTP API.

use defender_offboard::crd::DeviceOffboard;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_defender-offboard");
pub const LEASE_NAME: &str = "defender-offboard-leader";

/// Runs a test body with a deadline; the body's child processes are killed
/// when it is dropped (deadline, panic or normal end).
pub async fn bounded<F: std::future::Future<Output = ()>>(seconds: u64, body: F) {
    if tokio::time::timeout(Duration::from_secs(seconds), body)
        .await
        .is_err()
    {
        panic!("test did not finish within {seconds}s");
    }
}

/// A child process, SIGKILLed when dropped, with its output in a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("creating a log file");
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cloning a log handle"))
            .stderr(file)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends a signal by name (`STOP`, `CONT`) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the process is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// `Some(code)` once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log if the process ends first.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{log}",
                    self.name
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not log {needle:?} within {timeout:?}:\n{log}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Output of one kubectl call.
pub struct Out {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The cluster under test: a `dev` playground started here, or a real cluster
/// named by `DEFENDER_OFFBOARD_E2E_KUBECONFIG`.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub sim_url: Option<String>,
    /// Environment for `defender-offboard run` from the playground's env file
    /// (`None` on a real cluster, where the operator is deployed already).
    pub run_env: Option<Vec<(String, String)>>,
    pub dir: tempfile::TempDir,
    pub client: kube::Client,
    _dev: Option<Proc>,
}

pub fn real_cluster() -> bool {
    std::env::var_os("DEFENDER_OFFBOARD_E2E_KUBECONFIG").is_some()
}

impl Cluster {
    /// Starts `dev --without-controller` with `dev_args`, or connects to the real cluster.
    pub async fn start(dev_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(kubeconfig) = std::env::var_os("DEFENDER_OFFBOARD_E2E_KUBECONFIG") {
            let kubeconfig = PathBuf::from(kubeconfig);
            let namespace = std::env::var("DEFENDER_OFFBOARD_E2E_NAMESPACE")
                .unwrap_or_else(|_| "default".into());
            let sim_url = std::env::var("DEFENDER_OFFBOARD_E2E_SIMULATOR_URL").ok();
            let client = client_for(&kubeconfig).await;
            return Cluster {
                kubeconfig,
                namespace,
                sim_url,
                run_env: None,
                dir,
                client,
                _dev: None,
            };
        }
        let kubeconfig = dir.path().join("kubeconfig");
        let env_file = dir.path().join("env");
        let mut command = Command::new(BIN);
        command
            .arg("dev")
            .arg("--without-controller")
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .args(dev_args)
            .env("RUST_LOG", "warn");
        let mut dev = Proc::spawn("dev", command, dir.path());
        // The env file is written last, once the API and the simulator listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !env_file.exists() {
            if let Some(status) = dev.exited() {
                panic!("dev exited ({status}):\n{}", dev.log());
            }
            assert!(
                Instant::now() < deadline,
                "dev did not start:\n{}",
                dev.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let run_env = parse_env_file(&std::fs::read_to_string(&env_file).unwrap());
        let sim_url = run_env
            .iter()
            .find(|(k, _)| k == "DEFENDER_API_URL")
            .map(|(_, v)| v.clone());
        for key in [
            "KUBECONFIG",
            "AZURE_TENANT_ID",
            "AZURE_CLIENT_ID",
            "AZURE_CLIENT_SECRET_FILE",
            "DEFENDER_API_URL",
            "AZURE_AUTHORITY_HOST",
        ] {
            assert!(
                run_env.iter().any(|(k, _)| k == key),
                "the env file lacks {key}: {run_env:?}"
            );
        }
        let client = client_for(&kubeconfig).await;
        Cluster {
            kubeconfig,
            namespace: "default".into(),
            sim_url,
            run_env: Some(run_env),
            dir,
            client,
            _dev: Some(dev),
        }
    }

    pub fn is_real(&self) -> bool {
        self.run_env.is_none()
    }

    /// `kubectl --kubeconfig K -n NS ARGS`, with `stdin` piped in when given.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("-n")
            .arg(&self.namespace)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        let mut child = command.spawn().expect("starting kubectl");
        if let Some(text) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(text.as_bytes()).await.unwrap();
            drop(pipe);
        }
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} hung"))
            .unwrap();
        Out {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Like [`Cluster::kubectl`], panicking with stderr on failure.
    pub async fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin).await;
        assert!(
            out.success,
            "kubectl {args:?} failed:\n{}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Makes the `dev` API forget its watch history and end open watches: the
    /// controller's next watch is told `410 Expired` and it lists again.
    pub async fn compact_watches(&self) {
        let request = http::Request::post("/_dev/compact")
            .body(Vec::new())
            .expect("a valid request");
        self.client
            .request_text(request)
            .await
            .expect("POST /_dev/compact");
    }

    /// Watches the `dev` API answered with the in-stream `410 Expired` so far.
    pub async fn expired_watches(&self) -> u64 {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("a valid request");
        let text = self
            .client
            .request_text(request)
            .await
            .expect("GET /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("devcluster_watch_expired_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no watch expiry counter in:\n{text}"))
    }

    pub fn doffs(&self) -> Api<DeviceOffboard> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn list(&self) -> Vec<DeviceOffboard> {
        let mut tries = 0;
        loop {
            match self.doffs().list(&ListParams::default()).await {
                Ok(list) => return list.items,
                Err(error) if tries < 20 => {
                    tries += 1;
                    eprintln!("listing deviceoffboards: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("listing deviceoffboards: {error}"),
            }
        }
    }

    /// Polls until every resource named is final; returns them by name.
    pub async fn wait_final(
        &self,
        names: &[String],
        timeout: Duration,
    ) -> BTreeMap<String, DeviceOffboard> {
        let deadline = Instant::now() + timeout;
        loop {
            let all: BTreeMap<String, DeviceOffboard> = self
                .list()
                .await
                .into_iter()
                .map(|d| (d.metadata.name.clone().unwrap_or_default(), d))
                .filter(|(name, _)| names.contains(name))
                .collect();
            let not_final: Vec<&String> = names
                .iter()
                .filter(|n| !all.get(*n).is_some_and(is_final))
                .collect();
            if not_final.is_empty() {
                return all;
            }
            if Instant::now() > deadline {
                let sample: Vec<String> = not_final
                    .iter()
                    .take(10)
                    .map(|n| format!("{n}: {}", describe_status(all.get(*n))))
                    .collect();
                panic!(
                    "{} of {} resources not final after {timeout:?}, e.g.\n  {}",
                    not_final.len(),
                    names.len(),
                    sample.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn lease_holder(&self, namespace: &str) -> Option<String> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(LEASE_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    /// `defender-offboard run` as a separate process, reaching the playground
    /// through its env file; fast timings so tests stay short.
    pub fn spawn_run(&self, name: &str, extra: &[&str]) -> Proc {
        let env = self
            .run_env
            .as_ref()
            .expect("only the playground can start controllers");
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--poll-interval",
                "500ms",
                "--lookup-delay",
                "500ms",
                "--retry-backoff",
                "500ms",
                "--request-timeout",
                "5s",
            ])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            // These runs are about exactly-once at MDE's ceiling with
            // hundreds of resources; the breaker (100 an hour by default)
            // has its own tests (tests/it/safety.rs).
            .env("DEFENDER_MAX_OFFBOARDS_PER_HOUR", "0");
        for (key, value) in env {
            command.env(key, value);
        }
        Proc::spawn(name, command, self.dir.path())
    }
}

pub fn is_final(d: &DeviceOffboard) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
}

pub fn phase(d: &DeviceOffboard) -> &'static str {
    d.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(|p| p.as_str())
        .unwrap_or("-")
}

fn describe_status(d: Option<&DeviceOffboard>) -> String {
    match d {
        None => "missing".into(),
        Some(d) => serde_json::to_string(&d.status).unwrap_or_default(),
    }
}

/// `export K=V` lines (the playground's env file).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn client_for(kubeconfig: &Path) -> kube::Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a usable kubeconfig");
    kube::Client::try_from(config).expect("a Kubernetes client")
}

/// Whether the `kubectl` client is on PATH (steps that need it are skipped otherwise).
pub async fn have_kubectl() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("NOTICE: kubectl is not on PATH; skipping the kubectl steps");
    }
    found
}

/// The metrics address a `run` process logged (JSON logs).
pub fn metrics_addr(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving /metrics"))
        })
        .and_then(|v| v["addr"].as_str().map(str::to_string))
}

/// Sum of a metric's samples whose line contains every one of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The MDE simulator's HTTP API (`/_sim/*` and the machines list).
pub struct Sim {
    pub url: String,
    http: reqwest::Client,
}

impl Sim {
    pub fn new(url: &str) -> Sim {
        Sim {
            url: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub async fn stats(&self) -> Value {
        self.http
            .get(format!("{}/_sim/stats", self.url))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET /_sim/stats")
            .json()
            .await
            .expect("stats JSON")
    }

    pub async fn set_faults(&self, faults: Value) {
        let response = self
            .http
            .post(format!("{}/_sim/faults", self.url))
            .json(&faults)
            .send()
            .await
            .expect("POST /_sim/faults");
        assert!(response.status().is_success(), "/_sim/faults: {response:?}");
    }

    /// Ids of the simulator's Windows machines (the ones the offboard API supports),
    /// retrying through injected faults.
    pub async fn windows_machine_ids(&self) -> Vec<String> {
        for _ in 0..30 {
            match self.try_windows_machine_ids().await {
                Ok(ids) => return ids,
                Err(error) => {
                    eprintln!("listing simulator machines: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("could not list the simulator's machines");
    }

    async fn try_windows_machine_ids(&self) -> Result<Vec<String>, reqwest::Error> {
        let token: Value = self
            .http
            .post(format!("{}/sim-tenant/oauth2/v2.0/token", self.url))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "sim-client"),
                ("client_secret", "sim-secret"),
                ("scope", "https://api.securitycenter.microsoft.com/.default"),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = token["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let machines: Value = self
            .http
            .get(format!("{}/api/machines", self.url))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut ids: Vec<String> = machines["value"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|m| {
                m["osPlatform"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("Windows"))
            })
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// A multi-document manifest of DeviceOffboards, one per machine id.
pub fn manifests(prefix: &str, machine_ids: &[String]) -> String {
    machine_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            format!(
                "apiVersion: defender.offboard.dev/v1alpha1\nkind: DeviceOffboard\nmetadata:\n  name: {prefix}-{i:04}\nspec:\n  machineId: {id}\n  comment: \"decommissioned by the end-to-end test ({prefix} {i})\"\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Offboard actions per machine from the simulator's stats.
pub fn actions_by_machine(stats: &Value) -> BTreeMap<String, u64> {
    stats["offboard_actions_by_machine"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Correlation key (resource uid) → offboard POSTs MDE received for it that
/// could have created an action (refusals with 429/401 are not counted).
pub fn posts_by_key(stats: &Value) -> BTreeMap<String, u64> {
    stats["offboard_requests_by_key"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Offboard POSTs answered with a 5xx the simulator injected before acting.
pub fn refused_with_5xx(stats: &Value) -> u64 {
    ["500", "503"]
        .iter()
        .map(|code| stats["requests"]["offboard"][code].as_u64().unwrap_or(0))
        .sum()
}

pub fn count(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or(0)
}
