//! The two rails between a plan and a send: the two-person rule
//! (`--require-approval`) and the blast-radius breaker
//! (`--max-offboards-per-hour`). Pure: the resource's annotations and the
//! tenant's recent new sends in, a plan or a hold out. See
//! docs/operations.md, "Safety".

use super::{Conditions, Note, Plan, Settings, Submitted, Transition, View};
use crate::crd::{
    APPROVED_BY_ANNOTATION, CREATED_BY_ANNOTATION, Phase, RELEASE_BREAKER_ANNOTATION, SafetyMarks,
};
use crate::offboard::status::{READY, Reason, condition};
use std::time::Duration;

/// The window the breaker counts new sends in.
pub const BREAKER_WINDOW: Duration = Duration::from_secs(3600);

/// `--max-offboards-per-hour`'s default: one minute of MDE's budget, and a
/// hundred devices to re-onboard at worst when a mistake is caught in the
/// first hour (docs/operations.md, "Breaker").
pub const DEFAULT_MAX_OFFBOARDS_PER_HOUR: u32 = 100;

/// Whether the two-person rule holds: a creator and an approver are named,
/// and they are not the same identity. `Err`: what is missing and who can
/// supply it. The admission policies make the names trustworthy (each is
/// the requester's own Kubernetes username); this only reads them.
pub fn approval(marks: &SafetyMarks) -> Result<(), String> {
    match (marks.created_by, marks.approved_by) {
        (None, _) => Err(format!(
            "waiting for approval: no {CREATED_BY_ANNOTATION} annotation names the resource's creator. The creator sets it to their own Kubernetes username (`kubectl auth whoami`) on create; on a resource created without it (by node offboarding, or before the admission policy), one person sets it to their own username and another approves"
        )),
        (Some(creator), None) => Err(format!(
            "waiting for approval by someone other than its creator {creator}: they run `kubectl annotate deviceoffboard <name> {APPROVED_BY_ANNOTATION}=<their Kubernetes username>`"
        )),
        (Some(creator), Some(approver)) if creator == approver => Err(format!(
            "waiting for approval: {APPROVED_BY_ANNOTATION} names the creator {creator}; the approval must come from someone else"
        )),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// The plan with both rails applied:
/// - a resource the breaker holds, released by its annotation, goes on at
///   once instead of waiting out the `nextRetryAt` of its hold;
/// - with `--require-approval`, a plan that leads to a send (resolving the
///   device, reading the machine, sending) waits for the approval instead:
///   no MDE call at all. What reads or finishes a send already recorded
///   (`Submitting`'s lookup, a cancel, the poller) is never held back.
pub fn guard(plan: Plan, view: &View, marks: &SafetyMarks, settings: &Settings) -> Plan {
    let plan = match (&plan, view.machine_id()) {
        (Plan::Idle { .. }, Some(machine_id)) if marks.release_breaker && held(view) => {
            Plan::Submit {
                machine_id,
                check_machine: view.status.attempts.unwrap_or(0) == 0,
            }
        }
        _ => plan,
    };
    if !settings.require_approval || !leads_to_a_send(&plan) {
        return plan;
    }
    match approval(marks) {
        Ok(()) => plan,
        Err(why) => Plan::Write(Box::new(awaiting_approval(view, why))),
    }
}

/// Whether `plan` calls MDE on the way to a send. Anything new counts as
/// such, so a step added later is held back until someone says otherwise.
fn leads_to_a_send(plan: &Plan) -> bool {
    !matches!(
        plan,
        Plan::Idle { .. }
            | Plan::Write(_)
            | Plan::Cancel { .. }
            | Plan::ReadCancelled { .. }
            | Plan::LookUp { .. }
    )
}

/// Whether the resource waits in a hold of the breaker.
fn held(view: &View) -> bool {
    view.phase() == Phase::Pending
        && view.status.machine_action_id.is_none()
        && ready_reason(view) == Some(Reason::BreakerOpen.as_str())
}

fn ready_reason<'v>(view: &'v View) -> Option<&'v str> {
    condition(view.status, READY).map(|c| c.reason.as_str())
}

/// `Pending` until approved; told once per reason given (an Event when it
/// starts waiting, or when what it waits for changes). Waits for a change
/// of the resource (the approval comes through the watch), not a time.
pub fn awaiting_approval(view: &View, why: String) -> Transition {
    let told = condition(view.status, READY)
        .is_some_and(|c| c.reason == Reason::AwaitingApproval.as_str() && c.message == why);
    let mut status = view.with(
        Phase::Pending,
        Conditions {
            ready: (Reason::AwaitingApproval, why.clone()),
            submitted: Submitted::no(Reason::NotSubmitted, "not sent: waiting for approval"),
        },
    );
    status.next_retry_at = None;
    Transition {
        status,
        note: (!told).then_some(Note {
            reason: Reason::AwaitingApproval,
            message: why,
        }),
        requeue: None,
    }
}

/// Whether a send is the resource's first. Only first sends count and are
/// held: a resend after a lookup proved nothing was created, or after MDE
/// refused the first (a 429), continues a send already counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    First,
    Again,
}

/// The breaker's word on one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerCheck {
    /// Send; `counted`: it counts in the tenant's hour.
    Pass {
        counted: bool,
    },
    Hold(Held),
}

/// Why a send is held, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// `--max-offboards-per-hour`.
    pub limit: u32,
    /// New sends to the tenant within the last hour.
    pub sent: usize,
    /// Until the hour frees the slot of this resource's place.
    pub wait: Duration,
}

/// The breaker: more than `limit` new sends in any hour to one tenant hold
/// the rest. `sent_ages`: how long ago each new send to the tenant was
/// (those an hour old or more no longer count); `place`: how many held
/// resources of the tenant wait before this one (each comes back when the
/// slot of its own place frees, not all at every freed slot). `limit` 0:
/// off. A released resource passes, and counts.
pub fn breaker(
    limit: u32,
    send: SendKind,
    released: bool,
    sent_ages: &[Duration],
    place: usize,
) -> BreakerCheck {
    if limit == 0 || send == SendKind::Again {
        return BreakerCheck::Pass { counted: false };
    }
    let mut ages: Vec<Duration> = sent_ages
        .iter()
        .copied()
        .filter(|age| *age < BREAKER_WINDOW)
        .collect();
    let limit_slots = limit as usize;
    if released || ages.len() < limit_slots {
        return BreakerCheck::Pass { counted: true };
    }
    // Oldest first: the i-th frees the i-th slot.
    ages.sort_unstable_by(|a, b| b.cmp(a));
    BreakerCheck::Hold(Held {
        limit,
        sent: ages.len(),
        wait: slot_frees_in(&ages, limit_slots, place),
    })
}

/// When the slot for the `place`-th waiter frees: the sends beyond the
/// limit must age out, then one per waiter before it. A slot past the
/// sends known now is one a waiter before it takes when it frees, which
/// frees an hour after that.
fn slot_frees_in(oldest_first: &[Duration], limit: usize, place: usize) -> Duration {
    let sent = oldest_first.len();
    let mut slot = sent - limit + place;
    let mut hours_later = 0u32;
    while slot >= sent {
        slot -= limit;
        hours_later += 1;
    }
    (BREAKER_WINDOW - oldest_first[slot]).saturating_add(BREAKER_WINDOW * hours_later)
}

/// A first send the breaker holds: `Pending`, the reason naming the limit,
/// the count and both ways out, a Warning Event when the hold begins, and
/// back when the hour frees its slot. It waits no longer than that: the
/// breaker holds, it never drops.
pub fn breaker_open(view: &View, held: &Held, machine_id: &str) -> Transition {
    let tenant = view
        .tenant
        .as_ref()
        .map_or_else(String::new, |t| format!(" to tenant {}", t.tenant_id));
    let message = format!(
        "held by the blast-radius breaker: {sent} new offboards were sent{tenant} within the last hour, and the limit is {limit} an hour (--max-offboards-per-hour, chart value safety.maxOffboardsPerHour). It is sent by itself in {wait}s, when the hour frees a slot. To send it now, annotate it: kubectl annotate deviceoffboard <name> {RELEASE_BREAKER_ANNOTATION}=true (or raise the limit). If these offboards are a mistake, delete the held DeviceOffboards: nothing was sent for them",
        sent = held.sent,
        limit = held.limit,
        wait = held.wait.as_secs() + u64::from(held.wait.subsec_nanos() > 0),
    );
    let newly = ready_reason(view) != Some(Reason::BreakerOpen.as_str());
    let mut status = view.with(
        Phase::Pending,
        Conditions {
            ready: (Reason::BreakerOpen, message.clone()),
            submitted: Submitted::no(
                Reason::NotSubmitted,
                "not sent: held by the blast-radius breaker",
            ),
        },
    );
    // Kept, so the hold does not resolve the device again.
    status.machine_id = Some(machine_id.to_string());
    // A long hold says when it ends, and the cache parks the resource until then.
    status.next_retry_at =
        (held.wait > super::after::SHOW_RETRY_AT_BEYOND).then(|| super::at(view.now, held.wait));
    Transition {
        status,
        note: newly.then_some(Note {
            reason: Reason::BreakerOpen,
            message,
        }),
        requeue: Some(held.wait),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MACHINE, by_id, now, tenant};
    use super::*;
    use crate::crd::DeviceOffboardStatus;
    use crate::offboard::status::{ConditionUpdate, Observed, set_condition};
    use std::collections::BTreeMap;

    const MIN: Duration = Duration::from_secs(60);

    /// The decision's own view, reaching the tenant `contoso` (a hold names it).
    fn view<'a>(
        spec: &'a crate::crd::DeviceOffboardSpec,
        status: &'a DeviceOffboardStatus,
    ) -> View<'a> {
        View {
            tenant: Some(tenant("contoso")),
            ..super::super::tests::view(spec, status)
        }
    }

    fn marks<'a>(created: Option<&'a str>, approved: Option<&'a str>) -> SafetyMarks<'a> {
        SafetyMarks {
            created_by: created,
            approved_by: approved,
            release_breaker: false,
        }
    }

    fn ready_with(reason: Reason) -> DeviceOffboardStatus {
        let mut status = DeviceOffboardStatus {
            phase: Some(Phase::Pending),
            machine_id: Some(MACHINE.into()),
            ..Default::default()
        };
        set_condition(
            &mut status,
            ConditionUpdate {
                type_: READY,
                holds: false,
                reason,
                message: "earlier".into(),
            },
            Observed {
                generation: Some(1),
                now: now(),
            },
        );
        status
    }

    #[test]
    fn the_marks_are_read_from_the_annotations_blank_ones_unset() {
        let annotations: BTreeMap<String, String> = [
            (CREATED_BY_ANNOTATION, " alice@contoso.com "),
            (APPROVED_BY_ANNOTATION, "  "),
            (RELEASE_BREAKER_ANNOTATION, "True"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let read = SafetyMarks::of(Some(&annotations));
        assert_eq!(read.created_by, Some("alice@contoso.com"));
        assert_eq!(read.approved_by, None, "a blank approval is none");
        assert!(read.release_breaker);
        let no: BTreeMap<String, String> =
            [(RELEASE_BREAKER_ANNOTATION.to_string(), "yes".to_string())].into();
        assert!(!SafetyMarks::of(Some(&no)).release_breaker, "only `true`");
        assert_eq!(SafetyMarks::of(None), SafetyMarks::default());
    }

    /// The controller's cache drops annotations it does not read: the
    /// rails' must survive, or no approval or release is ever seen.
    #[test]
    fn the_cache_keeps_the_annotations_the_rails_read() {
        let mut obj = crate::test_kit::offboard("r")
            .device_name("d")
            .comment("c")
            .build();
        obj.metadata.annotations = Some(
            [
                (CREATED_BY_ANNOTATION, "alice"),
                (APPROVED_BY_ANNOTATION, "bob"),
                (RELEASE_BREAKER_ANNOTATION, "true"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        );
        crate::cache::final_label::trim_for_cache(&mut obj);
        let kept = SafetyMarks::of(obj.metadata.annotations.as_ref());
        assert_eq!(
            kept,
            SafetyMarks {
                created_by: Some("alice"),
                approved_by: Some("bob"),
                release_breaker: true,
            }
        );
        assert_eq!(obj.metadata.annotations.unwrap().len(), 3);
    }

    #[test]
    fn approval_needs_a_creator_and_someone_else_approving() {
        let rows: [(&str, SafetyMarks, Result<(), &str>); 5] = [
            (
                "approved by another",
                marks(Some("alice"), Some("bob")),
                Ok(()),
            ),
            (
                "not approved",
                marks(Some("alice"), None),
                Err("someone other than its creator alice"),
            ),
            (
                "self-approved",
                marks(Some("alice"), Some("alice")),
                Err("names the creator alice"),
            ),
            (
                "no creator named",
                marks(None, Some("bob")),
                Err("no defender.offboard.dev/created-by"),
            ),
            (
                "nothing",
                marks(None, None),
                Err("no defender.offboard.dev/created-by"),
            ),
        ];
        for (name, marks, expected) in rows {
            match (approval(&marks), expected) {
                (Ok(()), Ok(())) => {}
                (Err(why), Err(part)) => assert!(why.contains(part), "{name}: {why}"),
                (got, _) => panic!("{name}: {got:?}, expected {expected:?}"),
            }
        }
    }

    /// With approvals required, every plan that leads to an MDE call on the
    /// way to a send waits instead; what finishes a recorded send does not.
    #[test]
    fn an_unapproved_resource_plans_no_mde_call() {
        let spec = by_id();
        let status = DeviceOffboardStatus::default();
        let v = view(&spec, &status);
        let on = Settings {
            require_approval: true,
            ..Settings::default()
        };
        let submit = Plan::Submit {
            machine_id: MACHINE.into(),
            check_machine: true,
        };
        let resolve = Plan::Resolve {
            device_name: "pc-1".into(),
            check_node: false,
        };
        let confirm = Plan::ConfirmMachine {
            machine_id: MACHINE.into(),
        };
        let look_up = Plan::LookUp {
            machine_id: MACHINE.into(),
            proves_absence: true,
        };
        let cancel = Plan::Cancel {
            action_id: "a".into(),
            reason: "no".into(),
        };
        let idle = Plan::Idle { requeue: None };
        let unapproved = marks(Some("alice"), None);
        let approved = marks(Some("alice"), Some("bob"));
        let waits = |plan: &Plan| match plan {
            Plan::Write(t) => {
                condition(&t.status, READY).unwrap().reason == "AwaitingApproval"
                    && t.status.phase == Some(Phase::Pending)
            }
            _ => false,
        };
        for plan in [&submit, &resolve, &confirm] {
            assert!(
                waits(&guard(plan.clone(), &v, &unapproved, &on)),
                "{plan:?}"
            );
            assert_eq!(&guard(plan.clone(), &v, &approved, &on), plan);
            let off = Settings::default();
            assert_eq!(&guard(plan.clone(), &v, &unapproved, &off), plan, "off");
        }
        for plan in [&look_up, &cancel, &idle] {
            assert_eq!(&guard(plan.clone(), &v, &unapproved, &on), plan, "{plan:?}");
        }
    }

    #[test]
    fn waiting_for_approval_is_told_once_per_reason() {
        let spec = by_id();
        let fresh = DeviceOffboardStatus::default();
        let first = awaiting_approval(&view(&spec, &fresh), "waiting for bob".into());
        assert_eq!(
            first.note.as_ref().unwrap().reason,
            Reason::AwaitingApproval
        );
        assert_eq!(first.requeue, None, "waits for the annotation, not a time");
        let again = awaiting_approval(&view(&spec, &first.status), "waiting for bob".into());
        assert_eq!(again.note, None);
        assert_eq!(again.status, first.status, "nothing new to write");
        let changed = awaiting_approval(&view(&spec, &first.status), "self-approved".into());
        assert!(changed.note.is_some());
    }

    #[test]
    fn the_breaker_holds_first_sends_beyond_the_limit_until_the_hour_frees_a_slot() {
        use BreakerCheck::{Hold, Pass};
        use SendKind::{Again, First};
        let ages = |mins: &[u64]| mins.iter().map(|m| MIN * *m as u32).collect::<Vec<_>>();
        let held = |sent, wait| {
            Hold(Held {
                limit: 3,
                sent,
                wait,
            })
        };
        struct Row {
            name: &'static str,
            limit: u32,
            send: SendKind,
            released: bool,
            ages: Vec<Duration>,
            place: usize,
            expected: BreakerCheck,
        }
        let row = |name, limit, send, released, ages, place, expected| Row {
            name,
            limit,
            send,
            released,
            ages,
            place,
            expected,
        };
        let rows = [
            row(
                "under the limit",
                3,
                First,
                false,
                ages(&[5, 10]),
                0,
                Pass { counted: true },
            ),
            row(
                "at the limit: the oldest frees first",
                3,
                First,
                false,
                ages(&[5, 50, 10]),
                0,
                held(3, MIN * 10),
            ),
            row(
                "second in line: the next oldest",
                3,
                First,
                false,
                ages(&[5, 50, 10]),
                1,
                held(3, MIN * 50),
            ),
            row(
                "beyond every known send: an hour after a slot taken",
                3,
                First,
                false,
                ages(&[5, 50, 10]),
                3,
                held(3, MIN * 70),
            ),
            row(
                "sends an hour old no longer count",
                3,
                First,
                false,
                ages(&[60, 61, 5, 10]),
                0,
                Pass { counted: true },
            ),
            row(
                "released: passes and counts",
                3,
                First,
                true,
                ages(&[5, 50, 10]),
                0,
                Pass { counted: true },
            ),
            row(
                "more than the limit (released ones): wait for the excess",
                3,
                First,
                false,
                ages(&[5, 50, 10, 20]),
                0,
                held(4, MIN * 40),
            ),
            row(
                "a resend is not a new send",
                3,
                Again,
                false,
                ages(&[5, 50, 10]),
                0,
                Pass { counted: false },
            ),
            row(
                "off",
                0,
                First,
                false,
                ages(&[1, 2, 3]),
                0,
                Pass { counted: false },
            ),
        ];
        for r in rows {
            assert_eq!(
                breaker(r.limit, r.send, r.released, &r.ages, r.place),
                r.expected,
                "{}",
                r.name
            );
        }
    }

    #[test]
    fn a_hold_names_the_limit_the_count_and_the_ways_out_and_warns_once() {
        let spec = by_id();
        let fresh = DeviceOffboardStatus::default();
        let held = Held {
            limit: 10,
            sent: 10,
            wait: Duration::from_secs(1200),
        };
        let first = breaker_open(&view(&spec, &fresh), &held, MACHINE);
        let ready = condition(&first.status, READY).unwrap();
        assert_eq!(ready.reason, "BreakerOpen");
        for part in [
            "10 new offboards were sent to tenant contoso",
            "the limit is 10 an hour",
            "--max-offboards-per-hour",
            "safety.maxOffboardsPerHour",
            "defender.offboard.dev/release-breaker=true",
            "in 1200s",
        ] {
            assert!(ready.message.contains(part), "{part}: {}", ready.message);
        }
        assert_eq!(first.status.phase, Some(Phase::Pending));
        assert_eq!(first.status.machine_id.as_deref(), Some(MACHINE));
        assert_eq!(first.requeue, Some(held.wait), "back when the slot frees");
        assert_eq!(
            first.status.next_retry_at.as_ref().map(|t| t.0),
            Some(now() + jiff::SignedDuration::from_secs(1200))
        );
        let note = first.note.expect("an Event when the hold begins");
        assert!(note.reason.is_warning());
        let again = breaker_open(&view(&spec, &first.status), &held, MACHINE);
        assert_eq!(again.note, None, "one Event per hold");
    }

    /// A held resource's hold ends at once with the release annotation (it
    /// would otherwise wait out its `nextRetryAt`), and only a held one.
    #[test]
    fn the_release_annotation_ends_a_hold_at_once() {
        let spec = by_id();
        let held = ready_with(Reason::BreakerOpen);
        let budget = ready_with(Reason::WaitingForBudget);
        let released = SafetyMarks {
            release_breaker: true,
            ..SafetyMarks::default()
        };
        let idle = Plan::Idle { requeue: Some(MIN) };
        let s = Settings::default();
        assert_eq!(
            guard(idle.clone(), &view(&spec, &held), &released, &s),
            Plan::Submit {
                machine_id: MACHINE.into(),
                check_machine: true
            }
        );
        assert_eq!(
            guard(
                idle.clone(),
                &view(&spec, &held),
                &SafetyMarks::default(),
                &s
            ),
            idle
        );
        assert_eq!(
            guard(idle.clone(), &view(&spec, &budget), &released, &s),
            idle,
            "the budget's wait is MDE's"
        );
        // Released but not approved: still waits for the approval.
        let both = Settings {
            require_approval: true,
            ..Settings::default()
        };
        assert!(matches!(
            guard(idle, &view(&spec, &held), &released, &both),
            Plan::Write(_)
        ));
    }
}
