//! The simulated device inventory: fixed example machines plus deterministic,
//! seed-generated ones.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::actions::Outcome;

/// What an offboard of an example machine does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExampleOffboard {
    /// The action ends `Succeeded`.
    Succeeds,
    /// The action ends `Failed`.
    Fails,
    /// The call is refused with `400 OsPlatformNotSupported`.
    PlatformNotSupported,
}

/// A machine always present in the simulator, for manifests under `examples/`.
#[derive(Clone, Copy, Debug)]
pub struct ExampleMachine {
    pub id: &'static str,
    pub computer_dns_name: &'static str,
    pub os_platform: &'static str,
    pub offboard: ExampleOffboard,
}

/// Seeded into every simulator whatever `--machines` and `--seed` say.
/// The two `kiosk-lobby-01` entries share a name: a re-imaged device.
pub const EXAMPLE_MACHINES: &[ExampleMachine] = &[
    ExampleMachine {
        id: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
        computer_dns_name: "finance-laptop-07.contoso.com",
        os_platform: "Windows11",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "1b2c3d4e5f60718293a4b5c6d7e8f9012345678a",
        computer_dns_name: "hr-desktop-12.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "2c3d4e5f60718293a4b5c6d7e8f9012345678ab1",
        computer_dns_name: "ws2019-file-01.contoso.com",
        os_platform: "WindowsServer2019",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "3d4e5f60718293a4b5c6d7e8f9012345678ab1c2",
        computer_dns_name: "build-agent-03.contoso.com",
        os_platform: "Linux",
        offboard: ExampleOffboard::PlatformNotSupported,
    },
    ExampleMachine {
        id: "4e5f60718293a4b5c6d7e8f9012345678ab1c2d3",
        computer_dns_name: "kiosk-lobby-01.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "5f60718293a4b5c6d7e8f9012345678ab1c2d3e4",
        computer_dns_name: "kiosk-lobby-01.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "60718293a4b5c6d7e8f9012345678ab1c2d3e4f5",
        computer_dns_name: "lab-pc-09.contoso.com",
        os_platform: "Windows10",
        offboard: ExampleOffboard::Fails,
    },
    // The Windows Nodes of the `dev` playground (node offboarding derives the
    // device name from the node name).
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000001",
        computer_dns_name: "win-node-1",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000002",
        computer_dns_name: "win-node-2",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
    },
    ExampleMachine {
        id: "7a11e0de00000000000000000000000000000003",
        computer_dns_name: "win-node-3",
        os_platform: "WindowsServer2022",
        offboard: ExampleOffboard::Succeeds,
    },
];

/// Platforms the offboard API refuses with `OsPlatformNotSupported` (older MDE
/// documentation: offboarding through the API is Windows-only).
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
    pub agent_version: String,
    pub health_status: String,
    pub onboarding_status: String,
    pub device_value: String,
    pub rbac_group_id: u32,
    pub rbac_group_name: String,
    pub risk_score: String,
    pub exposure_level: String,
    pub is_aad_joined: bool,
    pub aad_device_id: Option<String>,
    pub machine_tags: Vec<String>,
    /// How an offboard action for this machine ends (not part of the API).
    #[serde(skip)]
    pub offboard_outcome: Outcome,
}

impl Machine {
    pub fn offboard_supported(&self) -> bool {
        !UNSUPPORTED_OFFBOARD_PLATFORMS.contains(&self.os_platform.as_str())
    }
}

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
        agent_version: info.agent.to_owned(),
        health_status: "Active".to_owned(),
        onboarding_status: "Onboarded".to_owned(),
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
        offboard_outcome: outcome,
    }
}

/// The inventory: the example machines first, then `count` generated ones.
/// Everything but the timestamps (relative to `now`) depends only on `seed`.
pub fn inventory(
    count: usize,
    seed: u64,
    unsuccessful_share: f64,
    now: jiff::Timestamp,
) -> Vec<Machine> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut machines: Vec<Machine> = EXAMPLE_MACHINES
        .iter()
        .map(|e| {
            let outcome = match e.offboard {
                ExampleOffboard::Fails => Outcome::Failed,
                _ => Outcome::Succeeded,
            };
            build(
                &mut rng,
                now,
                e.id.to_owned(),
                e.computer_dns_name.to_owned(),
                e.os_platform,
                outcome,
            )
        })
        .collect();
    mark_reimaged(&mut machines[4]);

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
    machines
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
    machine.health_status = if now.duration_since(at) > INACTIVE_AFTER {
        "Inactive"
    } else {
        "Active"
    }
    .to_owned();
}

/// The older half of a re-imaged pair stopped reporting weeks ago.
fn mark_reimaged(old: &mut Machine) {
    old.health_status = "Inactive".to_owned();
    if let Ok(first) = old.first_seen.parse::<jiff::Timestamp>() {
        let last = first + jiff::SignedDuration::from_hours(24 * 7);
        old.last_seen = timestamp(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNSUCCESSFUL: f64 = crate::config::DEFAULT_UNSUCCESSFUL_SHARE;

    /// The share is honoured (none at 0, all at 1, about 7% by default), and
    /// changing it leaves the rest of the inventory alone.
    #[test]
    fn the_unsuccessful_share_decides_outcomes_only() {
        let now = jiff::Timestamp::UNIX_EPOCH;
        let unsuccessful = |share| {
            inventory(2000, 3, share, now)[EXAMPLE_MACHINES.len()..]
                .iter()
                .filter(|m| m.offboard_outcome != Outcome::Succeeded)
                .count()
        };
        assert_eq!(unsuccessful(0.0), 0);
        assert_eq!(unsuccessful(1.0), 2000);
        assert!((80..200).contains(&unsuccessful(UNSUCCESSFUL)));
        let ids = |share| {
            inventory(50, 3, share, now)
                .into_iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0.0), ids(0.5));
    }

    #[test]
    fn inventory_is_deterministic_and_complete() {
        let now = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let a = inventory(60, 7, UNSUCCESSFUL, now);
        let b = inventory(60, 7, UNSUCCESSFUL, now);
        assert_eq!(a.len(), 60 + EXAMPLE_MACHINES.len());
        let ids = |m: &[Machine]| m.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&inventory(60, 8, UNSUCCESSFUL, now)));
        for m in &a {
            assert_eq!(m.id.len(), 40);
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

    #[test]
    fn example_machines_keep_their_documented_behaviour() {
        let machines = inventory(0, 1, UNSUCCESSFUL, jiff::Timestamp::UNIX_EPOCH);
        let find = |id: &str| machines.iter().find(|m| m.id == id).unwrap();
        assert!(!find(EXAMPLE_MACHINES[3].id).offboard_supported());
        assert_eq!(
            find(EXAMPLE_MACHINES[6].id).offboard_outcome,
            Outcome::Failed
        );
        assert_eq!(
            find(EXAMPLE_MACHINES[0].id).offboard_outcome,
            Outcome::Succeeded
        );
    }
}
