//! One offboard per machine within this process: which resource is sending
//! for a machine right now, which send may have created an action nobody has
//! recorded, and which action a resource created or adopted for it, so two
//! resources for one machine lead to one POST even before MDE's list shows
//! the first action.
//!
//! A claim lives until a final answer or a proving read: a send whose
//! outcome is unknown, whose record write failed, or whose resource went
//! away mid-send leaves the machine [`Entry::Uncertain`]. Another resource
//! then waits the lookup delay (the list's lag) and reads the machine's
//! actions itself, never trusting the adopt index, whose last read may
//! predate that send.

use mde_client::Account;
use mde_client::{ActionStatus, MachineAction};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A machine of one tenant: machine ids are unique only within a tenant, so
/// two tenants' machines never stand for each other, and two connections to
/// one tenant (any app) reach the same machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TenantMachine {
    pub tenant: Account,
    pub machine_id: String,
}

/// After this long, a known action is forgotten: MDE's list shows it by then,
/// and memory stays bounded by recent work rather than history.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// How often known actions older than [`FORGET_AFTER`] are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A machine's entry: a send in flight for one key, a send that may have
/// created an action, or the action one key created or adopted.
#[derive(Debug, Clone)]
enum Entry {
    Sending {
        key: String,
    },
    /// A POST left for `key` and no action was recorded: one may exist.
    Uncertain {
        key: Box<str>,
        at: Instant,
    },
    /// Only what a claim hands back: an offboard's id and last status.
    Known {
        action_id: Box<str>,
        status: ActionStatus,
        key: Box<str>,
        at: Instant,
    },
}

impl Entry {
    fn at(&self) -> Option<Instant> {
        match self {
            Entry::Sending { .. } => None,
            Entry::Uncertain { at, .. } | Entry::Known { at, .. } => Some(*at),
        }
    }
}

/// What [`MachineClaims::claim`] answers.
#[derive(Debug)]
pub(crate) enum MachineClaim {
    /// This key may send for the machine; the claim ends when dropped.
    /// `exact_read`: an action may exist that the adopt index has not read
    /// (one this process sent, finished, or of unknown outcome), so only
    /// the machine's own list may prove absence.
    Granted { guard: ClaimGuard, exact_read: bool },
    /// Another key is sending for it, or sent with an unknown outcome less
    /// than the settle time ago: look again after `retry`.
    Busy { key: String, retry: Duration },
    /// A live action for the machine is known (sent or adopted by `key`).
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

/// How soon to look again while another resource is sending.
const SENDING_RETRY: Duration = Duration::from_millis(500);

impl MachineClaims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask to send for `machine` under `key`. `settle`: how long after a
    /// send of unknown outcome its action may still be missing from MDE's
    /// list (the lookup delay).
    pub(crate) fn claim(
        &self,
        machine: &TenantMachine,
        key: &str,
        now: Instant,
        settle: Duration,
    ) -> MachineClaim {
        let mut claims = self.lock();
        if claims
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
        {
            claims.machines.retain(|_, entry| {
                entry
                    .at()
                    .is_none_or(|at| now.saturating_duration_since(at) < FORGET_AFTER)
            });
            claims.machines.shrink_to_fit();
            claims.swept = Some(now);
        }
        let current = claims
            .machines
            .get(machine)
            .filter(|e| {
                e.at()
                    .is_none_or(|at| now.saturating_duration_since(at) < FORGET_AFTER)
            })
            .cloned();
        let exact_read = match &current {
            Some(Entry::Sending { key: other }) if other != key => {
                return MachineClaim::Busy {
                    key: other.clone(),
                    retry: SENDING_RETRY,
                };
            }
            Some(Entry::Uncertain { key: other, at }) if &**other != key => {
                let since = now.saturating_duration_since(*at);
                if since < settle {
                    return MachineClaim::Busy {
                        key: other.to_string(),
                        retry: settle - since,
                    };
                }
                true
            }
            // Only a live action stands for the machine here; a finished one
            // is decided by the machine's list (a succeeded one stands only
            // if the machine was not seen since: see decision::found_in).
            Some(Entry::Known {
                action_id,
                status,
                key: by,
                ..
            }) if !status.is_final() => {
                return MachineClaim::Known {
                    action: Box::new(MachineAction::recorded_offboard(
                        action_id,
                        &machine.machine_id,
                        status.clone(),
                    )),
                    key: by.to_string(),
                };
            }
            Some(Entry::Uncertain { .. } | Entry::Known { .. }) => true,
            Some(Entry::Sending { .. }) | None => false,
        };
        claims.machines.insert(
            machine.clone(),
            Entry::Sending {
                key: key.to_string(),
            },
        );
        // What a claim that sends nothing puts back.
        let previous = current.filter(|e| !matches!(e, Entry::Sending { .. }));
        MachineClaim::Granted {
            guard: ClaimGuard {
                claims: self.clone(),
                machine: machine.clone(),
                key: key.to_string(),
                previous,
                posted: AtomicBool::new(false),
            },
            exact_read,
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

    /// A poll read `action`: a known entry for it takes its new status (a
    /// cancelled or failed action no longer stands for the machine).
    pub(crate) fn polled(&self, machine: &TenantMachine, action: &MachineAction) {
        if let Some(Entry::Known {
            action_id, status, ..
        }) = self.lock().machines.get_mut(machine)
            && **action_id == *action.id
        {
            *status = action.status.clone();
        }
    }

    /// Entries held (for tests of the sweep).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().machines.len()
    }
}

/// Holds a machine for one key while it sends. Dropped before the POST (or
/// after a definite refusal), the machine is as it was; dropped after the
/// POST left without an action recorded, it is [`Entry::Uncertain`].
pub(crate) struct ClaimGuard {
    claims: MachineClaims,
    machine: TenantMachine,
    key: String,
    previous: Option<Entry>,
    posted: AtomicBool,
}

impl ClaimGuard {
    /// The POST is about to leave: from now on an action may exist.
    pub(crate) fn posting(&self) {
        self.posted.store(true, Ordering::SeqCst);
    }

    /// MDE refused the POST before acting: nothing was created.
    pub(crate) fn nothing_created(&self) {
        self.posted.store(false, Ordering::SeqCst);
    }
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
        // Known meanwhile (recorded or adopted): that stands.
        if !matches!(
            claims.machines.get(&self.machine),
            Some(Entry::Sending { key }) if *key == self.key
        ) {
            return;
        }
        let after = if self.posted.load(Ordering::SeqCst) {
            Some(Entry::Uncertain {
                key: self.key.as_str().into(),
                at: Instant::now(),
            })
        } else {
            self.previous.take()
        };
        match after {
            Some(entry) => claims.machines.insert(self.machine.clone(), entry),
            None => claims.machines.remove(&self.machine),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(35);

    fn tenant(id: &str) -> Account {
        Account {
            tenant: id.into(),
            app: String::new(),
            api: "https://api.security.microsoft.com/".into(),
        }
    }

    fn machine(tenant: Account) -> TenantMachine {
        TenantMachine {
            tenant,
            machine_id: "m1".into(),
        }
    }

    fn granted(claim: MachineClaim) -> (ClaimGuard, bool) {
        match claim {
            MachineClaim::Granted { guard, exact_read } => (guard, exact_read),
            other => panic!("expected a granted claim, got {other:?}"),
        }
    }

    /// While one key sends, another is told to wait; once the first key's
    /// action is known, others adopt it while it is live; a dropped claim
    /// that sent nothing frees the machine; and the same machine id in
    /// another tenant is another machine.
    #[test]
    fn one_sender_per_tenant_machine_and_live_actions_are_shared() {
        let claims = MachineClaims::default();
        let now = Instant::now();
        let default = machine(tenant("contoso"));
        let (guard, exact) = granted(claims.claim(&default, "a", now, SETTLE));
        assert!(!exact, "nothing known: the index may prove absence");
        assert!(matches!(
            claims.claim(&default, "b", now, SETTLE),
            MachineClaim::Busy { key, .. } if key == "a"
        ));
        let other_tenant = machine(tenant("fabrikam"));
        granted(claims.claim(&other_tenant, "b", now, SETTLE));
        drop(guard);
        let (guard, _) = granted(claims.claim(&default, "b", now, SETTLE));
        let action = MachineAction::recorded_offboard("act-1", "m1", ActionStatus::Pending);
        claims.known(default.clone(), &action, "b", now);
        drop(guard);
        assert!(matches!(
            claims.claim(&default, "c", now, SETTLE),
            MachineClaim::Known { key, .. } if key == "b"
        ));
        // A finished action is the machine's list's to judge: an exact read.
        for status in [ActionStatus::Failed, ActionStatus::Succeeded] {
            let done = MachineAction::recorded_offboard("act-1", "m1", status);
            claims.known(default.clone(), &done, "b", now);
            let (guard, exact) = granted(claims.claim(&default, "c", now, SETTLE));
            assert!(
                exact,
                "a finished action this process knows needs the exact read"
            );
            drop(guard);
        }
        // A known action is forgotten after an hour.
        claims.known(default.clone(), &action, "b", now);
        let later = now + FORGET_AFTER + Duration::from_secs(1);
        let (_, exact) = granted(claims.claim(&default, "d", later, SETTLE));
        assert!(!exact);
    }

    /// A claim lives until a final answer or a proving read: a POST that
    /// left without an action recorded (unknown outcome, a failed record
    /// write, a resource deleted mid-send) keeps the machine from other keys
    /// for the settle time, and after it they must read the machine's list.
    #[tokio::test(start_paused = true)]
    async fn a_send_of_unknown_outcome_keeps_its_claim_until_a_proving_read() {
        let claims = MachineClaims::default();
        let m = machine(tenant("contoso"));
        let (guard, _) = granted(claims.claim(&m, "a", Instant::now(), SETTLE));
        guard.posting();
        drop(guard);
        let now = Instant::now();
        let MachineClaim::Busy { key, retry } = claims.claim(&m, "b", now, SETTLE) else {
            panic!("an action of unknown outcome may exist: wait")
        };
        assert_eq!((key.as_str(), retry), ("a", SETTLE));
        let later = now + SETTLE;
        let (guard, exact) = granted(claims.claim(&m, "b", later, SETTLE));
        assert!(
            exact,
            "after the settle time, only the machine's list may prove absence"
        );
        // b read nothing, did not send (its budget was spent, say): a's
        // uncertain claim stands again for the next resource.
        drop(guard);
        let (_, exact) = granted(claims.claim(&m, "c", later, SETTLE));
        assert!(exact);
        // The sender itself may go on (its own lookup comes first).
        let claims = MachineClaims::default();
        let (guard, _) = granted(claims.claim(&m, "a", now, SETTLE));
        guard.posting();
        drop(guard);
        granted(claims.claim(&m, "a", now, SETTLE));
    }

    /// Refused before MDE acted, or never sent: the machine is free again.
    #[test]
    fn a_claim_that_sent_nothing_leaves_no_trace() {
        let claims = MachineClaims::default();
        let m = machine(tenant("contoso"));
        let now = Instant::now();
        let (guard, _) = granted(claims.claim(&m, "a", now, SETTLE));
        guard.posting();
        guard.nothing_created();
        drop(guard);
        assert_eq!(claims.len(), 0);
        let (_, exact) = granted(claims.claim(&m, "b", now, SETTLE));
        assert!(!exact);
    }
}
