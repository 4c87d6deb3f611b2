//! One offboard per machine within this process: which resource is sending
//! for a machine right now, and which action a resource created or adopted
//! for it, so two resources for one machine lead to one POST even before
//! MDE's list shows the first action.

use crate::tenants::ConnectionKey;
use mde_client::{ActionStatus, MachineAction};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A machine of one tenant: machine ids are unique only within a tenant, so
/// two tenants' machines never stand for each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TenantMachine {
    pub tenant: ConnectionKey,
    pub machine_id: String,
}

/// After this long, a known action is forgotten: MDE's list shows it by then,
/// and memory stays bounded by recent work rather than history.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// How often known actions older than [`FORGET_AFTER`] are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A machine's entry: a send in flight for one key, or the action one key
/// created or adopted.
#[derive(Debug, Clone)]
enum Entry {
    Sending {
        key: String,
    },
    /// Only what a claim hands back: an offboard's id and last status.
    Known {
        action_id: Box<str>,
        status: ActionStatus,
        key: Box<str>,
        at: Instant,
    },
}

/// What [`MachineClaims::claim`] answers.
#[derive(Debug)]
pub(crate) enum MachineClaim {
    /// This key may send for the machine; the claim ends when dropped.
    Granted(ClaimGuard),
    /// Another key is sending for it right now: look again shortly.
    Busy { key: String },
    /// An action for the machine is known (sent or adopted by `key`).
    Known {
        action: Box<MachineAction>,
        key: String,
    },
}

#[derive(Default)]
struct Claims {
    machines: HashMap<TenantMachine, Entry>,
    /// When `machines` was last swept of forgotten actions.
    swept: Option<Instant>,
}

#[derive(Clone, Default)]
pub(crate) struct MachineClaims(Arc<Mutex<Claims>>);

impl MachineClaims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask to send for `machine` under `key`.
    pub(crate) fn claim(&self, machine: &TenantMachine, key: &str, now: Instant) -> MachineClaim {
        let mut claims = self.lock();
        if claims
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
        {
            claims.machines.retain(|_, entry| match entry {
                Entry::Known { at, .. } => now.saturating_duration_since(*at) < FORGET_AFTER,
                Entry::Sending { .. } => true,
            });
            claims.machines.shrink_to_fit();
            claims.swept = Some(now);
        }
        match claims.machines.get(machine) {
            Some(Entry::Sending { key: other }) if other != key => {
                MachineClaim::Busy { key: other.clone() }
            }
            // Only a live or succeeded action stands for the machine (and only
            // for FORGET_AFTER); after a failed one, a new request may send again.
            Some(Entry::Known {
                action_id,
                status,
                key: by,
                at,
            }) if now.saturating_duration_since(*at) < FORGET_AFTER
                && (!status.is_final() || *status == ActionStatus::Succeeded) =>
            {
                MachineClaim::Known {
                    action: Box::new(MachineAction::recorded_offboard(
                        action_id,
                        &machine.machine_id,
                        status.clone(),
                    )),
                    key: by.to_string(),
                }
            }
            _ => {
                claims.machines.insert(
                    machine.clone(),
                    Entry::Sending {
                        key: key.to_string(),
                    },
                );
                MachineClaim::Granted(ClaimGuard {
                    claims: self.clone(),
                    machine: machine.clone(),
                    key: key.to_string(),
                })
            }
        }
    }

    /// An action exists for `machine` (sent or adopted by `key`).
    pub(crate) fn known(
        &self,
        machine: TenantMachine,
        action: &MachineAction,
        key: &str,
        now: Instant,
    ) {
        let entry = Entry::Known {
            action_id: action.id.as_str().into(),
            status: action.status.clone(),
            key: key.into(),
            at: now,
        };
        self.lock().machines.insert(machine, entry);
    }
}

/// Holds a machine for one key while it sends; released when dropped unless
/// the machine became known meanwhile.
pub(crate) struct ClaimGuard {
    claims: MachineClaims,
    machine: TenantMachine,
    key: String,
}

impl std::fmt::Debug for ClaimGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard")
            .field("machine", &self.machine)
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let mut claims = self.claims.lock();
        if matches!(
            claims.machines.get(&self.machine),
            Some(Entry::Sending { key }) if *key == self.key
        ) {
            claims.machines.remove(&self.machine);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(tenant: ConnectionKey) -> TenantMachine {
        TenantMachine {
            tenant,
            machine_id: "m1".into(),
        }
    }

    /// While one key sends, another is told to wait; once the first key's
    /// action is known, others adopt it (a failed one does not stand for
    /// the machine); a dropped claim frees the machine; and the same
    /// machine id in another tenant is another machine.
    #[test]
    fn one_sender_per_tenant_machine_and_known_actions_are_shared() {
        let claims = MachineClaims::default();
        let now = Instant::now();
        let default = machine(ConnectionKey::Default);
        let MachineClaim::Granted(guard) = claims.claim(&default, "a", now) else {
            panic!("the first claim is granted");
        };
        assert!(
            matches!(claims.claim(&default, "b", now), MachineClaim::Busy { key } if key == "a")
        );
        let other_tenant = machine(ConnectionKey::Named {
            namespace: "team-b".into(),
            name: "contoso".into(),
        });
        assert!(matches!(
            claims.claim(&other_tenant, "b", now),
            MachineClaim::Granted(_)
        ));
        drop(guard);
        let MachineClaim::Granted(guard) = claims.claim(&default, "b", now) else {
            panic!("a dropped claim frees the machine");
        };
        let action = MachineAction::recorded_offboard("act-1", "m1", ActionStatus::Pending);
        claims.known(default.clone(), &action, "b", now);
        drop(guard);
        assert!(matches!(
            claims.claim(&default, "c", now),
            MachineClaim::Known { key, .. } if key == "b"
        ));
        let failed = MachineAction::recorded_offboard("act-1", "m1", ActionStatus::Failed);
        claims.known(default.clone(), &failed, "b", now);
        assert!(matches!(
            claims.claim(&default, "c", now),
            MachineClaim::Granted(_)
        ));
        // A known action is forgotten after an hour.
        claims.known(default.clone(), &action, "b", now);
        let later = now + FORGET_AFTER + Duration::from_secs(1);
        assert!(matches!(
            claims.claim(&default, "d", later),
            MachineClaim::Granted(_)
        ));
    }
}
