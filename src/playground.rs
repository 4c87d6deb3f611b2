//! `defender-offboard dev`: the whole product on loopback — the in-memory
//! Kubernetes API, the MDE simulator and the controller — for a first look,
//! for demos and for the end-to-end tests.

use crate::cli::RunArgs;
use devcluster::{ApiHandle, ApiServerConfig, WatchHistory};
use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use kube::CustomResourceExt;
use kube::api::{Api, ListParams, PostParams};
use mde_client::{
    BudgetWait, ClientConfig, ClientIdentity, Cloud, DefenderClient, Endpoints, RateLimits,
};
use mde_simulator::{self as simulator, FaultConfig, LostResponseMode, SimConfig, SimHandle};
use offboard_operator::crd::{DeviceOffboard, Phase};
use offboard_operator::metrics::Metrics;
use offboard_operator::offboard::Context;
use offboard_operator::offboard::decision::{Protection, Settings};
use offboard_operator::runtime::run_with_connections;
use offboard_operator::telemetry::{self, LogFormat};
use offboard_operator::tenants::Connections;
use offboard_operator::tenants::DefaultNamespaces;
use offboard_operator::tenants::DefenderConnection;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Apply the manifests in this file or directory and show their phases until final.
    #[arg(long)]
    pub apply: Option<PathBuf>,
    /// Where to write the kubeconfig for kubectl and `defender-offboard run`.
    #[arg(long, default_value = ".dev/kubeconfig")]
    pub kubeconfig_out: PathBuf,
    /// Run only the API and the simulator; start `defender-offboard run` yourself.
    #[arg(long)]
    pub without_controller: bool,
    /// Exit once every applied resource is final (exit code 0).
    #[arg(long)]
    pub exit_when_done: bool,
    /// Address of the in-memory Kubernetes API.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub api_listen: SocketAddr,
    /// Address of the MDE simulator.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sim_listen: SocketAddr,
    /// Generated machines (the machines that examples/ name are always there).
    #[arg(long, default_value_t = 50)]
    pub sim_machines: usize,
    #[arg(long, default_value_t = 1)]
    pub sim_seed: u64,
    /// Share of generated machines whose offboard ends Failed or TimeOut (0..1).
    #[arg(long, default_value = "0.07", value_parser = simulator::parse_share)]
    pub sim_unsuccessful_share: f64,
    /// Compress the simulator's time (windows, delays) by this factor.
    #[arg(long, default_value = "1.0", value_parser = simulator::parse_time_scale)]
    pub sim_time_scale: f64,
    /// Share of simulator API calls answered 500/503.
    #[arg(long, default_value = "0", value_parser = simulator::parse_share)]
    pub sim_fault_error_rate: f64,
    /// Share of offboards whose action is created but whose answer is lost.
    #[arg(long, default_value = "0", value_parser = simulator::parse_share)]
    pub sim_fault_lost_response_rate: f64,
    #[arg(long, value_enum, default_value = "mixed")]
    pub sim_fault_lost_response_mode: LostResponseMode,
    /// Added latency of every simulator API call.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub sim_fault_latency: Duration,
    /// A new action stays out of list answers this long (eventual consistency).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub sim_fault_list_lag: Duration,
    /// How `@odata.nextLink` behaves on lists that need more than one page.
    #[arg(long, value_enum, default_value = "normal")]
    pub sim_fault_next_link: simulator::NextLinkMode,
    /// How 429 answers carry Retry-After.
    #[arg(long, value_enum, default_value = "seconds")]
    pub sim_fault_retry_after: simulator::RetryAfterMode,
    /// How a second offboard of a machine with one pending is refused.
    #[arg(long, value_enum, default_value = "code")]
    pub sim_fault_pending_conflict_wording: simulator::PendingConflictWording,
    /// Serve `null` for every optional field of machines and actions.
    #[arg(long)]
    pub sim_fault_nulls: bool,
    /// Share of machine-action list answers that are a 404 instead.
    #[arg(long, default_value = "0", value_parser = simulator::parse_share)]
    pub sim_fault_list_404_rate: f64,
    /// Answer 400 to any `in` in a $filter (the operator falls back to `or`).
    #[arg(long)]
    pub sim_fault_refuse_in: bool,
    /// Play a real tenant's inventory: a stale twin (Inactive, seen 30–170
    /// days ago) or a discovered twin (never onboarded) beside every device.
    #[arg(long)]
    pub sim_real_tenant: bool,
    /// Issue tokens without a `roles` claim (readiness then reads a machine).
    #[arg(long)]
    pub sim_token_without_roles: bool,
    /// Which platforms the offboard API accepts: `all` (Microsoft's current
    /// page) or `windows-only` (its older answer).
    #[arg(long, value_enum, default_value = "all")]
    pub sim_offboard_platforms: simulator::OffboardPlatforms,
    /// The simulator's rate limits per API family (`none` serves without limit);
    /// the same syntax and parser as `simulate --rate-limit`.
    #[arg(long, default_value = simulator::DEFAULT_RATE_LIMITS, value_parser = simulator::parse_rate_limits)]
    pub sim_rate_limit: simulator::RateLimits,
    /// The controller's own rate budget (`run --rate-limit`).
    #[arg(long, default_value = "100/60s,1500/3600s")]
    pub rate_limit: RateLimits,
    /// Keep exactly N changes per resource for watches that resume, however recent;
    /// a watch from an older version gets `410 Expired` and its client lists again
    /// (small values make relists happen, as etcd compaction does on a cluster).
    /// Without it the API keeps what kube-apiserver's watch cache keeps: the last
    /// 100 changes per resource however old, and every change of the last 75 s, up
    /// to 102,400.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub watch_history: Option<u64>,
    /// How often the controller polls in-flight actions.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
}

/// The tenant the simulator accepts (a playground secret, not a real one).
const SIM_TENANT: &str = "sim-tenant";
const SIM_CLIENT: &str = "sim-client";
const SIM_SECRET: &str = "sim-secret";

/// The second simulated tenant, reached through the `DefenderConnection`
/// [`SECOND_CONNECTION`] in `default` (its secret in the Secret of the same name).
pub const SECOND_TENANT: &str = "sim-tenant-fabrikam";
const SECOND_CLIENT: &str = "sim-client-fabrikam";
const SECOND_SECRET: &str = "sim-secret-fabrikam";
pub const SECOND_CONNECTION: &str = "fabrikam";

pub struct Playground {
    pub api: ApiHandle,
    /// The tenant of the operator's own credentials.
    pub sim: SimHandle,
    /// The tenant of the `fabrikam` DefenderConnection.
    pub second: SimHandle,
}

impl DevArgs {
    fn watch_history(&self) -> WatchHistory {
        self.watch_history.map_or_else(WatchHistory::default, |n| {
            WatchHistory::changes(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn sim_config(&self) -> SimConfig {
        SimConfig {
            machines: self.sim_machines,
            seed: self.sim_seed,
            unsuccessful_share: self.sim_unsuccessful_share,
            time_scale: self.sim_time_scale,
            rate_limits: self.sim_rate_limit.0.clone(),
            faults: FaultConfig {
                error_rate: self.sim_fault_error_rate,
                latency: self.sim_fault_latency,
                lost_response_rate: self.sim_fault_lost_response_rate,
                lost_response_mode: self.sim_fault_lost_response_mode,
                list_lag: self.sim_fault_list_lag,
                next_link: self.sim_fault_next_link,
                retry_after: self.sim_fault_retry_after,
                pending_conflict_wording: self.sim_fault_pending_conflict_wording,
                nulls: self.sim_fault_nulls,
                list_404_rate: self.sim_fault_list_404_rate,
                refuse_in: self.sim_fault_refuse_in,
            },
            real_tenant: self.sim_real_tenant,
            token_without_roles: self.sim_token_without_roles,
            offboard_platforms: self.sim_offboard_platforms,
            ..SimConfig::default()
        }
    }
}

/// Start the API (with the CRDs), the simulator of each tenant, and the
/// second tenant's Secret and DefenderConnection.
pub async fn start(args: &DevArgs) -> std::io::Result<Playground> {
    let sim = simulator::spawn(
        args.sim_config(),
        tokio::net::TcpListener::bind(args.sim_listen).await?,
    )
    .await?;
    let second = simulator::spawn(
        SimConfig {
            tenant_id: SECOND_TENANT.into(),
            client_id: SECOND_CLIENT.into(),
            client_secret: SECOND_SECRET.into(),
            seed: args.sim_seed.wrapping_add(1),
            ..args.sim_config()
        },
        tokio::net::TcpListener::bind((args.sim_listen.ip(), 0)).await?,
    )
    .await?;
    let config = ApiServerConfig {
        crds: vec![DeviceOffboard::crd(), DefenderConnection::crd()],
        watch_history: args.watch_history(),
        ..ApiServerConfig::default()
    };
    let api = devcluster::spawn_api(
        config,
        tokio::net::TcpListener::bind(args.api_listen).await?,
    )
    .await?;
    let client = api.client().await.map_err(std::io::Error::other)?;
    create_nodes(&client).await.map_err(std::io::Error::other)?;
    create_connection(&client, "default", SECOND_CONNECTION, &second)
        .await
        .map_err(std::io::Error::other)?;
    Ok(Playground { api, sim, second })
}

/// A Secret with the simulated tenant's client secret, and a
/// DefenderConnection to that simulator, in `namespace`.
pub async fn create_connection(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    sim: &SimHandle,
) -> Result<(), kube::Error> {
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": {"client-secret": sim.config().client_secret},
    }))
    .expect("a valid Secret");
    let created = Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await;
    ignore_exists(created)?;
    let credential = serde_json::json!({"clientSecret": {"name": name, "key": "client-secret"}});
    create_connection_to(client, namespace, name, sim, credential).await
}

/// A ServiceAccount and a DefenderConnection to that simulator using it
/// (workload identity: the operator requests the ServiceAccount's token).
pub async fn create_workload_identity_connection(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    sim: &SimHandle,
) -> Result<(), kube::Error> {
    // The ServiceAccount's owner lets the connection of the same name use it.
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "annotations": {
            offboard_operator::tenants::controller::TOKEN_OPT_IN_ANNOTATION: name,
        }},
    }))
    .expect("a valid ServiceAccount");
    let created = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &account)
        .await;
    ignore_exists(created)?;
    let credential = serde_json::json!({"workloadIdentity": {"serviceAccountName": name}});
    create_connection_to(client, namespace, name, sim, credential).await
}

/// A DefenderConnection to the simulator's tenant and app with `credential`.
async fn create_connection_to(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    sim: &SimHandle,
    credential: serde_json::Value,
) -> Result<(), kube::Error> {
    let config = sim.config();
    let connection: DefenderConnection = serde_json::from_value(serde_json::json!({
        "apiVersion": "defender.offboard.dev/v1alpha1",
        "kind": "DefenderConnection",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "tenantId": config.tenant_id,
            "clientId": config.client_id,
            "apiUrl": sim.base_url(),
            "loginUrl": sim.base_url(),
            "credential": credential,
        },
    }))
    .expect("a valid DefenderConnection");
    let created = Api::<DefenderConnection>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &connection)
        .await;
    ignore_exists(created)
}

fn ignore_exists<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error),
    }
}

/// The `host:port` of a simulator, for `run --connection-allowed-hosts`.
pub fn sim_host(sim: &SimHandle) -> String {
    sim.base_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// A playground Node: its name, `kubernetes.io/os`, and the cloud identity a
/// kubelet on an Azure VM scale set reports (the simulator's record of each
/// carries the matching `vmMetadata`).
#[derive(Debug, Clone, Copy)]
pub struct DevNode {
    pub name: &'static str,
    pub os: &'static str,
    pub provider_id: &'static str,
    pub system_uuid: &'static str,
}

const fn dev_node(
    name: &'static str,
    os: &'static str,
    provider_id: &'static str,
    system_uuid: &'static str,
) -> DevNode {
    DevNode {
        name,
        os,
        provider_id,
        system_uuid,
    }
}

/// The playground's fake Nodes, Windows and Linux, each with the device the
/// simulator keeps for it (`win-node-2`'s name is shared by three records: a
/// previous VM of the reused name and a discovered one; its cloud identity
/// tells them apart).
pub const DEV_NODES: &[DevNode] = &[
    dev_node(
        "win-node-1",
        "windows",
        "azure:///subscriptions/00000000-0000-4000-8000-0000000000aa/resourceGroups/mc_dev_playground/providers/Microsoft.Compute/virtualMachineScaleSets/akswin/virtualMachines/0",
        "5a1e0001-0000-4000-8000-000000000001",
    ),
    dev_node(
        "win-node-2",
        "windows",
        "azure:///subscriptions/00000000-0000-4000-8000-0000000000aa/resourceGroups/mc_dev_playground/providers/Microsoft.Compute/virtualMachineScaleSets/akswin/virtualMachines/1",
        "5a1e0001-0000-4000-8000-000000000002",
    ),
    dev_node(
        "win-node-3",
        "windows",
        "azure:///subscriptions/00000000-0000-4000-8000-0000000000aa/resourceGroups/mc_dev_playground/providers/Microsoft.Compute/virtualMachineScaleSets/akswin/virtualMachines/2",
        "5a1e0001-0000-4000-8000-000000000003",
    ),
    dev_node(
        "linux-node-1",
        "linux",
        "azure:///subscriptions/00000000-0000-4000-8000-0000000000aa/resourceGroups/mc_dev_playground/providers/Microsoft.Compute/virtualMachineScaleSets/akslinux/virtualMachines/0",
        "5a1e0001-0000-4000-8000-000000000011",
    ),
    dev_node(
        "linux-node-2",
        "linux",
        "azure:///subscriptions/00000000-0000-4000-8000-0000000000aa/resourceGroups/mc_dev_playground/providers/Microsoft.Compute/virtualMachineScaleSets/akslinux/virtualMachines/1",
        "5a1e0001-0000-4000-8000-000000000012",
    ),
];

/// The playground Node of this name.
pub fn dev_node_named(name: &str) -> Option<DevNode> {
    DEV_NODES.iter().copied().find(|n| n.name == name)
}

/// Create a Node with the `kubernetes.io/os` label a kubelet sets and no
/// cloud identity (a bare-metal or hand-registered Node).
pub async fn create_node(client: &kube::Client, name: &str, os: &str) -> Result<(), kube::Error> {
    create_node_from(
        client,
        serde_json::json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/os": os, "kubernetes.io/hostname": name}},
        }),
    )
    .await
}

/// Create a playground Node as its kubelet would: labels, `spec.providerID`
/// and `status.nodeInfo.systemUUID`.
pub async fn create_dev_node(client: &kube::Client, node: DevNode) -> Result<(), kube::Error> {
    create_node_from(
        client,
        serde_json::json!({
            "metadata": {"name": node.name, "labels": {"kubernetes.io/os": node.os, "kubernetes.io/hostname": node.name}},
            "spec": {"providerID": node.provider_id},
            "status": {"nodeInfo": {
                "systemUUID": node.system_uuid, "machineID": "", "bootID": "", "kernelVersion": "",
                "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "", "kubeProxyVersion": "",
                "operatingSystem": node.os, "architecture": "amd64"
            }},
        }),
    )
    .await
}

async fn create_node_from(
    client: &kube::Client,
    body: serde_json::Value,
) -> Result<(), kube::Error> {
    let mut body = body;
    body["apiVersion"] = "v1".into();
    body["kind"] = "Node".into();
    let node: Node = serde_json::from_value(body).expect("a valid Node");
    match Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error),
    }
}

async fn create_nodes(client: &kube::Client) -> Result<(), kube::Error> {
    for node in DEV_NODES {
        create_dev_node(client, *node).await?;
    }
    Ok(())
}

/// The client configuration that reaches the playground's simulator.
pub fn sim_client_config(sim: &SimHandle, rate_limits: RateLimits) -> ClientConfig {
    ClientConfig {
        endpoints: Endpoints::new(
            Cloud::Commercial,
            Some(&sim.base_url()),
            Some(&sim.base_url()),
        )
        .expect("loopback URLs are valid"),
        identity: ClientIdentity::from_parts(
            Some(SIM_TENANT.into()),
            Some(SIM_CLIENT.into()),
            Some(SIM_SECRET.into()),
            None,
            None,
        )
        .expect("complete identity"),
        rate_limits,
        request_timeout: Duration::from_secs(10),
        budget_wait: BudgetWait::Wait,
    }
}

/// Files next to the kubeconfig that let `defender-offboard run` reach the
/// simulator: the secret as a file (never on a command line) and an env file.
/// Paths in the env file are absolute, so it works from any directory.
fn write_run_files(
    dir: &Path,
    kubeconfig: &Path,
    sim: &SimHandle,
    second: &SimHandle,
) -> std::io::Result<PathBuf> {
    let dir = std::path::absolute(dir)?;
    let kubeconfig = std::path::absolute(kubeconfig)?;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, SIM_SECRET)?;
    let env = dir.join("env");
    std::fs::write(
        &env,
        format!(
            "export KUBECONFIG={kubeconfig}\nexport AZURE_TENANT_ID={SIM_TENANT}\nexport AZURE_CLIENT_ID={SIM_CLIENT}\n\
             export AZURE_CLIENT_SECRET_FILE={secret}\nexport DEFENDER_API_URL={url}\nexport AZURE_AUTHORITY_HOST={url}\n\
             export DEFENDER_CONNECTIONS=true\nexport DEFENDER_CONNECTION_ALLOWED_HOSTS={second}\n\
             export DEFENDER_PROTECTED_TAGS={protected}\n",
            kubeconfig = kubeconfig.display(),
            secret = secret.display(),
            url = sim.base_url(),
            second = sim_host(second),
            protected = simulator::PROTECTED_EXAMPLE_TAG,
        ),
    )?;
    Ok(env)
}

// One piece: the playground's start-up is a script a newcomer reads top to
// bottom (start, write files, say where things are, apply, wait).
pub async fn run(args: DevArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    telemetry::init(LogFormat::Text);
    let playground = start(&args).await?;
    let dir = args
        .kubeconfig_out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    playground.api.write_kubeconfig(&args.kubeconfig_out)?;
    let env_file = write_run_files(
        dir,
        &args.kubeconfig_out,
        &playground.sim,
        &playground.second,
    )?;
    println!(
        "defender-offboard dev playground (a development and test double, not a production target)"
    );
    println!(
        "  Kubernetes API  {}   kubeconfig: {}",
        playground.api.url(),
        args.kubeconfig_out.display()
    );
    println!(
        "  MDE simulator   {}   stats: {}/_sim/stats",
        playground.sim.base_url(),
        playground.sim.base_url()
    );
    println!(
        "  second tenant   {}   DefenderConnection default/{SECOND_CONNECTION} (try: kubectl --kubeconfig {} get defenderconnections)",
        playground.second.base_url(),
        args.kubeconfig_out.display()
    );
    println!(
        "  try:            kubectl --kubeconfig {} get doff",
        args.kubeconfig_out.display()
    );
    println!(
        "  nodes:          {} (try: kubectl --kubeconfig {} delete node win-node-1)",
        DEV_NODES
            .iter()
            .map(|n| n.name)
            .collect::<Vec<_>>()
            .join(", "),
        args.kubeconfig_out.display()
    );

    let client = playground.api.client().await?;
    let controller = if args.without_controller {
        println!(
            "  controller:     not started; run it yourself:  . {} && defender-offboard run --metrics-addr 127.0.0.1:0 --offboard-deleted-nodes",
            env_file.display()
        );
        None
    } else {
        println!(
            "  controller:     running in this process, offboarding deleted nodes (Windows and Linux) into `default` after a 30 s grace"
        );
        Some(tokio::spawn(run_embedded_controller(
            client.clone(),
            &playground,
            &args,
        )))
    };

    if let Some(path) = &args.apply {
        let names = apply_manifests(&client, path).await?;
        println!(
            "applied {} DeviceOffboard resources from {}",
            names.len(),
            path.display()
        );
        watch_until_final(&client, &names).await?;
        for (tenant, sim) in [
            ("own", &playground.sim),
            (SECOND_CONNECTION, &playground.second),
        ] {
            let stats = sim.stats();
            println!(
                "MDE simulator ({tenant} tenant): {} offboard actions created, {} answered 429, {} machines offboarded more than once",
                stats.actions_created, stats.throttled, stats.duplicate_offboards
            );
        }
        if args.exit_when_done {
            if let Some(task) = controller {
                task.abort();
            }
            return Ok(());
        }
    }
    println!("playground running; Ctrl-C to stop");
    telemetry::shutdown_signal().await;
    if let Some(task) = controller {
        task.abort();
    }
    playground.api.shutdown().await;
    Ok(())
}

fn run_embedded_controller(
    client: kube::Client,
    playground: &Playground,
    args: &DevArgs,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let sim = &playground.sim;
    let second = sim_host(&playground.second);
    let settings = Settings {
        lookup_delay: Duration::from_secs(2),
        // A deleted Node's offboard waits for it to come back; short here.
        node_grace: Duration::from_secs(30),
        // As the env file's `run`: examples/protected.yaml shows a refusal.
        protection: Protection::from_flags(&[simulator::PROTECTED_EXAMPLE_TAG.to_string()], &[]),
        ..Settings::default()
    };
    // Node offboarding on, in `default`: `kubectl delete node win-node-1`
    // shows a DeviceOffboard reach Succeeded.
    let controller = embedded_controller_with(
        client,
        sim,
        args.rate_limit.clone(),
        settings,
        args.poll_interval,
        |run| {
            run.nodes.offboard_deleted_nodes = true;
            run.nodes.node_offboard_namespace = Some("default".into());
            run.connections = true;
            run.connection_allowed_hosts = vec![second];
            // The examples are applied to `default` without a connectionRef.
            run.default_connection_namespaces = Some(DefaultNamespaces::Only(
                ["default".to_string()].into_iter().collect(),
            ));
        },
    );
    async move {
        match controller {
            Ok(controller) => controller.await,
            Err(error) => eprintln!("error: {error}"),
        }
    }
}

/// A controller for the playground's API and simulator, run in this process
/// until the returned future is dropped (tests use it with their own timings).
pub fn embedded_controller(
    client: kube::Client,
    sim: &SimHandle,
    rate_limits: RateLimits,
    settings: Settings,
    poll_interval: Duration,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, mde_client::MdeError> {
    embedded_controller_with(client, sim, rate_limits, settings, poll_interval, |_| {})
}

/// [`embedded_controller`] with `run`'s flags changed by `configure` (node
/// offboarding, the TTL sweep interval).
pub fn embedded_controller_with(
    client: kube::Client,
    sim: &SimHandle,
    rate_limits: RateLimits,
    settings: Settings,
    poll_interval: Duration,
    configure: impl FnOnce(&mut RunArgs),
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, mde_client::MdeError> {
    let metrics = Arc::new(Metrics::default());
    build_controller(
        client,
        sim,
        (rate_limits, settings, poll_interval),
        metrics,
        configure,
    )
}

/// [`embedded_controller`] reporting into `metrics`, so a test can read what
/// the controller counted (e.g. status-write conflicts).
pub fn observed_controller(
    client: kube::Client,
    sim: &SimHandle,
    rate_limits: RateLimits,
    settings: Settings,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, mde_client::MdeError> {
    build_controller(
        client,
        sim,
        (rate_limits, settings, poll_interval),
        metrics,
        |_| {},
    )
}

fn build_controller(
    client: kube::Client,
    sim: &SimHandle,
    (rate_limits, settings, poll_interval): (RateLimits, Settings, Duration),
    metrics: Arc<Metrics>,
    configure: impl FnOnce(&mut RunArgs),
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, mde_client::MdeError> {
    let config = ClientConfig {
        // As `run`: a worker never waits for budget.
        budget_wait: BudgetWait::Refuse,
        ..sim_client_config(sim, rate_limits.clone())
    };
    let mde = DefenderClient::new(config, metrics.clone())?;
    let mut run_args = default_run_args();
    run_args.poll_interval = poll_interval;
    run_args.connection.rate_limit = rate_limits;
    configure(&mut run_args);
    let ctx = Arc::new(Context::with_connections(
        client,
        Connections::new(Some(mde), run_args.connections)
            .with_default_namespaces(run_args.default_namespaces()),
        metrics,
        settings,
        Some("dev".into()),
    ));
    let config = run_args.config();
    Ok(async move { run_with_connections(&config, ctx, std::future::pending()).await })
}

/// `run`'s defaults, as clap parses them.
fn default_run_args() -> RunArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunArgs,
    }
    Wrapper::parse_from(["run"]).run
}

/// Create every DeviceOffboard in `path` (a file or a directory of YAML files).
pub async fn apply_manifests(
    client: &kube::Client,
    path: &Path,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut names = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let mut resource: DeviceOffboard = serde_json::from_value(value)
                .map_err(|e| format!("{}: not a DeviceOffboard: {e}", file.display()))?;
            let namespace = resource
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            resource.metadata.namespace = Some(namespace.clone());
            let name = resource.metadata.name.clone().unwrap_or_default();
            let api: Api<DeviceOffboard> = Api::namespaced(client.clone(), &namespace);
            match api.create(&PostParams::default(), &resource).await {
                Ok(_) => println!("  created  {namespace}/{name}"),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    println!("  exists   {namespace}/{name}")
                }
                Err(kube::Error::Api(status)) => {
                    return Err(format!("{}: {}", file.display(), status.message).into());
                }
                Err(error) => return Err(error.into()),
            }
            names.push((namespace, name));
        }
    }
    Ok(names)
}

/// Print each phase change until every named resource is final.
pub async fn watch_until_final(
    client: &kube::Client,
    names: &[(String, String)],
) -> Result<(), kube::Error> {
    let api: Api<DeviceOffboard> = Api::all(client.clone());
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    let started = std::time::Instant::now();
    println!(
        "{:>8} {:<24} {:<11} {:<38} {:<10} REASON",
        "", "NAME", "PHASE", "ACTION", "STATUS"
    );
    loop {
        let list = api.list(&ListParams::default()).await?;
        let mut final_count = 0;
        for resource in &list.items {
            let key = (
                resource.metadata.namespace.clone().unwrap_or_default(),
                resource.metadata.name.clone().unwrap_or_default(),
            );
            if !names.contains(&key) {
                continue;
            }
            let status = resource.status.clone().unwrap_or_default();
            let phase = status.phase.unwrap_or(Phase::Pending);
            if phase.is_terminal() {
                final_count += 1;
            }
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
            let line = format!(
                "{:<24} {:<11} {:<38} {:<10} {}",
                key.1,
                phase.as_str(),
                status.machine_action_id.as_deref().unwrap_or("-"),
                status.action_status.as_deref().unwrap_or("-"),
                ready.map(|c| c.reason.as_str()).unwrap_or("-"),
            );
            if seen.get(&key) != Some(&line) {
                println!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
                if phase.is_terminal()
                    && let Some(error) = &status.last_error
                {
                    println!("         {}: {}", error.code, error.message);
                }
                seen.insert(key, line);
            }
        }
        if final_count == names.len() {
            println!(
                "all {final_count} resources are final after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dev: DevArgs,
    }

    #[test]
    fn sim_rate_limit_takes_what_simulate_takes() {
        let none = Cli::try_parse_from(["dev", "--sim-rate-limit", "none"]).unwrap();
        assert!(none.dev.sim_config().rate_limits.is_empty());
        let fast = Cli::try_parse_from(["dev", "--sim-rate-limit", "5/600ms"]).unwrap();
        assert_eq!(
            fast.dev.sim_config().rate_limits,
            vec![simulator::RateLimit {
                calls: 5,
                window: Duration::from_millis(600)
            }]
        );
        let bad = Cli::try_parse_from(["dev", "--sim-rate-limit", "many"]);
        assert!(bad.is_err());
    }

    #[test]
    fn dev_keeps_the_watch_history_of_kubes_watch_cache_unless_told_a_count() {
        let default = Cli::try_parse_from(["dev"]).unwrap().dev.watch_history();
        assert_eq!(
            (default.min_changes, default.fresh_for, default.max_changes),
            (100, Duration::from_secs(75), 102_400)
        );
        let short = Cli::try_parse_from(["dev", "--watch-history", "32"]).unwrap();
        assert_eq!(short.dev.watch_history(), WatchHistory::changes(32));
        assert!(Cli::try_parse_from(["dev", "--watch-history", "0"]).is_err());
    }

    #[tokio::test]
    async fn the_env_file_names_the_kubeconfig_that_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = simulator::spawn(SimConfig::default(), listener)
            .await
            .unwrap();
        let kubeconfig = dir.path().join("elsewhere").join("my.kubeconfig");
        let env = write_run_files(dir.path(), &kubeconfig, &sim, &sim).unwrap();
        let text = std::fs::read_to_string(env).unwrap();
        assert!(
            text.contains("export DEFENDER_CONNECTIONS=true\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("export KUBECONFIG={}\n", kubeconfig.display())),
            "{text}"
        );
        assert!(
            !text.contains(SIM_SECRET),
            "the secret goes in a file: {text}"
        );
    }
}
