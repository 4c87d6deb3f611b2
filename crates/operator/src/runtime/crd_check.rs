//! At start: the CRDs are installed and this process may list them, else an
//! error that names the fix.

use crate::crd::DeviceOffboard;
use kube::api::{Api, ListParams};

pub async fn check_crd_installed(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<(), String> {
    check_listable::<DeviceOffboard>(client, namespace, crate::crd::CRD_NAME, "").await
}

/// The CRD of `K` is installed and this process may list `K`; the error
/// names the fix. `flag` says which option needs it (empty: always needed).
async fn check_listable<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    crd_name: &str,
    flag: &str,
) -> Result<(), String>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let plural = K::plural(&Default::default()).to_string();
    let kind = K::kind(&Default::default()).to_string();
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(format!(
            "{flag}the {kind} CRD is not installed: kubectl apply -f crds/{crd_name}.yaml"
        )),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(format!(
            "{flag}not allowed to list {plural} ({}): check the operator's RBAC",
            status.message
        )),
        Err(error) => Err(format!("{flag}cannot list {plural}: {error}")),
    }
}

/// `--connections` needs the DefenderConnection CRD and the right to read it.
pub async fn check_connection_crd_installed(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<(), String> {
    check_listable::<crate::tenants::resource::DefenderConnection>(
        client,
        namespace,
        crate::tenants::resource::CONNECTION_CRD_NAME,
        "--connections: ",
    )
    .await
}
