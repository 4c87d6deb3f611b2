//! The simulated device inventory: fixed example machines plus deterministic,
//! seed-generated ones.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::actions::Outcome;
use super::config::OffboardPlatforms;

/// What an offboard of an example machine does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExampleOffboard {
    /// The action ends `Succeeded`.
    Succeeds,
    /// The action ends `Failed`.
    Fails,
    /// The action ends `TimeOut`: the device stopped reporting and never
    /// picks it up.
    TimesOut,
    /// The call is refused with `400 OsPlatformNotSupported`, whatever
    /// `--offboard-platforms` says.
    PlatformNotSupported,
    /// The call is refused with `400 BadRequest`: a device found by device
    /// discovery was never onboarded.
    NotOnboarded,
}

/// How MDE holds an example record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExampleRecord {
    /// `onboardingStatus` `Onboarded`, this `healthStatus`, last seen this
    /// many minutes before the start.
    Onboarded {
        health: &'static str,
        seen_mins_ago: u32,
    },
    /// Found by device discovery, never onboarded: `onboardingStatus`
    /// `CanBeOnboarded`, `healthStatus` null, no agent, no `vmMetadata`.
    Discovered { seen_mins_ago: u32 },
}

/// An onboarded record that reports: `Active`, seen that many minutes ago.
const fn active(seen_mins_ago: u32) -> ExampleRecord {
    ExampleRecord::Onboarded {
        health: "Active",
        seen_mins_ago,
    }
}

/// The Azure VM an example record was seen on (its `vmMetadata`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExampleVm {
    /// The VM's id: a Kubernetes Node's `status.nodeInfo.systemUUID`.
    pub vm_id: &'static str,
    pub subscription_id: &'static str,
    /// The VM's resource id: a Node's `spec.providerID` without `azure://`.
    pub resource_id: &'static str,
}

impl ExampleVm {
    /// The `spec.providerID` of the Kubernetes Node on this VM.
    pub fn provider_id(&self) -> String {
        format!("azure://{}", self.resource_id)
    }
}

/// The subscription of the `dev` playground's cluster.
pub const PLAYGROUND_SUBSCRIPTION: &str = "00000000-0000-4000-8000-0000000000aa";

/// The resource id of instance `$instance` of the playground's scale set `$set`.
macro_rules! playground_vm {
    ($set:literal, $instance:literal) => {
        concat!(
            "/subscriptions/00000000-0000-4000-8000-0000000000aa/resourceGroups/mc_dev_playground",
            "/providers/Microsoft.Compute/virtualMachineScaleSets/",
            $set,
            "/virtualMachines/",
            $instance
        )
    };
}

/// A machine always present in the simulator, for manifests under `examples/`
/// and the `dev` playground's Nodes.
#[derive(Clone, Copy, Debug)]
pub struct ExampleMachine {
    pub id: &'static str,
    pub computer_dns_name: &'static str,
    pub os_platform: &'static str,
    pub offboard: ExampleOffboard,
    pub record: ExampleRecord,
    pub vm: Option<ExampleVm>,
    /// Its `machineTags`; `None` keeps the ones drawn for it.
    pub tags: Option<&'static [&'static str]>,
}

/// The examples that were there first draw their details from the
/// inventory's main random stream, so the machines generated after them
/// stay what they were for a seed; later ones draw from a stream of their own.
const FIRST_EXAMPLES: usize = 10;

/// Seeded into every simulator whatever `--machines` and `--seed` say.
///
/// Names shared on purpose: `kiosk-lobby-01` (a live record beside one that
/// stopped reporting 42 days ago), `shared-kiosk-02` (two live records: by
/// name it is ambiguous), `lab-pc-09` (beside a record device discovery
/// found), `win-node-2` (the live VM, a previous VM of the reused name and a
/// discovered record: one by cloud identity, ambiguous by name).
pub const EXAMPLE_MACHINES: &[ExampleMachine] = &[
    ExampleMachine {
        id: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
        computer_dns_name: "finance-laptop-07.contoso.com",
        os_platform: "Windows11",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(12),
        vm: None,
    },
    ExampleMachine {
        id: "1b2c3d4e5f60718293a4b5c6d7e8f9012345678a",
        computer_dns_name: "hr-desktop-12.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(25),
        vm: None,
    },
    ExampleMachine {
        id: "2c3d4e5f60718293a4b5c6d7e8f9012345678ab1",
        computer_dns_name: "ws2019-file-01.contoso.com",
        os_platform: "WindowsServer2019",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(8),
        vm: None,
    },
    ExampleMachine {
        id: "3d4e5f60718293a4b5c6d7e8f9012345678ab1c2",
        computer_dns_name: "build-agent-03.contoso.com",
        os_platform: "Linux",
        offboard: ExampleOffboard::PlatformNotSupported,
        tags: None,
        record: active(40),
        vm: None,
    },
    ExampleMachine {
        id: "4e5f60718293a4b5c6d7e8f9012345678ab1c2d3",
        computer_dns_name: "kiosk-lobby-01.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::TimesOut,
        tags: None,
        record: ExampleRecord::Onboarded {
            health: "Inactive",
            seen_mins_ago: 42 * 24 * 60,
        },
        vm: None,
    },
    ExampleMachine {
        id: "5f60718293a4b5c6d7e8f9012345678ab1c2d3e4",
        computer_dns_name: "kiosk-lobby-01.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(5),
        vm: None,
    },
    ExampleMachine {
        id: "60718293a4b5c6d7e8f9012345678ab1c2d3e4f5",
        computer_dns_name: "lab-pc-09.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Fails,
        tags: None,
        record: active(30),
        vm: None,
    },
    // The Nodes of the `dev` playground (node offboarding derives the
    // device name from the node name, and its cloud identity from the
    // Node's providerID and systemUUID).
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000001",
        computer_dns_name: "win-node-1",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(1),
        vm: Some(ExampleVm {
            vm_id: "5a1e0001-0000-4000-8000-000000000001",
            subscription_id: PLAYGROUND_SUBSCRIPTION,
            resource_id: playground_vm!("akswin", "0"),
        }),
    },
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000002",
        computer_dns_name: "win-node-2",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(1),
        vm: Some(ExampleVm {
            vm_id: "5a1e0001-0000-4000-8000-000000000002",
            subscription_id: PLAYGROUND_SUBSCRIPTION,
            resource_id: playground_vm!("akswin", "1"),
        }),
    },
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000003",
        computer_dns_name: "win-node-3",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(1),
        vm: Some(ExampleVm {
            vm_id: "5a1e0001-0000-4000-8000-000000000003",
            subscription_id: PLAYGROUND_SUBSCRIPTION,
            resource_id: playground_vm!("akswin", "2"),
        }),
    },
    // Ids from here on start with `fe`: lists sorted by id meet them last.
    ExampleMachine {
        id: "fe00000000000000000000000000000000000201",
        computer_dns_name: "shared-kiosk-02.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(5),
        vm: None,
    },
    ExampleMachine {
        id: "fe00000000000000000000000000000000000202",
        computer_dns_name: "shared-kiosk-02.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(20),
        vm: None,
    },
    ExampleMachine {
        id: "fed15c0000000000000000000000000000000009",
        computer_dns_name: "lab-pc-09.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::NotOnboarded,
        tags: None,
        record: ExampleRecord::Discovered { seen_mins_ago: 30 },
        vm: None,
    },
    // A previous VM of the reused name win-node-2: it reported two days ago.
    ExampleMachine {
        id: "fe7a11e0de000000000000000000000000000702",
        computer_dns_name: "win-node-2",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::TimesOut,
        tags: None,
        record: ExampleRecord::Onboarded {
            health: "Active",
            seen_mins_ago: 2 * 24 * 60,
        },
        vm: Some(ExampleVm {
            vm_id: "5a1e0001-0000-4000-8000-000000000702",
            subscription_id: PLAYGROUND_SUBSCRIPTION,
            resource_id: playground_vm!("akswin", "7"),
        }),
    },
    ExampleMachine {
        id: "fed15c0de0000000000000000000000000000002",
        computer_dns_name: "win-node-2",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::NotOnboarded,
        tags: None,
        record: ExampleRecord::Discovered { seen_mins_ago: 10 },
        vm: None,
    },
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000011",
        computer_dns_name: "linux-node-1",
        os_platform: "Linux",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(1),
        vm: Some(ExampleVm {
            vm_id: "5a1e0001-0000-4000-8000-000000000011",
            subscription_id: PLAYGROUND_SUBSCRIPTION,
            resource_id: playground_vm!("akslinux", "0"),
        }),
    },
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000012",
        computer_dns_name: "linux-node-2",
        os_platform: "Linux",
        offboard: ExampleOffboard::Succeeds,
        tags: None,
        record: active(1),
        vm: Some(ExampleVm {
            vm_id: "5a1e0001-0000-4000-8000-000000000012",
            subscription_id: PLAYGROUND_SUBSCRIPTION,
            resource_id: playground_vm!("akslinux", "1"),
        }),
    },
    // A domain controller carrying the tag administrators protect devices
    // with: `run --protected-tag do-not-offboard` never offboards it.
    ExampleMachine {
        id: "fedc000000000000000000000000000000000001",
        computer_dns_name: "dc-01.contoso.com",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
        tags: Some(&[PROTECTED_EXAMPLE_TAG, "Tier0"]),
        record: active(3),
        vm: None,
    },
];

/// The machine tag `dc-01.contoso.com` carries (`examples/protected.yaml`).
pub const PROTECTED_EXAMPLE_TAG: &str = "do-not-offboard";

/// Platforms the offboard API refuses with `OsPlatformNotSupported` under
/// `--offboard-platforms windows-only` (the older Offboard machine page).
pub const UNSUPPORTED_OFFBOARD_PLATFORMS: &[&str] = &["Linux", "macOS"];

/// Properties `GET /api/machines` accepts in `$filter`.
pub const FILTERABLE: &[&str] = &[
    "computerDnsName",
    "id",
    "version",
    "deviceValue",
    "aadDeviceId",
    "machineTags",
    "lastSeen",
    "exposureLevel",
    "onboardingStatus",
    "lastIpAddress",
    "healthStatus",
    "osPlatform",
    "riskScore",
    "rbacGroupId",
];

/// Properties `--fault-nulls` leaves alone: what a client finds a machine by.
const KEPT_UNDER_NULLS: &[&str] = &["id", "computerDnsName"];

/// `--fault-nulls`: every optional property of a machine's JSON becomes `null`
/// (`machineTags`, `lastSeen`, `osPlatform`, `healthStatus`, ...).
pub fn null_optional_fields(machine: &mut serde_json::Value) {
    super::actions::null_all_but(machine, KEPT_UNDER_NULLS);
}

/// A machine as `GET /api/machines` returns it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: String,
    pub computer_dns_name: String,
    pub first_seen: String,
    pub last_seen: String,
    pub os_platform: String,
    pub os_version: Option<String>,
    pub os_processor: String,
    pub version: String,
    pub os_build: Option<u64>,
    pub last_ip_address: String,
    pub last_external_ip_address: String,
    /// `None` for a device found by device discovery: no sensor runs on it.
    pub agent_version: Option<String>,
    /// `Active`, `Inactive`, ...; `None` for a device found by device discovery.
    pub health_status: Option<String>,
    /// `Onboarded`, or what device discovery says (`CanBeOnboarded`, ...).
    pub onboarding_status: String,
    pub device_value: String,
    pub rbac_group_id: u32,
    pub rbac_group_name: String,
    pub risk_score: String,
    pub exposure_level: String,
    pub is_aad_joined: bool,
    pub aad_device_id: Option<String>,
    pub machine_tags: Vec<String>,
    /// The Azure VM MDE saw the device on; `null` elsewhere.
    pub vm_metadata: Option<VmMetadata>,
    /// How an offboard action for this machine ends (not part of the API).
    #[serde(skip)]
    pub offboard_outcome: Outcome,
    /// Refused `OsPlatformNotSupported` whatever the platforms MDE
    /// accepts (an unsupported distribution or version; not part of the API).
    #[serde(skip)]
    pub platform_refused: bool,
}

/// `vmMetadata` of a machine on an Azure VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmMetadata {
    pub vm_id: String,
    pub cloud_provider: String,
    pub resource_id: String,
    pub subscription_id: String,
}

impl VmMetadata {
    fn azure(vm_id: String, subscription_id: &str, resource_id: String) -> Self {
        VmMetadata {
            vm_id,
            cloud_provider: "Azure".to_owned(),
            resource_id,
            subscription_id: subscription_id.to_owned(),
        }
    }

    /// Another VM that once held the name: a new `vmId`, and in a scale set
    /// another instance (`.../virtualMachines/{instance}`).
    fn previous(&self, rng: &mut StdRng, instance: usize) -> Self {
        let resource_id = match self.resource_id.rsplit_once("/virtualMachines/") {
            Some((set, _)) if set.contains("/virtualMachineScaleSets/") => {
                format!("{set}/virtualMachines/{instance}")
            }
            _ => self.resource_id.clone(),
        };
        VmMetadata {
            vm_id: random_uuid(rng),
            resource_id,
            ..self.clone()
        }
    }
}

/// Why MDE refuses to offboard a machine before it creates an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Found by device discovery, never onboarded: its `onboardingStatus`.
    NotOnboarded(String),
    /// The platform (its `osPlatform`) cannot be offboarded through the API.
    PlatformNotSupported(String),
}

impl Machine {
    /// Whether MDE refuses to offboard this machine, given the platforms
    /// it accepts.
    pub fn offboard_refusal(&self, platforms: OffboardPlatforms) -> Option<Refusal> {
        if self.onboarding_status != ONBOARDED {
            return Some(Refusal::NotOnboarded(self.onboarding_status.clone()));
        }
        let refused_platform = match platforms {
            OffboardPlatforms::All => false,
            OffboardPlatforms::WindowsOnly => {
                UNSUPPORTED_OFFBOARD_PLATFORMS.contains(&self.os_platform.as_str())
            }
        };
        (self.platform_refused || refused_platform)
            .then(|| Refusal::PlatformNotSupported(self.os_platform.clone()))
    }
}

const ONBOARDED: &str = "Onboarded";
/// What device discovery calls a device a sensor could be installed on.
const CAN_BE_ONBOARDED: &str = "CanBeOnboarded";

/// Per-platform details: version, build, agent version, name prefix, RBAC group.
struct PlatformInfo {
    version: &'static str,
    build: Option<u64>,
    agent: &'static str,
    prefix: &'static str,
    group: (u32, &'static str),
}

fn platform_info(platform: &str) -> PlatformInfo {
    let workstations = (101, "Workstations");
    match platform {
        "Windows11" => PlatformInfo {
            version: "23H2",
            build: Some(22631),
            agent: "10.8760.22631.4037",
            prefix: "lap",
            group: workstations,
        },
        "WindowsServer2019" => PlatformInfo {
            version: "1809",
            build: Some(17763),
            agent: "10.8760.17763.6189",
            prefix: "srv",
            group: (102, "Servers"),
        },
        "WindowsServer2022" => PlatformInfo {
            version: "21H2",
            build: Some(20348),
            agent: "10.8760.20348.2655",
            prefix: "srv",
            group: (102, "Servers"),
        },
        "Linux" => PlatformInfo {
            version: "22.04",
            build: None,
            agent: "101.24052.0002",
            prefix: "lnx",
            group: (103, "Non-Windows"),
        },
        "macOS" => PlatformInfo {
            version: "14.5",
            build: None,
            agent: "101.24042.0008",
            prefix: "mac",
            group: (103, "Non-Windows"),
        },
        _ => PlatformInfo {
            version: "22H2",
            build: Some(19045),
            agent: "10.8760.19045.4780",
            prefix: "desk",
            group: workstations,
        },
    }
}

fn pick_platform(rng: &mut StdRng) -> &'static str {
    match rng.random_range(0..100) {
        0..35 => "Windows10",
        35..70 => "Windows11",
        70..80 => "WindowsServer2019",
        80..90 => "WindowsServer2022",
        90..95 => "Linux",
        _ => "macOS",
    }
}

/// A seed-determined share of generated offboards does not succeed: four in
/// seven of those end `Failed`, the rest `TimeOut`. One draw per machine
/// whatever the share, so the rest of the inventory does not depend on it.
fn pick_outcome(rng: &mut StdRng, unsuccessful_share: f64) -> Outcome {
    let draw: f64 = rng.random_range(0..100) as f64;
    let unsuccessful = unsuccessful_share.clamp(0.0, 1.0) * 100.0;
    if draw < unsuccessful * 4.0 / 7.0 {
        Outcome::Failed
    } else if draw < unsuccessful {
        Outcome::TimeOut
    } else {
        Outcome::Succeeded
    }
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn hex_id(rng: &mut StdRng) -> String {
    let bytes: [u8; 20] = rng.random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn timestamp(at: jiff::Timestamp) -> String {
    format!("{at:.7}")
}

/// Fills in realistic details for a machine of the given identity.
fn build(
    rng: &mut StdRng,
    now: jiff::Timestamp,
    id: String,
    name: String,
    platform: &str,
    outcome: Outcome,
) -> Machine {
    let info = platform_info(platform);
    let windows = platform.starts_with("Windows");
    let workstation = info.group.0 == 101;
    let first_seen = now - jiff::SignedDuration::from_hours(rng.random_range(24..24 * 700));
    let last_seen = now - jiff::SignedDuration::from_mins(rng.random_range(1..180));
    let aad_joined = workstation && rng.random_bool(0.8);
    let tags = match rng.random_range(0..10) {
        0 => vec!["VIP".to_owned()],
        1 => vec!["Kiosk".to_owned(), "Shared".to_owned()],
        _ => Vec::new(),
    };
    Machine {
        os_version: info.build.map(|b| format!("10.0.{b}")),
        os_processor: if rng.random_bool(0.1) && !windows {
            "arm64"
        } else {
            "x64"
        }
        .to_owned(),
        version: info.version.to_owned(),
        os_build: info.build,
        first_seen: timestamp(first_seen),
        last_seen: timestamp(last_seen),
        last_ip_address: format!(
            "10.{}.{}.{}",
            rng.random_range(0..=255),
            rng.random_range(0..=255),
            rng.random_range(1..=254)
        ),
        last_external_ip_address: format!("203.0.113.{}", rng.random_range(1..=254)),
        agent_version: Some(info.agent.to_owned()),
        health_status: Some("Active".to_owned()),
        onboarding_status: ONBOARDED.to_owned(),
        device_value: pick(rng, &["Normal", "Normal", "Normal", "High", "Low"]).to_owned(),
        rbac_group_id: info.group.0,
        rbac_group_name: info.group.1.to_owned(),
        risk_score: pick(rng, &["None", "Informational", "Low", "Medium", "High"]).to_owned(),
        exposure_level: pick(rng, &["None", "Low", "Medium", "High"]).to_owned(),
        is_aad_joined: aad_joined,
        aad_device_id: aad_joined.then(|| {
            uuid::Builder::from_random_bytes(rng.random())
                .into_uuid()
                .to_string()
        }),
        machine_tags: tags,
        id,
        computer_dns_name: name,
        os_platform: platform.to_owned(),
        vm_metadata: None,
        offboard_outcome: outcome,
        platform_refused: false,
    }
}

fn random_uuid(rng: &mut StdRng) -> String {
    uuid::Builder::from_random_bytes(rng.random())
        .into_uuid()
        .to_string()
}

fn minutes_before(now: jiff::Timestamp, minutes: i64) -> jiff::Timestamp {
    now - jiff::SignedDuration::from_mins(minutes)
}

/// MDE last saw the machine `minutes` before `now`, first saw it no later.
fn seen(machine: &mut Machine, now: jiff::Timestamp, minutes: i64) {
    let last = minutes_before(now, minutes);
    machine.last_seen = timestamp(last);
    if machine
        .first_seen
        .parse::<jiff::Timestamp>()
        .is_ok_and(|first| first > last)
    {
        machine.first_seen = timestamp(last - jiff::SignedDuration::from_hours(24 * 30));
    }
}

/// A device device discovery found on the network and nobody onboarded:
/// no sensor, so no health, agent, device group, tags or VM identity.
fn discovered(machine: &mut Machine, now: jiff::Timestamp, seen_mins_ago: i64) {
    machine.onboarding_status = CAN_BE_ONBOARDED.to_owned();
    machine.health_status = None;
    machine.agent_version = None;
    machine.rbac_group_id = 0;
    machine.rbac_group_name = "UnassignedGroup".to_owned();
    machine.machine_tags.clear();
    machine.is_aad_joined = false;
    machine.aad_device_id = None;
    machine.vm_metadata = None;
    seen(machine, now, seen_mins_ago);
}

/// An example record as [`EXAMPLE_MACHINES`] describes it.
fn example(rng: &mut StdRng, now: jiff::Timestamp, e: &ExampleMachine) -> Machine {
    let outcome = match e.offboard {
        ExampleOffboard::Fails => Outcome::Failed,
        ExampleOffboard::TimesOut => Outcome::TimeOut,
        _ => Outcome::Succeeded,
    };
    let mut machine = build(
        rng,
        now,
        e.id.to_owned(),
        e.computer_dns_name.to_owned(),
        e.os_platform,
        outcome,
    );
    machine.platform_refused = e.offboard == ExampleOffboard::PlatformNotSupported;
    if let Some(tags) = e.tags {
        machine.machine_tags = tags.iter().map(|t| t.to_string()).collect();
    }
    machine.vm_metadata = e.vm.map(|vm| {
        VmMetadata::azure(
            vm.vm_id.to_owned(),
            vm.subscription_id,
            vm.resource_id.to_owned(),
        )
    });
    match e.record {
        ExampleRecord::Onboarded {
            health,
            seen_mins_ago,
        } => {
            machine.health_status = Some(health.to_owned());
            seen(&mut machine, now, i64::from(seen_mins_ago));
        }
        ExampleRecord::Discovered { seen_mins_ago } => {
            discovered(&mut machine, now, i64::from(seen_mins_ago));
        }
    }
    machine
}

/// The inventory: the example machines first, then `count` generated ones,
/// then (`real_tenant`) the stale and discovered twins. Everything but the
/// timestamps (relative to `now`) depends only on `seed`.
pub fn inventory(
    count: usize,
    seed: u64,
    unsuccessful_share: f64,
    real_tenant: bool,
    now: jiff::Timestamp,
) -> Vec<Machine> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut later_examples = StdRng::seed_from_u64(seed ^ 0x0000_e8a3_b1e5);
    let mut machines: Vec<Machine> = EXAMPLE_MACHINES
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let stream = if i < FIRST_EXAMPLES {
                &mut rng
            } else {
                &mut later_examples
            };
            example(stream, now, e)
        })
        .collect();

    let mut previous: Option<(String, String)> = None;
    for i in 0..count {
        let id = hex_id(&mut rng);
        let outcome = pick_outcome(&mut rng, unsuccessful_share);
        // Every 20th machine is a re-image of the one before: same name, new id.
        let (name, platform) = match previous.take() {
            Some((name, platform)) if i % 20 == 19 => (name, platform),
            _ => {
                let platform = pick_platform(&mut rng);
                let prefix = platform_info(platform).prefix;
                (
                    format!("{prefix}-{i:04}.contoso.local"),
                    platform.to_owned(),
                )
            }
        };
        let machine = build(&mut rng, now, id, name.clone(), &platform, outcome);
        if i % 20 == 19
            && let Some(old) = machines.last_mut()
            && old.computer_dns_name == name
        {
            mark_reimaged(old);
        }
        machines.push(machine);
        previous = Some((name, platform));
    }
    place_on_azure(&mut machines[EXAMPLE_MACHINES.len()..], seed);
    if real_tenant {
        let twins = twins(&machines, seed, now);
        machines.extend(twins);
    }
    machines
}

/// Half the generated servers run on Azure VMs and carry `vmMetadata`; a
/// re-imaged one keeps its VM's resource id under a new `vmId` (a VM
/// re-created under the same name). Drawn from a stream of its own, so the
/// rest of the inventory does not depend on it.
fn place_on_azure(generated: &mut [Machine], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0a2a_7e00);
    let subscription = random_uuid(&mut rng);
    let mut resource_of: std::collections::HashMap<String, String> = Default::default();
    for machine in generated {
        let server =
            machine.os_platform.starts_with("WindowsServer") || machine.os_platform == "Linux";
        let on_azure = rng.random_bool(0.5);
        let vm_id = random_uuid(&mut rng);
        let resource_id = match resource_of.get(&machine.computer_dns_name) {
            Some(resource_id) => resource_id.clone(),
            None if server && on_azure => {
                let host = machine
                    .computer_dns_name
                    .split('.')
                    .next()
                    .unwrap_or_default();
                let resource_id = format!(
                    "/subscriptions/{subscription}/resourceGroups/rg-servers/providers/Microsoft.Compute/virtualMachines/{host}"
                );
                resource_of.insert(machine.computer_dns_name.clone(), resource_id.clone());
                resource_id
            }
            None => continue,
        };
        machine.vm_metadata = Some(VmMetadata::azure(vm_id, &subscription, resource_id));
    }
}

/// `--real-tenant`: a stale record (`Inactive`, last seen 30 to 170 days
/// ago, on a previous VM when the name is an Azure VM's) for every example
/// name, and a discovered one (`CanBeOnboarded`) for every generated name,
/// each with an id of its own. An offboard of a stale one is never picked
/// up (`TimeOut`); one of a discovered one is refused.
fn twins(machines: &[Machine], seed: u64, now: jiff::Timestamp) -> Vec<Machine> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7e1a_7e0a);
    let mut named = std::collections::HashSet::new();
    let mut twins = Vec::new();
    for (i, original) in machines.iter().enumerate() {
        if !named.insert(original.computer_dns_name.as_str()) {
            continue;
        }
        let id = hex_id(&mut rng);
        let mut twin = build(
            &mut rng,
            now,
            id,
            original.computer_dns_name.clone(),
            &original.os_platform,
            Outcome::TimeOut,
        );
        if i < EXAMPLE_MACHINES.len() {
            let last = now - jiff::SignedDuration::from_hours(24 * rng.random_range(30..=170));
            twin.last_seen = timestamp(last);
            twin.first_seen =
                timestamp(last - jiff::SignedDuration::from_hours(24 * rng.random_range(30..400)));
            twin.health_status = Some("Inactive".to_owned());
            twin.vm_metadata = original
                .vm_metadata
                .as_ref()
                .map(|vm| vm.previous(&mut rng, 100 + twins.len()));
        } else {
            let seen_mins_ago = rng.random_range(5..120);
            discovered(&mut twin, now, seen_mins_ago);
        }
        twins.push(twin);
    }
    twins
}

/// A Windows 10 workstation with a given id, for a history that names a
/// machine the inventory does not hold (the `n`-th such).
pub fn with_id(rng: &mut StdRng, now: jiff::Timestamp, id: &str, n: usize) -> Machine {
    build(
        rng,
        now,
        id.to_ascii_lowercase(),
        format!("past-{n:04}.contoso.local"),
        "Windows10",
        Outcome::Succeeded,
    )
}

/// How long MDE waits for a report before it calls a machine inactive.
const INACTIVE_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_hours(7 * 24);

/// MDE last saw the machine at `at`: first seen no later, and inactive once
/// a week has passed without a report.
pub fn seen_last_at(machine: &mut Machine, at: jiff::Timestamp, now: jiff::Timestamp) {
    machine.last_seen = timestamp(at);
    let first = machine.first_seen.parse::<jiff::Timestamp>().ok();
    if first.is_none_or(|first| first > at) {
        machine.first_seen = timestamp(at - jiff::SignedDuration::from_hours(24 * 30));
    }
    machine.health_status = Some(
        if now.duration_since(at) > INACTIVE_AFTER {
            "Inactive"
        } else {
            "Active"
        }
        .to_owned(),
    );
}

/// The older half of a re-imaged pair stopped reporting weeks ago.
fn mark_reimaged(old: &mut Machine) {
    old.health_status = Some("Inactive".to_owned());
    if let Ok(first) = old.first_seen.parse::<jiff::Timestamp>() {
        let last = first + jiff::SignedDuration::from_hours(24 * 7);
        old.last_seen = timestamp(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNSUCCESSFUL: f64 = crate::config::DEFAULT_UNSUCCESSFUL_SHARE;

    fn plain(count: usize, seed: u64, share: f64, now: jiff::Timestamp) -> Vec<Machine> {
        inventory(count, seed, share, false, now)
    }

    /// The share is honoured (none at 0, all at 1, about 7% by default), and
    /// changing it leaves the rest of the inventory alone.
    #[test]
    fn the_unsuccessful_share_decides_outcomes_only() {
        let now = jiff::Timestamp::UNIX_EPOCH;
        let unsuccessful = |share| {
            plain(2000, 3, share, now)[EXAMPLE_MACHINES.len()..]
                .iter()
                .filter(|m| m.offboard_outcome != Outcome::Succeeded)
                .count()
        };
        assert_eq!(unsuccessful(0.0), 0);
        assert_eq!(unsuccessful(1.0), 2000);
        assert!((80..200).contains(&unsuccessful(UNSUCCESSFUL)));
        let ids = |share| {
            plain(50, 3, share, now)
                .into_iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0.0), ids(0.5));
    }

    #[test]
    fn inventory_is_deterministic_and_complete() {
        let now = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let a = plain(60, 7, UNSUCCESSFUL, now);
        let b = plain(60, 7, UNSUCCESSFUL, now);
        assert_eq!(a.len(), 60 + EXAMPLE_MACHINES.len());
        let ids = |m: &[Machine]| m.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&plain(60, 8, UNSUCCESSFUL, now)));
        let mut unique = ids(&a);
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), a.len(), "every record has an id of its own");
        for m in &a {
            assert_eq!(m.id.len(), 40, "{}", m.id);
            assert!(
                m.id.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        let mut names: Vec<_> = a[EXAMPLE_MACHINES.len()..]
            .iter()
            .map(|m| m.computer_dns_name.as_str())
            .collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(
            before - names.len(),
            3,
            "every 20th generated machine is a re-image"
        );
        let windows = a
            .iter()
            .filter(|m| m.os_platform.starts_with("Windows"))
            .count();
        assert!(
            windows * 10 >= a.len() * 7,
            "mostly Windows: {windows} of {}",
            a.len()
        );
    }

    /// Examples added later, twins and VMs draw from streams of their own:
    /// the generated machines of seed 1 are what they were before them.
    #[test]
    fn generated_machines_do_not_depend_on_later_examples() {
        let now = jiff::Timestamp::UNIX_EPOCH;
        for real_tenant in [false, true] {
            let generated = &inventory(3, 1, UNSUCCESSFUL, real_tenant, now)
                [EXAMPLE_MACHINES.len()..EXAMPLE_MACHINES.len() + 3];
            let described: Vec<_> = generated
                .iter()
                .map(|m| (m.id.as_str(), m.computer_dns_name.as_str()))
                .collect();
            assert_eq!(
                described,
                [
                    (
                        "9c8c6d5d4e9d7cbe063b45d0fd0221563df5a890",
                        "lap-0000.contoso.local"
                    ),
                    (
                        "bb5c0ec91d97710aafd15382f705fa658d052a84",
                        "srv-0001.contoso.local"
                    ),
                    (
                        "4922848adefaa2e7448ea298acf466b36fa15f92",
                        "lap-0002.contoso.local"
                    ),
                ]
            );
        }
    }

    #[test]
    fn example_machines_keep_their_documented_behaviour() {
        let now = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let machines = plain(0, 1, UNSUCCESSFUL, now);
        let find = |id: &str| machines.iter().find(|m| m.id == id).unwrap();
        for e in EXAMPLE_MACHINES {
            let m = find(e.id);
            let refusal = |platforms| m.offboard_refusal(platforms);
            let expected = match e.offboard {
                ExampleOffboard::PlatformNotSupported => {
                    Some(Refusal::PlatformNotSupported(e.os_platform.into()))
                }
                ExampleOffboard::NotOnboarded => {
                    Some(Refusal::NotOnboarded("CanBeOnboarded".into()))
                }
                _ => None,
            };
            assert_eq!(refusal(OffboardPlatforms::All), expected, "{}", e.id);
            let outcome = match e.offboard {
                ExampleOffboard::Fails => Outcome::Failed,
                ExampleOffboard::TimesOut => Outcome::TimeOut,
                _ => Outcome::Succeeded,
            };
            assert_eq!(m.offboard_outcome, outcome, "{}", e.id);
            assert_eq!(
                m.vm_metadata.as_ref().map(|vm| vm.vm_id.as_str()),
                e.vm.map(|vm| vm.vm_id)
            );
        }
        let kiosk = find("4e5f60718293a4b5c6d7e8f9012345678ab1c2d3");
        assert_eq!(kiosk.health_status.as_deref(), Some("Inactive"));
        let seen: jiff::Timestamp = kiosk.last_seen.parse().unwrap();
        assert_eq!(
            now.duration_since(seen),
            jiff::SignedDuration::from_hours(42 * 24)
        );
        let first: jiff::Timestamp = kiosk.first_seen.parse().unwrap();
        assert!(first <= seen);
        let discovered = find("fed15c0000000000000000000000000000000009");
        assert_eq!(
            (
                discovered.onboarding_status.as_str(),
                discovered.health_status.as_deref()
            ),
            ("CanBeOnboarded", None)
        );
    }

    #[test]
    fn platforms_decide_only_under_windows_only() {
        let machines = plain(200, 2, UNSUCCESSFUL, jiff::Timestamp::UNIX_EPOCH);
        let refused = |platforms| {
            machines
                .iter()
                .filter(|m| m.onboarding_status == "Onboarded")
                .filter(|m| m.offboard_refusal(platforms).is_some())
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(refused(OffboardPlatforms::All), [EXAMPLE_MACHINES[3].id]);
        let windows_only = refused(OffboardPlatforms::WindowsOnly);
        assert!(windows_only.len() > 3, "{windows_only:?}");
        for id in windows_only {
            let m = machines.iter().find(|m| m.id == id).unwrap();
            assert!(["Linux", "macOS"].contains(&m.os_platform.as_str()), "{id}");
        }
    }

    #[test]
    fn a_real_tenant_adds_a_stale_twin_per_example_name_and_a_discovered_one_per_generated() {
        let now = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let plain_len = plain(40, 5, UNSUCCESSFUL, now).len();
        let all = inventory(40, 5, UNSUCCESSFUL, true, now);
        let twins = &all[plain_len..];
        let names = |ms: &[Machine]| {
            let mut n: Vec<_> = ms.iter().map(|m| m.computer_dns_name.clone()).collect();
            n.sort_unstable();
            n.dedup();
            n
        };
        assert_eq!(twins.len(), names(&all[..plain_len]).len());
        assert_eq!(
            inventory(40, 5, UNSUCCESSFUL, true, now)[plain_len..][0].id,
            twins[0].id
        );
        for twin in twins {
            let example = EXAMPLE_MACHINES
                .iter()
                .any(|e| e.computer_dns_name == twin.computer_dns_name);
            if example {
                assert_eq!(twin.health_status.as_deref(), Some("Inactive"));
                assert_eq!(twin.onboarding_status, "Onboarded");
                assert_eq!(twin.offboard_outcome, Outcome::TimeOut);
                let seen: jiff::Timestamp = twin.last_seen.parse().unwrap();
                let days = now.duration_since(seen).as_hours() / 24;
                assert!((30..=170).contains(&days), "{days}");
            } else {
                assert_eq!(twin.onboarding_status, "CanBeOnboarded");
                assert_eq!(twin.health_status, None);
            }
        }
        let node = twins
            .iter()
            .find(|t| t.computer_dns_name == "win-node-1")
            .unwrap();
        let vm = node.vm_metadata.as_ref().unwrap();
        assert_ne!(vm.vm_id, EXAMPLE_MACHINES[7].vm.unwrap().vm_id);
        assert!(
            vm.resource_id
                .contains("/virtualMachineScaleSets/akswin/virtualMachines/1"),
            "{vm:?}"
        );
    }
}
