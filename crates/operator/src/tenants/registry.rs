//! Which MDE tenant a resource is offboarded through: the operator's own
//! credentials, or a `DefenderConnection` of the resource's namespace. Each
//! has its own client (token cache, rate budget, metrics label), so one
//! tenant's 429s or revoked secret never slow another's resources.

use super::protection::Protection;
use crate::crd::DeviceOffboard;
use crate::metrics::DEFAULT_CONNECTION;
use kube::ResourceExt;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use tokio::time::Instant;

/// What the registry needs of a tenant's client: its rate budget (offboards
/// a predecessor sent are counted against it), and whose machines and rate
/// limits it reaches (the state of one machine is kept per tenant, not per
/// connection: two connections to one tenant reach the same machines).
pub trait TenantClient: Send + Sync + 'static {
    fn budget(&self) -> &mde_client::RateBudget;
    fn account(&self) -> &mde_client::Account;
}

impl TenantClient for mde_client::DefenderClient {
    fn budget(&self) -> &mde_client::RateBudget {
        mde_client::DefenderClient::budget(self)
    }

    fn account(&self) -> &mde_client::Account {
        mde_client::DefenderClient::account(self)
    }
}

/// The operator's own credentials, or one `DefenderConnection`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectionKey {
    Default,
    Named { namespace: String, name: String },
}

impl ConnectionKey {
    /// The connection a resource asks for (its namespace, never another).
    pub fn of(resource: &DeviceOffboard) -> Self {
        match &resource.spec.connection_ref {
            None => ConnectionKey::Default,
            Some(reference) => ConnectionKey::Named {
                namespace: resource.namespace().unwrap_or_default(),
                name: reference.name.clone(),
            },
        }
    }
}

/// `default`, or `namespace/name`: the `connection` metrics label.
impl fmt::Display for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionKey::Default => f.write_str(DEFAULT_CONNECTION),
            ConnectionKey::Named { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

/// A connection's state as its controller last saw it.
enum Entry<M> {
    /// Seen, not signed in with yet.
    Checking,
    Ready(Arc<M>),
    /// Cannot be used: the `Ready` reason and message.
    NotReady {
        reason: String,
        message: String,
    },
}

/// Which namespaces the operator's own credentials serve
/// (`--default-connection-namespaces`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DefaultNamespaces {
    /// Every namespace the operator watches (one tenant for the cluster).
    #[default]
    All,
    /// Only these: with `DefenderConnection`s, every other namespace must
    /// name a connection of its own, so the operator's tenant is never a
    /// namespace's by default.
    Only(std::collections::BTreeSet<String>),
}

impl DefaultNamespaces {
    /// `*` (every namespace) or a comma-separated list of namespaces.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "*" {
            return Ok(DefaultNamespaces::All);
        }
        let names: std::collections::BTreeSet<String> = text
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        let valid = |n: &str| {
            n.len() <= 63
                && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && n.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        match names.iter().find(|n| !valid(n)) {
            Some(bad) => Err(format!(
                "--default-connection-namespaces: {bad:?} is not a namespace name; give `*` or namespaces separated by commas"
            )),
            None => Ok(DefaultNamespaces::Only(names)),
        }
    }

    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            DefaultNamespaces::All => true,
            DefaultNamespaces::Only(names) => names.contains(namespace),
        }
    }
}

/// Every tenant this process can reach, by key.
pub struct Connections<M> {
    default: Option<Arc<M>>,
    /// The namespaces `default` serves.
    default_namespaces: DefaultNamespaces,
    /// Whether `DefenderConnection`s are used at all (`run --connections`).
    enabled: bool,
    named: RwLock<HashMap<(String, String), Entry<M>>>,
    /// Whether the first list of DefenderConnections is in: before it, a
    /// connection not known yet may well exist.
    synced: std::sync::atomic::AtomicBool,
    /// Offboards sent in the budget windows, read at start, for connections
    /// whose client does not exist yet: applied when it is created.
    seeds: std::sync::Mutex<HashMap<ConnectionKey, Vec<Instant>>>,
    /// Each connection's own protected devices (`spec.protectedTags`,
    /// `spec.protectedNamePatterns`), added to the operator's own.
    protection: RwLock<HashMap<(String, String), Arc<Protection>>>,
}

impl<M: TenantClient> Connections<M> {
    /// `default`: the operator's own client, if it has credentials.
    pub fn new(default: Option<M>, enabled: bool) -> Self {
        Connections {
            default: default.map(Arc::new),
            default_namespaces: DefaultNamespaces::All,
            enabled,
            named: RwLock::default(),
            synced: Default::default(),
            seeds: Default::default(),
            protection: RwLock::default(),
        }
    }

    /// Serve the operator's own credentials to `namespaces` only.
    #[must_use]
    pub fn with_default_namespaces(mut self, namespaces: DefaultNamespaces) -> Self {
        self.default_namespaces = namespaces;
        self
    }

    pub fn default_client(&self) -> Option<Arc<M>> {
        self.default.clone()
    }

    /// The client for `key`, when it is usable now.
    pub fn get(&self, key: &ConnectionKey) -> Result<Arc<M>, Unavailable> {
        match key {
            ConnectionKey::Default => self.default.clone().ok_or(Unavailable::NoDefault),
            ConnectionKey::Named { name, .. } if !self.enabled => {
                Err(Unavailable::Disabled { name: name.clone() })
            }
            ConnectionKey::Named { namespace, name } => {
                let named = self.named.read().unwrap_or_else(|e| e.into_inner());
                match named.get(&(namespace.clone(), name.clone())) {
                    Some(Entry::Ready(client)) => Ok(client.clone()),
                    Some(Entry::Checking) => Err(Unavailable::Checking { name: name.clone() }),
                    None if !self.synced.load(std::sync::atomic::Ordering::Acquire) => {
                        Err(Unavailable::Checking { name: name.clone() })
                    }
                    Some(Entry::NotReady { reason, message }) => Err(Unavailable::NotReady {
                        name: name.clone(),
                        reason: reason.clone(),
                        message: message.clone(),
                    }),
                    None => Err(Unavailable::NotFound {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    }),
                }
            }
        }
    }

    /// The client a resource uses, with its key.
    pub fn for_resource(
        &self,
        resource: &DeviceOffboard,
    ) -> (ConnectionKey, Result<Arc<M>, Unavailable>) {
        let key = ConnectionKey::of(resource);
        let namespace = resource.namespace().unwrap_or_default();
        let client = match key {
            ConnectionKey::Default
                if self.default.is_some() && !self.default_namespaces.allows(&namespace) =>
            {
                Err(Unavailable::DefaultNotAllowed { namespace })
            }
            _ => self.get(&key),
        };
        (key, client)
    }

    /// A connection that signed in: its client (kept while its spec is unchanged).
    pub fn set_ready(&self, namespace: &str, name: &str, client: Arc<M>) {
        let key = ConnectionKey::Named {
            namespace: namespace.into(),
            name: name.into(),
        };
        if let Some(past) = self.take_seed(&key) {
            client
                .budget()
                .record_past(mde_client::ApiFamily::Offboard, &past);
        }
        self.named
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.into(), name.into()), Entry::Ready(client));
    }

    /// A connection just seen (created, changed, or listed at start), before
    /// its first sign-in.
    pub fn set_checking(&self, namespace: &str, name: &str) {
        self.named
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.into(), name.into()), Entry::Checking);
    }

    /// The first complete list of DefenderConnections is in.
    pub fn mark_synced(&self) {
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A connection that cannot be used now, and why.
    pub fn set_not_ready(&self, namespace: &str, name: &str, reason: &str, message: &str) {
        self.named
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (namespace.into(), name.into()),
                Entry::NotReady {
                    reason: reason.into(),
                    message: message.into(),
                },
            );
    }

    /// A connection's own protection rules, set before its client is ready.
    pub fn set_protection(&self, namespace: &str, name: &str, rules: Protection) {
        let mut protection = self.protection.write().unwrap_or_else(|e| e.into_inner());
        if rules.is_empty() {
            protection.remove(&(namespace.into(), name.into()));
        } else {
            protection.insert((namespace.into(), name.into()), Arc::new(rules));
        }
    }

    /// The protection rules of `key`'s connection beyond the operator's own
    /// (`None`: it adds none; the operator's own credentials never do).
    pub fn protection(&self, key: &ConnectionKey) -> Option<Arc<Protection>> {
        let ConnectionKey::Named { namespace, name } = key else {
            return None;
        };
        self.protection
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.clone(), name.clone()))
            .cloned()
    }

    /// The connection was deleted.
    pub fn remove(&self, namespace: &str, name: &str) {
        self.protection
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.to_string(), name.to_string()));
        self.named
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// Count offboards sent in the budget windows (read from the resources'
    /// `submittedAt` at start) against the connection's budget, now or when
    /// its client is created.
    pub fn seed(&self, key: ConnectionKey, past: Vec<Instant>) {
        match self.get(&key) {
            Ok(client) => client
                .budget()
                .record_past(mde_client::ApiFamily::Offboard, &past),
            Err(_) => {
                self.seeds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_default()
                    .extend(past);
            }
        }
    }

    fn take_seed(&self, key: &ConnectionKey) -> Option<Vec<Instant>> {
        self.seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
    }

    /// Every usable client with its key (the gauges publish each one's budget).
    pub fn ready(&self) -> Vec<(ConnectionKey, Arc<M>)> {
        let named = self.named.read().unwrap_or_else(|e| e.into_inner());
        self.default
            .iter()
            .map(|c| (ConnectionKey::Default, c.clone()))
            .chain(
                named
                    .iter()
                    .filter_map(|((namespace, name), entry)| match entry {
                        Entry::Ready(client) => Some((
                            ConnectionKey::Named {
                                namespace: namespace.clone(),
                                name: name.clone(),
                            },
                            client.clone(),
                        )),
                        Entry::NotReady { .. } | Entry::Checking => None,
                    }),
            )
            .collect()
    }
}

/// Why a resource's connection cannot be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// `spec.connectionRef` is set but the operator runs without `--connections`.
    Disabled { name: String },
    /// No `DefenderConnection` of that name in the resource's own namespace.
    NotFound { namespace: String, name: String },
    /// The connection exists but cannot sign in (yet): its `Ready` reason.
    NotReady {
        name: String,
        reason: String,
        message: String,
    },
    /// No `spec.connectionRef`, and the operator has no credentials of its own.
    NoDefault,
    /// No `spec.connectionRef`, and the operator's own credentials do not
    /// serve this namespace (`--default-connection-namespaces`).
    DefaultNotAllowed { namespace: String },
    /// The connection is being read or signed in for the first time (just
    /// created, or this process just started): wait briefly, write nothing.
    Checking { name: String },
}

impl Unavailable {
    /// What happened and what to do about it.
    pub fn message(&self) -> String {
        match self {
            Unavailable::Disabled { name } => format!(
                "spec.connectionRef names DefenderConnection {name:?}, but the operator runs without --connections (chart: connections.enabled); nothing was sent"
            ),
            Unavailable::NotFound { namespace, name } => format!(
                "no DefenderConnection {name:?} in namespace {namespace:?}: a DeviceOffboard uses only a connection of its own namespace; create it there (nothing was sent)"
            ),
            Unavailable::NotReady {
                name,
                reason,
                message,
            } => format!(
                "DefenderConnection {name:?} is not ready ({reason}: {message}); nothing was sent, retrying"
            ),
            Unavailable::Checking { name } => format!(
                "DefenderConnection {name:?} is being checked; nothing was sent yet"
            ),
            Unavailable::DefaultNotAllowed { namespace } => format!(
                "the operator's own credentials do not serve namespace {namespace:?} (--default-connection-namespaces; chart: defaultConnectionNamespaces): set spec.connectionRef to a DefenderConnection of this namespace (recreate the resource: the spec is immutable); nothing was sent"
            ),
            Unavailable::NoDefault => "the operator runs without credentials of its own: set spec.connectionRef to a DefenderConnection of this namespace (recreate the resource: the spec is immutable), or give the operator AZURE_TENANT_ID, AZURE_CLIENT_ID and a credential; nothing was sent".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant's client as far as the registry sees it: its budget.
    struct FakeMde(mde_client::RateBudget);

    impl Default for FakeMde {
        fn default() -> Self {
            FakeMde(mde_client::RateBudget::new(&Default::default()))
        }
    }

    impl TenantClient for FakeMde {
        fn budget(&self) -> &mde_client::RateBudget {
            &self.0
        }

        fn account(&self) -> &mde_client::Account {
            static ACCOUNT: std::sync::LazyLock<mde_client::Account> =
                std::sync::LazyLock::new(|| mde_client::Account {
                    tenant: "t".into(),
                    app: "a".into(),
                    api: "https://api.security.microsoft.com/".into(),
                });
            &ACCOUNT
        }
    }

    use crate::test_kit;

    fn resource(namespace: &str, connection: Option<&str>) -> DeviceOffboard {
        test_kit::offboard("r")
            .device_name("pc")
            .comment("c")
            .connection(connection)
            .namespace(namespace)
            .build()
    }

    fn unavailable(connections: &Connections<FakeMde>, r: &DeviceOffboard) -> Unavailable {
        match connections.for_resource(r).1 {
            Err(unavailable) => unavailable,
            Ok(_) => panic!("expected the connection to be unavailable"),
        }
    }

    /// The operator's own credentials serve only the namespaces listed: a
    /// resource elsewhere without a connectionRef gets no client at all.
    #[test]
    fn the_default_credentials_serve_only_the_listed_namespaces() {
        let only = DefaultNamespaces::parse("defender-offboard, secops").unwrap();
        let connections =
            Connections::new(Some(FakeMde::default()), true).with_default_namespaces(only);
        assert!(
            connections
                .for_resource(&resource("secops", None))
                .1
                .is_ok()
        );
        assert!(
            connections
                .for_resource(&resource("defender-offboard", None))
                .1
                .is_ok()
        );
        let refused = unavailable(&connections, &resource("team-b", None));
        assert_eq!(
            refused,
            Unavailable::DefaultNotAllowed {
                namespace: "team-b".into()
            }
        );
        assert!(
            refused
                .message()
                .contains("--default-connection-namespaces")
        );
        assert!(refused.message().contains("spec.connectionRef"));
        // `*` keeps one tenant for the whole cluster.
        let all = Connections::new(Some(FakeMde::default()), false)
            .with_default_namespaces(DefaultNamespaces::parse("*").unwrap());
        assert!(all.for_resource(&resource("team-b", None)).1.is_ok());
        // No credentials of its own: the older reason, whatever the list.
        let none: Connections<FakeMde> = Connections::new(None, true)
            .with_default_namespaces(DefaultNamespaces::parse("secops").unwrap());
        assert_eq!(
            unavailable(&none, &resource("team-b", None)),
            Unavailable::NoDefault
        );
        let error = DefaultNamespaces::parse("Team_B").unwrap_err();
        assert!(
            error.contains("\"Team_B\" is not a namespace name"),
            "{error}"
        );
    }

    /// A name is looked up in the resource's own namespace only; before the
    /// first list, and before a connection's first sign-in, it is `Checking`
    /// (wait quietly), then found, not ready, or not found.
    #[test]
    fn a_resource_reaches_only_its_own_namespaces_connection() {
        let connections = Connections::new(Some(FakeMde::default()), true);
        assert!(connections.for_resource(&resource("a", None)).1.is_ok());
        let borrower = resource("b", Some("shared"));
        assert!(matches!(
            unavailable(&connections, &borrower),
            Unavailable::Checking { .. }
        ));
        connections.mark_synced();
        connections.set_checking("a", "shared");
        assert!(matches!(
            unavailable(&connections, &resource("a", Some("shared"))),
            Unavailable::Checking { .. }
        ));
        connections.set_ready("a", "shared", Arc::new(FakeMde::default()));
        let (key, found) = connections.for_resource(&resource("a", Some("shared")));
        assert!(found.is_ok());
        assert_eq!(key.to_string(), "a/shared");
        assert_eq!(
            unavailable(&connections, &borrower),
            Unavailable::NotFound {
                namespace: "b".into(),
                name: "shared".into()
            }
        );
        connections.set_not_ready("a", "shared", "AuthenticationFailed", "invalid_client");
        assert!(matches!(
            unavailable(&connections, &resource("a", Some("shared"))),
            Unavailable::NotReady { reason, .. } if reason == "AuthenticationFailed"
        ));
        connections.remove("a", "shared");
        assert!(matches!(
            unavailable(&connections, &resource("a", Some("shared"))),
            Unavailable::NotFound { .. }
        ));
        let disabled = Connections::new(Some(FakeMde::default()), false);
        assert!(matches!(
            unavailable(&disabled, &resource("a", Some("x"))),
            Unavailable::Disabled { .. }
        ));
        let no_default: Connections<FakeMde> = Connections::new(None, true);
        assert_eq!(
            unavailable(&no_default, &resource("a", None)),
            Unavailable::NoDefault
        );
    }

    /// A connection's protected devices are its own: another connection of
    /// the same name elsewhere and the operator's credentials get none, and
    /// they go with the connection.
    #[test]
    fn protection_rules_belong_to_their_connection() {
        let connections = Connections::new(Some(FakeMde::default()), true);
        let rules = Protection::from_connection("shared", &["tier0".into()], &[]).unwrap();
        connections.set_protection("a", "shared", rules);
        let own = ConnectionKey::of(&resource("a", Some("shared")));
        assert!(connections.protection(&own).is_some_and(|r| !r.is_empty()));
        let other = ConnectionKey::of(&resource("b", Some("shared")));
        assert!(connections.protection(&other).is_none());
        assert!(connections.protection(&ConnectionKey::Default).is_none());
        connections.set_protection("a", "shared", Protection::default());
        assert!(connections.protection(&own).is_none());
        connections.set_protection("a", "shared", Protection::from_flags(&["x".into()], &[]));
        connections.remove("a", "shared");
        assert!(connections.protection(&own).is_none());
    }
}
