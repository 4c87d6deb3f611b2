//! The resolution rule as a table: records in, the chosen record (or why
//! none) out.

use super::*;
use serde_json::json;

const NOW: &str = "2026-12-07T12:00:00Z";
const SUB: &str =
    "/subscriptions/0000-sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

/// `days` (fractions allowed) before [`NOW`], as MDE writes `lastSeen`.
fn seen(days: f64) -> String {
    let secs = (days * 86_400.0) as i64;
    now().checked_sub(secs.seconds()).unwrap().to_string()
}

#[derive(Clone, Copy)]
struct Rec {
    id: &'static str,
    name: &'static str,
    onboarding: Option<&'static str>,
    health: Option<&'static str>,
    seen_days_ago: Option<f64>,
    vm: Option<&'static str>,
}

const fn rec(id: &'static str, name: &'static str) -> Rec {
    Rec {
        id,
        name,
        onboarding: Some("Onboarded"),
        health: Some("Active"),
        seen_days_ago: Some(0.01),
        vm: None,
    }
}

impl Rec {
    const fn stale(self, days: f64) -> Self {
        Rec {
            health: Some("Inactive"),
            seen_days_ago: Some(days),
            ..self
        }
    }
    const fn discovered(self) -> Self {
        Rec {
            onboarding: Some("CanBeOnboarded"),
            ..self
        }
    }
    const fn seen(self, days: f64) -> Self {
        Rec {
            seen_days_ago: Some(days),
            ..self
        }
    }
    const fn on_vm(self, vm: &'static str) -> Self {
        Rec {
            vm: Some(vm),
            ..self
        }
    }
    const fn nulls(self) -> Self {
        Rec {
            onboarding: None,
            health: None,
            seen_days_ago: None,
            ..self
        }
    }

    fn machine(self) -> Machine {
        let vm = self.vm.map(|vm| {
            json!({
                "resourceId": format!("{SUB}/{vm}"),
                "subscriptionId": "0000-sub",
                "cloudProvider": "Azure",
            })
        });
        serde_json::from_value(json!({
            "id": self.id,
            "computerDnsName": self.name,
            "onboardingStatus": self.onboarding,
            "healthStatus": self.health,
            "lastSeen": self.seen_days_ago.map(seen),
            "osPlatform": "Linux",
            "vmMetadata": vm,
        }))
        .unwrap()
    }
}

fn node(vm: &str) -> NodeIdentity {
    NodeIdentity {
        name: "aks-pool-000001".into(),
        uid: "uid-1".into(),
        provider_id: Some(format!("azure://{SUB}/{vm}")),
        system_uuid: None,
    }
}

#[derive(Debug, PartialEq)]
enum Want {
    Chosen(&'static str),
    NotFound,
    Ambiguous,
    Unverified,
}

fn outcome(resolved: &Resolved) -> Want {
    match resolved {
        Resolved::Chosen { machine_id, .. } => Want::Chosen(match machine_id.as_str() {
            "a" => "a",
            "b" => "b",
            "c" => "c",
            other => panic!("unexpected id {other}"),
        }),
        Resolved::NotFound { .. } => Want::NotFound,
        Resolved::Ambiguous { .. } => Want::Ambiguous,
        Resolved::IdentityUnverified { .. } => Want::Unverified,
    }
}

struct Row {
    case: &'static str,
    name: &'static str,
    records: Vec<Rec>,
    node: Option<NodeIdentity>,
    mode: NodeIdentityMode,
    want: Want,
}

fn by_name(case: &'static str, name: &'static str, records: Vec<Rec>, want: Want) -> Row {
    Row {
        case,
        name,
        records,
        node: None,
        mode: NodeIdentityMode::Required,
        want,
    }
}

#[test]
fn resolution_rule_table() {
    use Want::*;
    let rows = vec![
        by_name("no record", "pc-1", vec![], NotFound),
        by_name(
            "one live record",
            "pc-1",
            vec![rec("a", "pc-1")],
            Chosen("a"),
        ),
        by_name(
            "one stale record is still the device (offline devices are offboarded too)",
            "pc-1",
            vec![rec("a", "pc-1").stale(60.0)],
            Chosen("a"),
        ),
        by_name(
            "a short name matches the FQDN",
            "pc-1",
            vec![rec("a", "PC-1.corp.contoso.com")],
            Chosen("a"),
        ),
        by_name(
            "a short name does not match a longer host name",
            "pc-1",
            vec![rec("a", "pc-10.corp.contoso.com"), rec("b", "pc-1x")],
            NotFound,
        ),
        by_name(
            "an FQDN does not match another domain",
            "pc-1.contoso.com",
            vec![rec("a", "pc-1.fabrikam.com")],
            NotFound,
        ),
        by_name(
            "a re-imaged device: the live record, the stale one skipped",
            "pc-1",
            vec![rec("a", "pc-1").stale(42.0), rec("b", "pc-1")],
            Chosen("b"),
        ),
        by_name(
            "a discovered twin is skipped",
            "pc-1",
            vec![rec("a", "pc-1").discovered(), rec("b", "pc-1")],
            Chosen("b"),
        ),
        by_name(
            "stale, discovered and live: the live one",
            "pc-1",
            vec![
                rec("a", "pc-1").stale(90.0),
                rec("b", "pc-1").discovered(),
                rec("c", "pc-1.corp.contoso.com"),
            ],
            Chosen("c"),
        ),
        by_name(
            "only discovered records: nothing to offboard",
            "pc-1",
            vec![rec("a", "pc-1").discovered()],
            NotFound,
        ),
        by_name(
            "two live records: ambiguous",
            "pc-1",
            vec![rec("a", "pc-1"), rec("b", "pc-1").seen(2.0)],
            Ambiguous,
        ),
        by_name(
            "two stale records: ambiguous (no live one to prefer)",
            "pc-1",
            vec![rec("a", "pc-1").stale(30.0), rec("b", "pc-1").stale(60.0)],
            Ambiguous,
        ),
        by_name(
            "a record not Inactive but seen 8 days ago is stale",
            "pc-1",
            vec![rec("a", "pc-1").seen(8.0), rec("b", "pc-1")],
            Chosen("b"),
        ),
        by_name(
            "a record seen 6 days ago is not clearly stale: ambiguous",
            "pc-1",
            vec![rec("a", "pc-1").seen(6.0), rec("b", "pc-1")],
            Ambiguous,
        ),
        by_name(
            "records with unknown fields (nulls) prove nothing: ambiguous",
            "pc-1",
            vec![rec("a", "pc-1").nulls(), rec("b", "pc-1")],
            Ambiguous,
        ),
        by_name(
            "a lone record with nulls is chosen",
            "pc-1",
            vec![rec("a", "pc-1").nulls()],
            Chosen("a"),
        ),
        Row {
            case: "Node: the record on the Node's VM, among three sharing the name",
            name: "aks-pool-000001",
            records: vec![
                rec("a", "aks-pool-000001").stale(20.0).on_vm("vm-old"),
                rec("b", "aks-pool-000001").discovered(),
                rec("c", "aks-pool-000001").on_vm("vm-1"),
            ],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Required,
            want: Chosen("c"),
        },
        Row {
            case: "Node: the identity decides even between two live records",
            name: "aks-pool-000001",
            records: vec![
                rec("a", "aks-pool-000001").on_vm("vm-2"),
                rec("b", "aks-pool-000001").on_vm("vm-1"),
            ],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Required,
            want: Chosen("b"),
        },
        Row {
            case: "Node: a live record of another VM is never chosen, whatever the mode",
            name: "aks-pool-000001",
            records: vec![rec("a", "aks-pool-000001").on_vm("vm-9")],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Name,
            want: NotFound,
        },
        Row {
            case: "Node named after a workstation (no VM identity): required sends nothing",
            name: "finance-laptop-07",
            records: vec![rec("a", "finance-laptop-07.contoso.com")],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Required,
            want: Unverified,
        },
        Row {
            case: "the same under preferred: by name",
            name: "finance-laptop-07",
            records: vec![rec("a", "finance-laptop-07.contoso.com")],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Preferred,
            want: Chosen("a"),
        },
        Row {
            case: "preferred: a matching record wins over one without identity",
            name: "aks-pool-000001",
            records: vec![
                rec("a", "aks-pool-000001"),
                rec("b", "aks-pool-000001").on_vm("vm-1"),
            ],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Preferred,
            want: Chosen("b"),
        },
        Row {
            case: "a Node without cloud identity under required: nothing sent",
            name: "onprem-1",
            records: vec![rec("a", "onprem-1")],
            node: Some(NodeIdentity {
                provider_id: Some("kind://docker/kind/onprem-1".into()),
                ..node("x")
            }),
            mode: NodeIdentityMode::Required,
            want: Unverified,
        },
        Row {
            case: "a Node without cloud identity under name: by name",
            name: "onprem-1",
            records: vec![rec("a", "onprem-1")],
            node: Some(NodeIdentity {
                provider_id: None,
                ..node("x")
            }),
            mode: NodeIdentityMode::Name,
            want: Chosen("a"),
        },
        Row {
            case: "a discovered record on the Node's VM is still never onboarded",
            name: "aks-pool-000001",
            records: vec![rec("a", "aks-pool-000001").discovered().on_vm("vm-1")],
            node: Some(node("vm-1")),
            mode: NodeIdentityMode::Required,
            want: Unverified,
        },
    ];
    for row in rows {
        let machines: Vec<Machine> = row.records.iter().map(|r| r.machine()).collect();
        let resolved = resolve(row.name, &machines, row.node.as_ref(), row.mode, now());
        assert_eq!(outcome(&resolved), row.want, "{}: {resolved:?}", row.case);
    }
}

#[test]
fn the_outcome_does_not_depend_on_the_order_of_the_records() {
    let records = [
        rec("a", "pc-1").stale(90.0),
        rec("b", "pc-1").discovered(),
        rec("c", "pc-1.corp.contoso.com"),
    ];
    let mut machines: Vec<Machine> = records.iter().map(|r| r.machine()).collect();
    let first = resolve("pc-1", &machines, None, NodeIdentityMode::Required, now());
    machines.reverse();
    let reversed = resolve("pc-1", &machines, None, NodeIdentityMode::Required, now());
    assert_eq!(outcome(&first), outcome(&reversed));
}

#[test]
fn the_chosen_record_and_every_skipped_one_are_named_with_why() {
    let machines: Vec<Machine> = [
        rec("a", "pc-1").stale(42.0),
        rec("b", "pc-1").discovered(),
        rec("c", "pc-1").seen(2.0 / 1440.0),
    ]
    .iter()
    .map(|r| r.machine())
    .collect();
    let Resolved::Chosen { machine_id, why } =
        resolve("pc-1", &machines, None, NodeIdentityMode::Required, now())
    else {
        panic!("not chosen")
    };
    assert_eq!(machine_id, "c");
    assert_eq!(
        why,
        "3 records share the name \"pc-1\"; chose c (Active, seen 2 min ago, Linux); skipped \
         b (never onboarded: CanBeOnboarded), a (Inactive, seen 42 days ago, Linux)"
    );
}

#[test]
fn an_ambiguous_name_lists_every_candidate_with_id_status_health_and_last_seen() {
    let machines: Vec<Machine> = [rec("a", "pc-1"), rec("b", "pc-1").seen(3.0)]
        .iter()
        .map(|r| r.machine())
        .collect();
    let Resolved::Ambiguous { message } =
        resolve("pc-1", &machines, None, NodeIdentityMode::Required, now())
    else {
        panic!("not ambiguous")
    };
    assert!(
        message.contains("a (Onboarded, Active, seen 14 min ago, Linux)"),
        "{message}"
    );
    assert!(
        message.contains("b (Onboarded, Active, seen 3 days ago, Linux)"),
        "{message}"
    );
    assert!(message.contains("spec.machineId"), "{message}");
}

#[test]
fn a_system_uuid_matches_the_vm_id_in_either_byte_order() {
    let uuid = "12345678-abcd-ef01-2345-6789abcdef01";
    let swapped = "78563412-cdab-01ef-2345-6789abcdef01";
    assert_eq!(swap_uuid(uuid), swapped);
    for vm_id in [uuid, swapped, &uuid.to_ascii_uppercase()] {
        let machine: Machine = serde_json::from_value(json!({
            "id": "a", "computerDnsName": "n1", "onboardingStatus": "Onboarded",
            "healthStatus": "Active", "lastSeen": seen(0.0),
            "vmMetadata": {"vmId": vm_id},
        }))
        .unwrap();
        let node = NodeIdentity {
            name: "n1".into(),
            uid: "u".into(),
            provider_id: None,
            system_uuid: Some(uuid.into()),
        };
        let resolved = resolve(
            "n1",
            &[machine],
            Some(&node),
            NodeIdentityMode::Required,
            now(),
        );
        assert_eq!(outcome(&resolved), Want::Chosen("a"), "{vm_id}");
    }
    assert!(!is_uuid("not-a-uuid"));
}

#[test]
fn node_identity_mode_parses_its_three_words_and_names_them_otherwise() {
    assert_eq!("required".parse(), Ok(NodeIdentityMode::Required));
    assert_eq!("preferred".parse(), Ok(NodeIdentityMode::Preferred));
    assert_eq!("name".parse(), Ok(NodeIdentityMode::Name));
    let error = "Required".parse::<NodeIdentityMode>().unwrap_err();
    assert!(error.contains("required, preferred or name"), "{error}");
}
