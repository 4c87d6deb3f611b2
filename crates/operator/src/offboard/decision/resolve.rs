//! Which MDE record a `deviceName` (or a deleted Node) stands for.
//!
//! A real tenant lists several records under one name: MDE keeps offboarded
//! and inactive records for 180 days (a re-imaged PC, a re-created VM), and
//! lists devices found by device discovery but never onboarded beside
//! onboarded ones. The rule (docs/operations.md, "How a device name is
//! resolved"), in order:
//!
//! 1. **Candidates:** records whose `computerDnsName` is the name
//!    (case-insensitive); a name without a dot also matches `name.<domain>`,
//!    since MDE holds the fully qualified name.
//! 2. **Never onboarded** records (`onboardingStatus` other than `Onboarded`)
//!    are skipped: there is nothing to offboard.
//! 3. **A Node's cloud identity** (when the resource was made for a Node and
//!    `--node-identity` is not `name`): a record whose `vmMetadata` names
//!    another VM is skipped, always. Records whose `vmMetadata` matches the
//!    Node are the only candidates when there are any; with none, `required`
//!    sends nothing and `preferred` falls back to records without
//!    `vmMetadata`.
//! 4. **One live record:** one candidate left is chosen. Of several, the
//!    only *live* one (not `Inactive`, seen within [`LIVE_WITHIN`]) is chosen
//!    when every other is *stale* (`Inactive`, or not seen for
//!    [`LIVE_WITHIN`]): MDE marks a device `Inactive` after 7 days without
//!    reports, so a week between the two is the margin. Anything else is
//!    ambiguous, and every candidate is listed.
//!
//! The outcome depends on the records alone (and `now`), never on a cache.

use crate::crd::NodeIdentity;
use jiff::{Timestamp, ToSpan};
use mde_client::Machine;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

/// A record seen this recently (and not `Inactive`) is live; one not seen
/// for this long is stale. MDE turns a device `Inactive` after 7 days.
pub const LIVE_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a deleted Node's device is told apart (`--node-identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeIdentityMode {
    /// Only a record whose `vmMetadata` matches the Node is offboarded.
    #[default]
    Required,
    /// A matching record first; records without `vmMetadata` by name.
    Preferred,
    /// By name alone (identity is still checked: a record naming another VM
    /// is never chosen).
    Name,
}

impl FromStr for NodeIdentityMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "required" => Ok(Self::Required),
            "preferred" => Ok(Self::Preferred),
            "name" => Ok(Self::Name),
            other => Err(format!(
                "--node-identity {other:?}: use required, preferred or name"
            )),
        }
    }
}

/// The outcome of resolving a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// This record; `why` says which records matched and why the others
    /// were skipped (written to `status.resolution` and the Event).
    Chosen { machine_id: String, why: String },
    /// No onboarded record has the name.
    NotFound { message: String },
    /// Several records could be the device: every candidate is listed.
    Ambiguous { message: String },
    /// A Node's device cannot be told by its cloud identity, and
    /// `--node-identity required` allows no other way.
    IdentityUnverified { message: String },
}

/// Why a record was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    NeverOnboarded,
    OtherVm,
    NoVmIdentity,
    Stale,
}

/// What a record's `vmMetadata` says about the Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmMatch {
    Same,
    Other,
    Unknown,
}

/// The record for `name` (see the module's rule).
pub fn resolve(
    name: &str,
    records: &[Machine],
    node: Option<&NodeIdentity>,
    mode: NodeIdentityMode,
    now: Timestamp,
) -> Resolved {
    let named: Vec<&Machine> = records.iter().filter(|m| has_name(m, name)).collect();
    let mut skipped: Vec<(&Machine, Skip)> = Vec::new();
    let mut candidates: Vec<&Machine> = Vec::new();
    for machine in &named {
        if never_onboarded(machine) {
            skipped.push((machine, Skip::NeverOnboarded));
        } else {
            candidates.push(machine);
        }
    }
    if let Some(node) = node {
        let keys = NodeKeys::of(node);
        let (same, rest): (Vec<&Machine>, Vec<&Machine>) = candidates
            .into_iter()
            .partition(|m| keys.compare(m) == VmMatch::Same);
        let (other, unknown): (Vec<&Machine>, Vec<&Machine>) = rest
            .into_iter()
            .partition(|m| keys.compare(m) == VmMatch::Other);
        skipped.extend(other.iter().map(|m| (*m, Skip::OtherVm)));
        candidates = if !same.is_empty() {
            skipped.extend(unknown.iter().map(|m| (*m, Skip::NoVmIdentity)));
            same
        } else if mode == NodeIdentityMode::Required {
            return Resolved::IdentityUnverified {
                message: identity_unverified(name, node, &keys, &named, now),
            };
        } else {
            unknown
        };
    }
    let chosen = match candidates.as_slice() {
        [] if named.is_empty() => {
            return Resolved::NotFound {
                message: format!(
                    "no MDE machine has computerDnsName {name:?}{}; check the name (as shown in the Defender portal) or use spec.machineId",
                    if name.contains('.') {
                        String::new()
                    } else {
                        format!(" or {name}.<domain>")
                    }
                ),
            };
        }
        [] => {
            return Resolved::NotFound {
                message: format!(
                    "no onboarded MDE machine has computerDnsName {name:?}: {}; nothing to offboard",
                    listing(&skipped, now)
                ),
            };
        }
        [one] => *one,
        several => {
            let live: Vec<&Machine> = several
                .iter()
                .copied()
                .filter(|m| is_live(m, now))
                .collect();
            match live.as_slice() {
                [one] if several.iter().all(|m| m.id == one.id || is_stale(m, now)) => {
                    skipped.extend(
                        several
                            .iter()
                            .filter(|m| m.id != one.id)
                            .map(|m| (*m, Skip::Stale)),
                    );
                    *one
                }
                _ => {
                    return Resolved::Ambiguous {
                        message: ambiguous(name, several, &skipped, now),
                    };
                }
            }
        }
    };
    Resolved::Chosen {
        machine_id: chosen.id.clone(),
        why: chosen_why(name, named.len(), chosen, &skipped, now),
    }
}

/// Whether `machine` carries `name`, or `name.<domain>` for a dotless name.
fn has_name(machine: &Machine, name: &str) -> bool {
    let Some(dns) = machine.computer_dns_name.as_deref() else {
        return false;
    };
    let (dns, name) = (dns.to_ascii_lowercase(), name.to_ascii_lowercase());
    dns == name
        || (!name.contains('.')
            && dns
                .strip_prefix(&name)
                .is_some_and(|rest| rest.starts_with('.')))
}

/// Listed by device discovery, never onboarded (`CanBeOnboarded`,
/// `Unsupported`, `InsufficientInfo`). An unknown status (`null`) is not
/// proof of that: such a record stays a candidate.
fn never_onboarded(machine: &Machine) -> bool {
    machine
        .onboarding_status
        .as_deref()
        .is_some_and(|s| !s.eq_ignore_ascii_case("Onboarded"))
}

fn last_seen(machine: &Machine) -> Option<Timestamp> {
    machine.last_seen.as_deref().and_then(|t| t.parse().ok())
}

fn inactive(machine: &Machine) -> bool {
    machine
        .health_status
        .as_deref()
        .is_some_and(|h| h.eq_ignore_ascii_case("Inactive"))
}

fn live_since(now: Timestamp) -> Timestamp {
    let within = i64::try_from(LIVE_WITHIN.as_secs()).unwrap_or(i64::MAX);
    now.checked_sub(within.seconds()).unwrap_or(Timestamp::MIN)
}

/// Not `Inactive`, and seen within [`LIVE_WITHIN`].
fn is_live(machine: &Machine, now: Timestamp) -> bool {
    !inactive(machine) && last_seen(machine).is_some_and(|seen| seen >= live_since(now))
}

/// `Inactive`, or not seen for [`LIVE_WITHIN`]. A record never seen at all
/// (`lastSeen` null) is neither live nor clearly stale.
fn is_stale(machine: &Machine, now: Timestamp) -> bool {
    inactive(machine) || last_seen(machine).is_some_and(|seen| seen < live_since(now))
}

/// A Node's cloud identity, in the forms MDE's `vmMetadata` carries.
struct NodeKeys {
    /// Azure: `spec.providerID` without `azure://`, lowercase.
    resource_id: Option<String>,
    /// `status.nodeInfo.systemUUID`, lowercase, and its byte-swapped form
    /// (SMBIOS stores the first three groups little-endian; some Azure VM
    /// generations report one form, IMDS's `vmId` the other).
    vm_ids: Vec<String>,
}

impl NodeKeys {
    fn of(node: &NodeIdentity) -> Self {
        let resource_id = node
            .provider_id
            .as_deref()
            .and_then(|p| p.strip_prefix("azure://"))
            .map(|id| id.trim_end_matches('/').to_ascii_lowercase())
            .filter(|id| id.starts_with("/subscriptions/"));
        let vm_ids = node
            .system_uuid
            .as_deref()
            .map(str::to_ascii_lowercase)
            .filter(|u| is_uuid(u))
            .map(|u| {
                let swapped = swap_uuid(&u);
                if swapped == u {
                    vec![u]
                } else {
                    vec![u, swapped]
                }
            })
            .unwrap_or_default();
        NodeKeys {
            resource_id,
            vm_ids,
        }
    }

    fn is_empty(&self) -> bool {
        self.resource_id.is_none() && self.vm_ids.is_empty()
    }

    /// Same when a field both sides have agrees; other when one disagrees
    /// and none agrees; unknown when the record carries nothing comparable.
    fn compare(&self, machine: &Machine) -> VmMatch {
        let Some(vm) = &machine.vm_metadata else {
            return VmMatch::Unknown;
        };
        let mut compared = false;
        if let (Some(mine), Some(theirs)) = (&self.resource_id, vm.resource_id.as_deref()) {
            if theirs.trim_end_matches('/').eq_ignore_ascii_case(mine) {
                return VmMatch::Same;
            }
            compared = true;
        }
        if let Some(theirs) = vm.vm_id.as_deref()
            && !self.vm_ids.is_empty()
        {
            if self.vm_ids.iter().any(|id| theirs.eq_ignore_ascii_case(id)) {
                return VmMatch::Same;
            }
            compared = true;
        }
        // Nothing comparable (the Node carries no identity, or the record
        // names neither field): it may be any VM.
        if compared {
            VmMatch::Other
        } else {
            VmMatch::Unknown
        }
    }
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The UUID with its first three groups byte-swapped (`is_uuid` holds).
fn swap_uuid(uuid: &str) -> String {
    let groups: Vec<&str> = uuid.split('-').collect();
    let swap = |g: &str| -> String {
        let bytes: Vec<&str> = (0..g.len()).step_by(2).map(|i| &g[i..i + 2]).collect();
        bytes.into_iter().rev().collect()
    };
    format!(
        "{}-{}-{}-{}-{}",
        swap(groups[0]),
        swap(groups[1]),
        swap(groups[2]),
        groups[3],
        groups[4]
    )
}

/// "Active, seen 2 min ago".
pub(crate) fn describe(machine: &Machine, now: Timestamp) -> String {
    let health = machine.health_status.as_deref().unwrap_or("health unknown");
    let seen = match last_seen(machine) {
        Some(seen) => format!("seen {}", ago(seen, now)),
        None => "never seen".to_string(),
    };
    let platform = machine.os_platform.as_deref().unwrap_or("unknown platform");
    format!("{health}, {seen}, {platform}")
}

fn ago(then: Timestamp, now: Timestamp) -> String {
    let secs = now.duration_since(then).as_secs().max(0);
    match secs {
        0..60 => format!("{secs} s ago"),
        60..7200 => format!("{} min ago", secs / 60),
        7200..172_800 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn skip_reason(machine: &Machine, skip: Skip, now: Timestamp) -> String {
    match skip {
        Skip::NeverOnboarded => format!(
            "never onboarded: {}",
            machine.onboarding_status.as_deref().unwrap_or("unknown")
        ),
        Skip::OtherVm => format!(
            "{}; its VM identity is another VM's",
            describe(machine, now)
        ),
        Skip::NoVmIdentity => format!("{}; no VM identity recorded", describe(machine, now)),
        Skip::Stale => describe(machine, now),
    }
}

fn listing(skipped: &[(&Machine, Skip)], now: Timestamp) -> String {
    skipped
        .iter()
        .map(|(m, skip)| format!("{} ({})", m.id, skip_reason(m, *skip, now)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn chosen_why(
    name: &str,
    matched: usize,
    chosen: &Machine,
    skipped: &[(&Machine, Skip)],
    now: Timestamp,
) -> String {
    let mut why = if matched == 1 {
        format!("1 record has the name {name:?}; chose {}", chosen.id)
    } else {
        format!(
            "{matched} records share the name {name:?}; chose {}",
            chosen.id
        )
    };
    let _ = write!(why, " ({})", describe(chosen, now));
    if !skipped.is_empty() {
        let _ = write!(why, "; skipped {}", listing(skipped, now));
    }
    why
}

fn ambiguous(
    name: &str,
    candidates: &[&Machine],
    skipped: &[(&Machine, Skip)],
    now: Timestamp,
) -> String {
    let listed: Vec<String> = candidates
        .iter()
        .map(|m| {
            format!(
                "{} ({}, {})",
                m.id,
                m.onboarding_status
                    .as_deref()
                    .unwrap_or("onboarding unknown"),
                describe(m, now)
            )
        })
        .collect();
    let mut message = format!(
        "{} MDE machines named {name:?} could be the device, and not exactly one of them is live (seen within 7 days, not Inactive) beside stale ones: {}",
        candidates.len(),
        listed.join(", ")
    );
    if !skipped.is_empty() {
        let _ = write!(message, "; skipped {}", listing(skipped, now));
    }
    message.push_str("; create the DeviceOffboard with spec.machineId set to the one to offboard");
    message
}

fn identity_unverified(
    name: &str,
    node: &NodeIdentity,
    keys: &NodeKeys,
    named: &[&Machine],
    now: Timestamp,
) -> String {
    let records = if named.is_empty() {
        format!("no MDE machine has the name {name:?}")
    } else {
        let listed: Vec<String> = named
            .iter()
            .map(|m| {
                let identity = match &m.vm_metadata {
                    Some(vm) => match (&vm.resource_id, &vm.vm_id) {
                        (Some(r), _) => format!("VM {r}"),
                        (None, Some(v)) => format!("VM id {v}"),
                        (None, None) => "no VM identity".to_string(),
                    },
                    None => "no VM identity".to_string(),
                };
                format!("{} ({}; {identity})", m.id, describe(m, now))
            })
            .collect();
        format!("records named {name:?}: {}", listed.join(", "))
    };
    let node_identity = if keys.is_empty() {
        format!(
            "Node {:?} carries no cloud identity MDE records (providerID {:?}, systemUUID {:?})",
            node.name,
            node.provider_id.as_deref().unwrap_or(""),
            node.system_uuid.as_deref().unwrap_or("")
        )
    } else {
        format!(
            "no onboarded record carries Node {:?}'s VM identity (providerID {:?}, systemUUID {:?})",
            node.name,
            node.provider_id.as_deref().unwrap_or(""),
            node.system_uuid.as_deref().unwrap_or("")
        )
    };
    format!(
        "{node_identity}; {records}; nothing was sent (--node-identity required). Offboard the device by spec.machineId, or run with --node-identity preferred to allow records without VM identity"
    )
}

#[cfg(test)]
mod tests;
