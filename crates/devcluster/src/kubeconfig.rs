//! The kubeconfig that points kubectl and kube-rs at the in-memory API.

/// Name of the cluster, context and user in the written kubeconfig.
pub const CONTEXT: &str = "defender-offboard-dev";

/// A kubeconfig for `server` (e.g. `http://127.0.0.1:8001`), namespace `default`, no credentials.
pub fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {CONTEXT}
  cluster:
    server: {server}
contexts:
- name: {CONTEXT}
  context:
    cluster: {CONTEXT}
    user: {CONTEXT}
    namespace: default
current-context: {CONTEXT}
users:
- name: {CONTEXT}
  user: {{}}
preferences: {{}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_rs_reads_it() {
        let yaml = kubeconfig_yaml("http://127.0.0.1:1234");
        let config = kube::config::Kubeconfig::from_yaml(&yaml).expect("valid kubeconfig");
        assert_eq!(config.current_context.as_deref(), Some(CONTEXT));
        assert_eq!(
            config.clusters[0]
                .cluster
                .as_ref()
                .and_then(|c| c.server.as_deref()),
            Some("http://127.0.0.1:1234")
        );
    }
}
