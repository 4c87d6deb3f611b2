//! Devices that are never offboarded, whatever a manifest asks: the
//! decision's side. The rules (`--protected-tag`, `--protected-name`, a
//! `DefenderConnection`'s `spec.protectedTags` and
//! `spec.protectedNamePatterns`) and the matcher are
//! [`crate::tenants::protection`]'s (docs/operations.md, "Protected devices").
//!
//! It is checked on the record a `deviceName` resolves to, on the record a
//! `machineId` names (read once before the first send, only when some rule
//! applies to the resource's tenant), and again whenever the record is read
//! before a send. A protected record ends the resource `Failed` with reason
//! `DeviceProtected`: nothing is sent.

use super::errors::{Failure, failed, on_error};
use super::resolve::describe;
use super::{Resolution, Settings, Transition, View};
use crate::crd::Phase;
use crate::offboard::status::Reason;
use crate::tenants::protection::protection;
use mde_client::{Machine, MdeError};

/// Whether a resource naming its machine by `spec.machineId` must read the
/// machine's record before its first send: some rule applies, and no record
/// was checked for it yet (`status.resolution` is written once one was).
pub fn needs_check(view: &View, settings: &Settings) -> bool {
    !settings.protection.is_empty()
        && view.status.resolution.is_none()
        && view.status.attempts.unwrap_or(0) == 0
}

/// A protected record was chosen: final, nothing sent. `resolution` is why
/// the record was chosen, kept in the status beside the refusal.
pub fn protected(
    view: &View,
    machine: &Machine,
    why: &str,
    resolution: Option<&str>,
) -> Transition {
    let name = machine.computer_dns_name.as_deref().unwrap_or("no name");
    let message = format!(
        "machine {} ({name}) is protected: {why}; nothing was sent. To offboard it, lift the protection (remove the tag in the Defender portal, or the rule), then create a new DeviceOffboard: this one is final",
        machine.id
    );
    let mut transition = failed(view, Failure::new(Reason::DeviceProtected, message));
    transition.status.machine_id = Some(machine.id.clone());
    if let Some(resolution) = resolution {
        transition.status.resolution = Some(resolution.to_string());
    }
    transition
}

/// The check of a record read before a send: the transition that ends the
/// resource when it is protected, `None` to go on.
pub fn protected_machine(
    view: &View,
    machine: &Machine,
    settings: &Settings,
) -> Option<Transition> {
    let why = protection(machine, &settings.protection)?;
    Some(protected(view, machine, &why, None))
}

/// The record `resolve` chose for `deviceName`, checked: `Some` ends the
/// resource. `records` is the list it was chosen from.
pub(crate) fn protected_choice(
    view: &View,
    records: &[Machine],
    resolution: &Resolution,
    settings: &Settings,
) -> Option<Transition> {
    let machine = records.iter().find(|m| m.id == resolution.machine_id)?;
    let why = protection(machine, &settings.protection)?;
    Some(protected(view, machine, &why, Some(&resolution.why)))
}

/// After reading the record `spec.machineId` names (see [`needs_check`]):
/// the resolution to record before sending, or a transition to write (the
/// record is protected, or could not be read).
// The transition lives for one reconcile; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
pub fn after_machine_read(
    view: &View,
    machine_id: &str,
    result: Result<Machine, MdeError>,
    settings: &Settings,
) -> Result<Resolution, Transition> {
    let machine = result.map_err(|error| on_error(view, &error, Phase::Pending, settings))?;
    if let Some(stop) = protected_machine(view, &machine, settings) {
        return Err(stop);
    }
    Ok(Resolution {
        machine_id: machine_id.to_string(),
        why: format!(
            "spec.machineId names {machine_id} ({}, {}); no protection rule applies",
            machine.computer_dns_name.as_deref().unwrap_or("no name"),
            describe(&machine, view.now)
        ),
    })
}

/// The checked record, written before anything is sent for it:
/// `machineId` and `resolution` set, nothing told (no Event: the record was
/// named, not chosen).
pub fn checked(view: &View, resolution: &Resolution) -> Transition {
    // `after::resolved` without its Event; not called from here, as `after`
    // already reads this module (the rooms rule forbids the circle).
    let mut status = view.status.clone();
    status.machine_id = Some(resolution.machine_id.clone());
    status.resolution = Some(resolution.why.clone());
    status.observed_generation = view.generation;
    status.tenant = view.recorded_tenant();
    Transition {
        status,
        note: None,
        requeue: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MACHINE, by_id, by_name, now, view};
    use super::*;
    use serde_json::json;

    fn machine(name: &str, tags: &[&str]) -> Machine {
        serde_json::from_value(json!({
            "id": MACHINE,
            "computerDnsName": name,
            "machineTags": tags,
        }))
        .unwrap()
    }

    fn guarded() -> Settings {
        Settings {
            protection: crate::tenants::protection::Protection::from_flags(
                &["do-not-offboard".into()],
                &[],
            ),
            ..Settings::default()
        }
    }

    /// A `machineId` costs one read of its record before the first send, and
    /// only when some rule applies; once checked (`status.resolution`), or
    /// once sent, it is not read again for this.
    #[test]
    fn a_machine_id_is_checked_before_its_first_send_only_with_rules() {
        use super::super::{Plan, plan};
        let id = MACHINE;
        let spec = by_id();
        let fresh = crate::crd::DeviceOffboardStatus::default();
        let submit = Plan::Submit {
            machine_id: id.into(),
            check_machine: true,
        };
        assert_eq!(plan(&view(&spec, &fresh), &Settings::default()), submit);
        assert_eq!(
            plan(&view(&spec, &fresh), &guarded()),
            Plan::CheckProtection {
                machine_id: id.into()
            }
        );
        let checked = crate::crd::DeviceOffboardStatus {
            machine_id: Some(id.into()),
            resolution: Some("checked".into()),
            ..Default::default()
        };
        assert_eq!(plan(&view(&spec, &checked), &guarded()), submit);
    }

    /// The record read for a `machineId`: a protected one ends the resource
    /// `Failed/DeviceProtected` with an Event; another is recorded as checked.
    #[test]
    fn a_protected_machine_id_ends_failed_and_another_is_recorded() {
        let id = MACHINE;
        let spec = by_id();
        let status = crate::crd::DeviceOffboardStatus::default();
        let view = view(&spec, &status);
        let stop = after_machine_read(
            &view,
            id,
            Ok(machine("dc", &["DO-NOT-OFFBOARD"])),
            &guarded(),
        )
        .unwrap_err();
        assert_eq!(stop.status.phase, Some(Phase::Failed));
        assert_eq!(stop.status.machine_id.as_deref(), Some(id));
        assert_eq!(
            stop.status.last_error.as_ref().unwrap().code,
            "DeviceProtected"
        );
        assert_eq!(stop.note.as_ref().unwrap().reason, Reason::DeviceProtected);
        assert!(stop.status.machine_action_id.is_none());
        let resolution = after_machine_read(&view, id, Ok(machine("pc", &[])), &guarded()).unwrap();
        assert!(
            resolution.why.contains("no protection rule applies"),
            "{}",
            resolution.why
        );
        let written = checked(&view, &resolution);
        assert_eq!(written.status.resolution, Some(resolution.why));
        assert!(written.note.is_none());
    }

    /// A `deviceName` whose chosen record is protected ends the resource;
    /// a protected stale record that was not chosen does not.
    #[test]
    fn resolution_refuses_a_protected_choice_only() {
        let spec = by_name();
        let name = spec.device_name.clone().unwrap();
        let status = crate::crd::DeviceOffboardStatus::default();
        let view = view(&spec, &status);
        let hour_ago = (now() - jiff::SignedDuration::from_hours(1)).to_string();
        let months_ago = (now() - jiff::SignedDuration::from_hours(24 * 90)).to_string();
        let live = |id: &str, tags: &[&str], seen: &str, health: &str| -> Machine {
            serde_json::from_value(json!({
                "id": id, "computerDnsName": name, "machineTags": tags,
                "onboardingStatus": "Onboarded", "healthStatus": health, "lastSeen": seen,
            }))
            .unwrap()
        };
        let chosen = live("aa01", &["do-not-offboard"], &hour_ago, "Active");
        let stale = live("aa02", &[], &months_ago, "Inactive");
        let stop = super::super::after_resolve(
            &view,
            &name,
            Ok(vec![chosen.clone(), stale.clone()]),
            &guarded(),
        )
        .unwrap_err();
        let ready =
            crate::offboard::status::condition(&stop.status, crate::offboard::status::READY)
                .unwrap();
        assert_eq!(ready.reason, "DeviceProtected");
        assert!(ready.message.contains("aa01") && ready.message.contains("--protected-tag"));
        assert!(
            stop.status
                .resolution
                .as_deref()
                .unwrap()
                .contains("skipped aa02")
        );
        // The old record carries the tag; the live one is chosen and sent for.
        let old_protected = live("aa02", &["do-not-offboard"], &months_ago, "Inactive");
        let fine = live("aa01", &[], &hour_ago, "Active");
        let resolution =
            super::super::after_resolve(&view, &name, Ok(vec![fine, old_protected]), &guarded())
                .unwrap();
        assert_eq!(resolution.machine_id, "aa01");
    }
}
