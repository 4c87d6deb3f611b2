//! A resource whose tenant cannot be reached through its connection: it
//! waits with the reason and the fix named, and nothing is sent.

use super::errors::{Retry, retrying};
use super::{Settings, Transition, View};
use crate::controller::status::Reason;
use std::time::Duration;

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
    /// The connection is being read or signed in for the first time (just
    /// created, or this process just started): wait briefly, write nothing.
    Checking { name: String },
}

impl Unavailable {
    pub fn reason(&self) -> Reason {
        match self {
            Unavailable::Disabled { .. } => Reason::ConnectionsDisabled,
            Unavailable::NotFound { .. } => Reason::ConnectionNotFound,
            Unavailable::NotReady { .. } | Unavailable::Checking { .. } => {
                Reason::ConnectionNotReady
            }
            Unavailable::NoDefault => Reason::NoDefaultConnection,
        }
    }

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
            Unavailable::NoDefault => "the operator runs without credentials of its own: set spec.connectionRef to a DefenderConnection of this namespace (recreate the resource: the spec is immutable), or give the operator AZURE_TENANT_ID, AZURE_CLIENT_ID and a credential; nothing was sent".into(),
        }
    }

    /// How soon to look again: a missing or not-ready connection may appear
    /// any moment (GitOps applies in any order); the operator's own
    /// configuration changes only with a restart.
    fn wait(&self, settings: &Settings) -> Duration {
        match self {
            Unavailable::NotFound { .. }
            | Unavailable::NotReady { .. }
            | Unavailable::Checking { .. } => settings.retry_backoff,
            Unavailable::Disabled { .. } | Unavailable::NoDefault => settings.access_backoff,
        }
    }
}

/// Wait in the current phase (`Pending`, or `Submitting` whose lookup needs
/// the tenant) with the reason in status and an Event; the Event only when
/// the reason is new, so a long wait does not repeat it every retry.
pub fn connection_unavailable(
    view: &View,
    unavailable: &Unavailable,
    settings: &Settings,
) -> Transition {
    let reason = unavailable.reason();
    let mut transition = retrying(
        view,
        Retry {
            phase: view.phase(),
            reason,
            code: reason.as_str(),
            message: unavailable.message(),
            wait: unavailable.wait(settings),
        },
    );
    let repeated = view
        .status
        .last_error
        .as_ref()
        .is_some_and(|e| e.code == reason.as_str());
    if repeated {
        transition.note = None;
    }
    transition
}
