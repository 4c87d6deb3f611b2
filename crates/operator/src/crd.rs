//! The `DeviceOffboard` custom resource. Its names (kind, spec and status
//! fields, printer columns) are a contract other people's scripts and
//! manifests depend on: change them only together with the docs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the resource.
pub const GROUP: &str = "defender.offboard.dev";
/// Full CRD name.
pub const CRD_NAME: &str = "deviceoffboards.defender.offboard.dev";
/// Annotating a resource with this key (the value is the reason, sent to MDE
/// as the cancel's comment) asks the operator to cancel its offboard while MDE
/// still has it `Pending`: `kubectl annotate doff NAME defender.offboard.dev/cancel="wrong device"`.
pub const CANCEL_ANNOTATION: &str = "defender.offboard.dev/cancel";
/// `true` lets a resource the blast-radius breaker holds (`BreakerOpen`,
/// `--max-offboards-per-hour`) be sent at once: `kubectl annotate doff NAME
/// defender.offboard.dev/release-breaker=true`.
pub const RELEASE_BREAKER_ANNOTATION: &str = "defender.offboard.dev/release-breaker";
/// Who created the resource (their Kubernetes username). With
/// `--require-approval` the chart's admission policy makes the creator set it
/// to their own name on create, and refuses any change to it.
pub const CREATED_BY_ANNOTATION: &str = "defender.offboard.dev/created-by";
/// Who approved the offboard (their Kubernetes username): with
/// `--require-approval` nothing is sent until it names someone other than
/// [`CREATED_BY_ANNOTATION`]; the admission policy refuses a value that is
/// not the requester's own name, or is the creator's.
pub const APPROVED_BY_ANNOTATION: &str = "defender.offboard.dev/approved-by";

/// What the safety rails (the two-person rule, the breaker's release) read
/// from a resource's annotations; the decision (`offboard::decision::safety`)
/// judges them, the cache (`cache::parked`) reads the release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SafetyMarks<'a> {
    /// `defender.offboard.dev/created-by`, if set and not blank.
    pub created_by: Option<&'a str>,
    /// `defender.offboard.dev/approved-by`, if set and not blank.
    pub approved_by: Option<&'a str>,
    /// `defender.offboard.dev/release-breaker=true`.
    pub release_breaker: bool,
}

impl<'a> SafetyMarks<'a> {
    pub fn of(annotations: Option<&'a std::collections::BTreeMap<String, String>>) -> Self {
        let get = |key: &str| {
            annotations
                .and_then(|a| a.get(key))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        SafetyMarks {
            created_by: get(CREATED_BY_ANNOTATION),
            approved_by: get(APPROVED_BY_ANNOTATION),
            release_breaker: get(RELEASE_BREAKER_ANNOTATION)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        }
    }
}

/// Longest comment accepted. MDE documents no limit; this leaves room for the
/// correlation marker the operator appends, and keeps requests small.
pub const MAX_COMMENT_LEN: usize = 900;

/// Offboard one device from Microsoft Defender for Endpoint, exactly once.
///
/// The spec is immutable: to offboard another device, create another resource.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "defender.offboard.dev",
    version = "v1alpha1",
    kind = "DeviceOffboard",
    plural = "deviceoffboards",
    namespaced,
    shortname = "doff",
    shortname = "offboard",
    category = "defender",
    status = "DeviceOffboardStatus",
    printcolumn = r#"{"name":"Machine","type":"string","jsonPath":".status.machineId"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".status.machineActionId"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.actionStatus"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("spec is immutable: delete this DeviceOffboard and create a new one to offboard another device"),
    validation = Rule::new("has(self.machineId) != has(self.deviceName)").message("exactly one of spec.machineId or spec.deviceName must be set"),
    validation = Rule::new("!has(self.node) || has(self.deviceName)").message("spec.node (written by node offboarding) goes with spec.deviceName: the device is resolved by the Node's name and identity")
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceOffboardSpec {
    /// The MDE machine id: 40 lowercase hexadecimal characters. Exactly one of
    /// `machineId` and `deviceName` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{40}$"))]
    pub machine_id: Option<String>,

    /// The device's `computerDnsName` in MDE, resolved through the machines API;
    /// must match exactly one machine. Exactly one of `machineId` and
    /// `deviceName` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    )]
    pub device_name: Option<String>,

    /// Why the device is offboarded; sent to MDE as the action's comment.
    #[schemars(length(min = 1, max = 900))]
    #[x_kube(validation = Rule::new("self.matches('\\\\S')").message("spec.comment must not be blank: say why the device is offboarded"))]
    #[x_kube(validation = Rule::new("!self.contains('[defender-offboard:')").message("spec.comment must not carry a [defender-offboard:...] marker: the operator adds its own, and one in the comment could attribute this action to another request"))]
    pub comment: String,

    /// Delete this resource this many seconds after it became final
    /// (`Succeeded` or `Failed`), with an Event first; like a Job's field of
    /// the same name. Unset keeps it forever (GitOps: leave it unset, or Argo
    /// CD / Flux re-create the pruned resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 315_360_000))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// The `DefenderConnection` (tenant and app) to offboard through: one in
    /// this resource's own namespace, never another's. Unset uses the
    /// operator's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_ref: Option<ConnectionRef>,

    /// Set by node offboarding: the deleted Node this device was. The device
    /// is then found by the Node's cloud identity (`--node-identity`), the
    /// offboard waits `--node-offboard-grace`, and nothing is sent when a
    /// Node of the same name or identity exists again by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeIdentity>,
}

/// A deleted Node, as node offboarding recorded it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeIdentity {
    /// The Node's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The Node's uid.
    #[schemars(length(min = 1, max = 128))]
    pub uid: String,
    /// The Node's `spec.providerID`, e.g. `azure:///subscriptions/.../virtualMachines/vm-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub provider_id: Option<String>,
    /// The Node's `status.nodeInfo.systemUUID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub system_uuid: Option<String>,
}

/// A `DefenderConnection` in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct ConnectionRef {
    /// The connection's name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Where a `DeviceOffboard` stands. Contract: these names are read by scripts.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum Phase {
    /// Accepted, not yet sent (also while waiting for rate budget).
    #[default]
    Pending,
    /// Intent recorded; the offboard request may be in flight.
    Submitting,
    /// The MachineAction exists and MDE reports it Pending or InProgress.
    InProgress,
    /// MDE reports the action Succeeded.
    Succeeded,
    /// The offboard failed for good (see `lastError` and the `Ready` condition).
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Submitting,
        Phase::InProgress,
        Phase::Succeeded,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Submitting => "Submitting",
            Phase::InProgress => "InProgress",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// The last error the operator met, in words a person can act on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LastError {
    /// A stable code: MDE's error code, or the operator's own (e.g. `DeviceAmbiguous`).
    pub code: String,
    /// What happened and what to do about it. Never contains a credential.
    pub message: String,
}

/// Observed state of a `DeviceOffboard`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceOffboardStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The MDE machine id (resolved from `deviceName` when that was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// The offboard MachineAction's id. Once set it never changes, but for
    /// an adopted action its owner cancelled: then it is cleared and this
    /// resource sends its own offboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_action_id: Option<String>,
    /// Set when the action was created by another request for the same
    /// machine and adopted: that request's key (a DeviceOffboard's uid, or
    /// the `offboard` command's key; empty when MDE reported a pending
    /// offboard that carries no marker). Only the request whose marker
    /// created an action may cancel it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<String>,
    /// MDE's own status of the action: Pending, InProgress, Succeeded, Failed, TimeOut, Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_status: Option<String>,
    /// `Submitted` and `Ready` (read by kstatus, Flux, Argo CD and `kubectl wait`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Offboard requests sent for this resource (each after a lookup proved none was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<Time>,
    /// When MDE's answer to this resource's latest send came (the
    /// operator's clock): a new leader counts the send against the budget
    /// from here, without the request timeout's margin `submittedAt` needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// While throttled or backing off: when the operator tries again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// A cancel asked for with the `defender.offboard.dev/cancel` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelStatus>,
    /// How `deviceName` (or the Node) became `machineId`: which record was
    /// chosen, and why every other record of the name was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    /// The tenant, app and API host this resource was begun with (recorded
    /// with its first decision): if its connection later names another, it
    /// stops (`ConnectionChanged`) instead of going on in that tenant, where
    /// nothing it did is to be found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<StatusTenant>,
}

/// Whom a resource's requests went to.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusTenant {
    /// The Microsoft Entra tenant id, lower-case.
    pub tenant_id: String,
    /// The app's client id, lower-case.
    pub client_id: String,
    /// The MDE API base URL.
    pub api: String,
}

impl From<&mde_client::Account> for StatusTenant {
    fn from(account: &mde_client::Account) -> Self {
        StatusTenant {
            tenant_id: account.tenant.clone(),
            client_id: account.app.clone(),
            api: account.api.clone(),
        }
    }
}

/// Where a requested cancel stands.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelStatus {
    /// The annotation's value, sent to MDE as the cancel's comment.
    pub reason: String,
    pub state: CancelState,
    /// When the cancel was last recorded as being sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Time>,
    /// Cancel requests sent (a second one only after a read of the action
    /// showed the first had not cancelled it).
    #[serde(default)]
    pub attempts: u32,
}

/// The states of a cancel. Contract: these names are read by scripts.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CancelState {
    /// Recorded before sending: the request may be in flight. The action is
    /// read before any second request.
    Requesting,
    /// MDE accepted the cancel.
    Sent,
    /// The action was already `InProgress` or final: nothing was sent.
    TooLate,
    /// The action was created by another request and adopted: only that
    /// request may cancel it, so nothing was sent.
    NotOwner,
}

/// The CRD as YAML, exactly as `defender-offboard crd` prints it and as
/// `crds/deviceoffboards.defender.offboard.dev.yaml` holds it.
pub fn crd_yaml() -> String {
    serde_yaml_ng::to_string(&DeviceOffboard::crd()).expect("the CRD always serializes")
}

/// Field manager for every write the operator makes.
pub const FIELD_MANAGER: &str = "defender-offboard";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_file_matches_the_rust_types() {
        let committed = include_str!("../../../crds/deviceoffboards.defender.offboard.dev.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/deviceoffboards.defender.offboard.dev.yaml is stale: regenerate it with \
             `cargo run -- crd > crds/deviceoffboards.defender.offboard.dev.yaml`"
        );
    }

    #[test]
    fn crd_carries_the_contract_names() {
        let crd = DeviceOffboard::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
        assert_eq!(crd.spec.group, GROUP);
        let names = &crd.spec.names;
        assert_eq!(names.plural, "deviceoffboards");
        assert_eq!(
            names.short_names.as_deref(),
            Some(&["doff".to_string(), "offboard".to_string()][..])
        );
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Machine", "Phase", "Action", "Status", "Age"]);
    }

    #[test]
    fn spec_rules_make_it_immutable_and_exactly_one_target() {
        let yaml = crd_yaml();
        assert!(yaml.contains("rule: self == oldSelf"));
        assert!(yaml.contains("has(self.machineId) != has(self.deviceName)"));
        assert!(yaml.contains("pattern: ^[0-9a-f]{40}$"));
        assert!(yaml.contains("ttlSecondsAfterFinished"));
    }
}
