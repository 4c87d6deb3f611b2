//! The resource types the API serves: built-ins and those defined by CRDs.

use serde_json::Value;
use std::sync::Arc;

/// Every verb a served resource supports here.
pub const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// A printer column of a CRD version (`additionalPrinterColumns`).
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One served group/version/resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    /// The store shared by every version (and, for events, both API groups).
    pub storage: String,
    /// The CRD's `openAPIV3Schema` for custom resources; `None` for built-ins.
    pub schema: Option<Value>,
    pub printer_columns: Vec<PrinterColumn>,
    /// Whether the resource is defined by a CRD (served as unstructured, validated by schema).
    pub custom: bool,
    /// The CRD's `scale` subresource, if it has one.
    pub scale: Option<ScalePaths>,
}

/// Where a custom resource keeps what its `/scale` subresource shows (`.spec.replicas`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// kube's qualified resource name, e.g. `deviceoffboards.defender.offboard.dev`.
    pub fn group_resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether the object keeps its desired state in `spec` (generation follows `spec` only).
    pub fn has_spec(&self) -> bool {
        !matches!(
            self.storage.as_str(),
            "core/secrets" | "core/configmaps" | "core/events" | "core/serviceaccounts"
        )
    }

    /// Whether the resource has the `token` subresource (ServiceAccounts' TokenRequest).
    pub fn serves_token(&self) -> bool {
        self.storage == "core/serviceaccounts"
    }

    pub fn is_events(&self) -> bool {
        self.storage == "core/events"
    }

    pub fn is_crd(&self) -> bool {
        self.storage == "apiextensions.k8s.io/customresourcedefinitions"
    }

    pub fn is_namespaces(&self) -> bool {
        self.storage == "core/namespaces"
    }
}

#[allow(clippy::too_many_arguments)]
/// A built-in type, by name: the fields that differ between built-ins.
struct Builtin<'a> {
    group: &'a str,
    version: &'a str,
    kind: &'a str,
    plural: &'a str,
    namespaced: bool,
    short_names: &'a [&'a str],
    status_subresource: bool,
    /// Where objects are kept: types that share storage (events) see one set.
    storage: &'a str,
}

impl From<Builtin<'_>> for ResourceType {
    fn from(b: Builtin<'_>) -> Self {
        ResourceType {
            group: b.group.into(),
            version: b.version.into(),
            kind: b.kind.into(),
            list_kind: format!("{}List", b.kind),
            plural: b.plural.into(),
            singular: b.kind.to_lowercase(),
            namespaced: b.namespaced,
            short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            status_subresource: b.status_subresource,
            storage: b.storage.into(),
            schema: None,
            printer_columns: Vec::new(),
            custom: false,
            scale: None,
        }
    }
}

/// The built-in resources the operator and kubectl use.
pub fn builtins() -> Vec<ResourceType> {
    vec![
        Builtin {
            group: "",
            version: "v1",
            kind: "Namespace",
            plural: "namespaces",
            namespaced: false,
            short_names: &["ns"],
            status_subresource: true,
            storage: "core/namespaces",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "Secret",
            plural: "secrets",
            namespaced: true,
            short_names: &[],
            status_subresource: false,
            storage: "core/secrets",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "ServiceAccount",
            plural: "serviceaccounts",
            namespaced: true,
            short_names: &["sa"],
            status_subresource: false,
            storage: "core/serviceaccounts",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "ConfigMap",
            plural: "configmaps",
            namespaced: true,
            short_names: &["cm"],
            status_subresource: false,
            storage: "core/configmaps",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "Service",
            plural: "services",
            namespaced: true,
            short_names: &["svc"],
            status_subresource: true,
            storage: "core/services",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "Node",
            plural: "nodes",
            namespaced: false,
            short_names: &["no"],
            status_subresource: true,
            storage: "core/nodes",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "ComponentStatus",
            plural: "componentstatuses",
            namespaced: false,
            short_names: &["cs"],
            status_subresource: false,
            storage: "core/componentstatuses",
        }
        .into(),
        Builtin {
            group: "",
            version: "v1",
            kind: "Event",
            plural: "events",
            namespaced: true,
            short_names: &["ev"],
            status_subresource: false,
            storage: "core/events",
        }
        .into(),
        Builtin {
            group: "events.k8s.io",
            version: "v1",
            kind: "Event",
            plural: "events",
            namespaced: true,
            short_names: &["ev"],
            status_subresource: false,
            storage: "core/events",
        }
        .into(),
        Builtin {
            group: "coordination.k8s.io",
            version: "v1",
            kind: "Lease",
            plural: "leases",
            namespaced: true,
            short_names: &[],
            status_subresource: false,
            storage: "coordination.k8s.io/leases",
        }
        .into(),
        Builtin {
            group: "apiextensions.k8s.io",
            version: "v1",
            kind: "CustomResourceDefinition",
            plural: "customresourcedefinitions",
            namespaced: false,
            short_names: &["crd", "crds"],
            status_subresource: true,
            storage: "apiextensions.k8s.io/customresourcedefinitions",
        }
        .into(),
    ]
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn text(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The served versions of a CRD (given as JSON), one `ResourceType` each.
pub fn from_crd(crd: &Value) -> Vec<ResourceType> {
    let group = text(crd, "/spec/group");
    let kind = text(crd, "/spec/names/kind");
    let plural = text(crd, "/spec/names/plural");
    let singular = match text(crd, "/spec/names/singular") {
        s if s.is_empty() => kind.to_lowercase(),
        s => s,
    };
    let list_kind = match text(crd, "/spec/names/listKind") {
        s if s.is_empty() => format!("{kind}List"),
        s => s,
    };
    let names = &crd["spec"]["names"];
    let namespaced = text(crd, "/spec/scope") != "Cluster";
    let versions = crd["spec"]["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| ResourceType {
            group: group.clone(),
            version: text(v, "/name"),
            kind: kind.clone(),
            list_kind: list_kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced,
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status_subresource: v.pointer("/subresources/status").is_some(),
            storage: format!("{group}/{plural}"),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            printer_columns: v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| PrinterColumn {
                            name: text(c, "/name"),
                            type_: text(c, "/type"),
                            format: text(c, "/format"),
                            description: text(c, "/description"),
                            priority: c["priority"].as_i64().unwrap_or(0),
                            json_path: text(c, "/jsonPath"),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            custom: true,
            scale: v.pointer("/subresources/scale").map(|scale| ScalePaths {
                spec_replicas: text(scale, "/specReplicasPath"),
                status_replicas: text(scale, "/statusReplicasPath"),
                label_selector: scale["labelSelectorPath"].as_str().map(String::from),
            }),
        })
        .collect()
}

/// All served resource types; CRDs add and remove theirs at runtime.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        Self {
            types: builtins().into_iter().map(Arc::new).collect(),
        }
    }

    pub fn types(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    /// The types served in one group/version (discovery and OpenAPI list them).
    pub fn types_in(&self, group: &str, version: &str) -> Vec<&ResourceType> {
        self.types
            .iter()
            .map(|t| t.as_ref())
            .filter(|t| t.group == group && t.version == version)
            .collect()
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// Any served version of a storage (used to present stored objects).
    pub fn by_storage(&self, storage: &str) -> Option<Arc<ResourceType>> {
        self.types.iter().find(|t| t.storage == storage).cloned()
    }

    /// Replace the types served for the CRD's group/plural with its current versions.
    pub fn set_crd(&mut self, crd: &Value) {
        self.remove_crd(crd);
        self.types.extend(from_crd(crd).into_iter().map(Arc::new));
    }

    pub fn remove_crd(&mut self, crd: &Value) {
        let storage = format!(
            "{}/{}",
            text(crd, "/spec/group"),
            text(crd, "/spec/names/plural")
        );
        self.types.retain(|t| !(t.custom && t.storage == storage));
    }

    /// API groups in serving order (core first), each with its versions.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for t in &self.types {
            match groups.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) => {
                    if !versions.contains(&t.version) {
                        versions.push(t.version.clone());
                    }
                }
                None => groups.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        groups
    }
}
