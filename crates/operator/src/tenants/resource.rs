//! The `DefenderConnection` custom resource: one MDE tenant and app
//! registration, with its credential, that `DeviceOffboard`s of the same
//! namespace use through `spec.connectionRef` (docs/tenants.md).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Full CRD name.
pub const CONNECTION_CRD_NAME: &str = "defenderconnections.defender.offboard.dev";

/// The `Ready` condition's reasons. Contract: read by people and scripts.
pub mod reason {
    /// Signed in, and the app may offboard and read machines.
    pub const SIGNED_IN: &str = "SignedIn";
    /// The login host refused the credential (wrong tenant, app or secret).
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    /// Signed in, but the app lacks `Machine.Offboard` or a read permission
    /// (`Machine.Read.All` or `Machine.ReadWrite.All`).
    pub const PERMISSION_DENIED: &str = "PermissionDenied";
    /// The Secret, its key or the ServiceAccount is missing or unreadable.
    pub const CREDENTIAL_NOT_FOUND: &str = "CredentialNotFound";
    /// The spec cannot be used (e.g. a host this operator does not send credentials to).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The login host did not answer, or answered 5xx/429: retried.
    pub const LOGIN_UNAVAILABLE: &str = "LoginUnavailable";
    /// Signed in, but the read that judges a token without roles failed
    /// (MDE unreachable or 5xx): retried.
    pub const MDE_UNAVAILABLE: &str = "MdeUnavailable";
}

/// An MDE tenant and the app registration that offboards its devices.
///
/// Used only by `DeviceOffboard`s in the same namespace (`spec.connectionRef.name`).
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "defender.offboard.dev",
    version = "v1alpha1",
    kind = "DefenderConnection",
    plural = "defenderconnections",
    namespaced,
    shortname = "dconn",
    category = "defender",
    status = "DefenderConnectionStatus",
    printcolumn = r#"{"name":"Tenant","type":"string","jsonPath":".spec.tenantId"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Offboards Left","type":"integer","jsonPath":".status.budget.offboardsLeft"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.tenantId == oldSelf.tenantId && self.clientId == oldSelf.clientId && has(self.cloud) == has(oldSelf.cloud) && (!has(self.cloud) || self.cloud == oldSelf.cloud) && has(self.apiUrl) == has(oldSelf.apiUrl) && (!has(self.apiUrl) || self.apiUrl == oldSelf.apiUrl) && has(self.loginUrl) == has(oldSelf.loginUrl) && (!has(self.loginUrl) || self.loginUrl == oldSelf.loginUrl)").message("spec.tenantId, spec.clientId, spec.cloud, spec.apiUrl and spec.loginUrl cannot change: DeviceOffboards in flight were begun in this tenant; create a new DefenderConnection for another tenant or app and point new DeviceOffboards at it (the credential may be rotated)")
)]
pub struct DefenderConnectionSpec {
    /// The Microsoft Entra tenant (directory) id: a GUID or a domain name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
    )]
    pub tenant_id: String,

    /// The application (client) id of the app registration holding the
    /// `Machine.Offboard` and `Machine.Read.All` application permissions.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
    )]
    pub client_id: String,

    /// The Microsoft cloud: sets the login and API hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<ConnectionCloud>,

    /// MDE API base URL, overriding the cloud's (e.g. a regional
    /// `https://eu.api.security.microsoft.com`). https only; plain http only to
    /// loopback, or when the operator runs with --allow-insecure-http.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("spec.apiUrl must be an https:// URL"))]
    pub api_url: Option<String>,

    /// Microsoft Entra login host URL, overriding the cloud's. Same rules as apiUrl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("spec.loginUrl must be an https:// URL"))]
    pub login_url: Option<String>,

    /// How the app proves who it is: exactly one of `clientSecret`,
    /// `certificate` or `workloadIdentity`.
    pub credential: ConnectionCredential,

    /// MDE machine tags whose devices are never offboarded through this
    /// connection (compared without case), besides the operator's own
    /// `--protected-tag`s: such a DeviceOffboard ends `Failed` with reason
    /// `DeviceProtected`, nothing sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub protected_tags: Vec<String>,

    /// Regular expressions searched (without case) in a device's
    /// `computerDnsName`: a matching device is never offboarded through this
    /// connection, besides the operator's own `--protected-name`s. An invalid
    /// pattern makes the connection not ready (`InvalidSpec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub protected_name_patterns: Vec<String>,
}

/// The Microsoft clouds, as in the operator's `--cloud`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConnectionCloud {
    Commercial,
    #[serde(rename = "GCC")]
    Gcc,
    #[serde(rename = "GCCHigh")]
    GccHigh,
    #[serde(rename = "DoD")]
    Dod,
}

impl From<ConnectionCloud> for mde_client::Cloud {
    fn from(cloud: ConnectionCloud) -> Self {
        match cloud {
            ConnectionCloud::Commercial => mde_client::Cloud::Commercial,
            ConnectionCloud::Gcc => mde_client::Cloud::Gcc,
            ConnectionCloud::GccHigh => mde_client::Cloud::GccHigh,
            ConnectionCloud::Dod => mde_client::Cloud::Dod,
        }
    }
}

/// The app's credential; everything it names lives in the connection's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("[has(self.clientSecret), has(self.certificate), has(self.workloadIdentity)].filter(x, x).size() == 1").message("spec.credential needs exactly one of clientSecret, certificate or workloadIdentity")
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionCredential {
    /// A key of a Secret in this namespace holding the client secret. Read at
    /// every sign-in (never listed or watched): rotating it needs no restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretKeyRef>,
    /// A key of a Secret in this namespace holding PEM text with the app's
    /// certificate and its RSA private key (certificate credentials): the
    /// operator signs a short-lived client assertion with it at each sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<SecretKeyRef>,
    /// Microsoft Entra Workload ID: the operator asks Kubernetes for a token of
    /// this ServiceAccount (TokenRequest, audience `api://AzureADTokenExchange`)
    /// and exchanges it at the login host; the app registration needs a
    /// federated credential for `system:serviceaccount:NAMESPACE:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentityRef>,
}

/// A key of a Secret in the connection's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name (a Kubernetes name: it goes into a URL path).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// The key in the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A ServiceAccount in the connection's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityRef {
    /// A ServiceAccount's name (a Kubernetes name: it goes into a URL path).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub service_account_name: String,
}

/// Whether sign-in works, and what is left of the budget.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefenderConnectionStatus {
    /// `Ready`: signed in and allowed to offboard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Calls this operator may still make for the tenant and app, in the
    /// tightest of MDE's windows (100 a minute, 1500 an hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<ConnectionBudget>,
    /// When sign-in was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
}

/// Calls left per MDE API family.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionBudget {
    pub offboards_left: u32,
    /// Machine-action reads (lookups, polls).
    pub reads_left: u32,
    pub cancels_left: u32,
}

/// The CRD as YAML, as `defender-offboard crd defender-connection` prints it
/// and `crds/defenderconnections.defender.offboard.dev.yaml` holds it.
pub fn connection_crd_yaml() -> String {
    serde_yaml_ng::to_string(&DefenderConnection::crd()).expect("the CRD always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_file_matches_the_rust_types() {
        let committed =
            include_str!("../../../../crds/defenderconnections.defender.offboard.dev.yaml");
        assert!(
            committed == connection_crd_yaml(),
            "crds/defenderconnections.defender.offboard.dev.yaml is stale: regenerate it with \
             `cargo run -- crd defender-connection > crds/defenderconnections.defender.offboard.dev.yaml`"
        );
    }

    #[test]
    fn printer_columns_show_tenant_and_readiness() {
        let crd = DefenderConnection::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some(CONNECTION_CRD_NAME));
        let version = &crd.spec.versions[0];
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Tenant", "Ready", "Reason", "Offboards Left", "Age"]
        );
        assert!(crd.spec.scope == "Namespaced");
        let yaml = connection_crd_yaml();
        assert!(yaml.contains(
            "spec.credential needs exactly one of clientSecret, certificate or workloadIdentity"
        ));
    }
}
