//! Finished resources leave the controller's memory. A `DeviceOffboard` is a
//! record that GitOps repos and pipelines keep for years; the controller must
//! not hold one copy of each in its cache. When a resource turns `Succeeded`
//! or `Failed`, the same status cycle labels it [`FINAL_LABEL`]`=true`, and the
//! controller watches with [`WATCH_SELECTOR`], so the API server drops it from
//! the watch (a `DELETED` event for the cache) while `kubectl get doff` still
//! lists it.
//!
//! The status stays the truth: a resource whose label write was lost (a crash
//! between the two writes) is still final to the decision, and the next
//! reconcile of it only adds the label.

use crate::crd::DeviceOffboard;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// The label of a finished resource.
pub const FINAL_LABEL: &str = "defender.offboard.dev/final";

/// What the controller watches: everything not yet labelled final.
pub const WATCH_SELECTOR: &str = "defender.offboard.dev/final!=true";

/// Whether the status is final.
pub fn is_final(obj: &DeviceOffboard) -> bool {
    obj.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
}

/// Final in status but not yet labelled so.
pub fn needs_label(obj: &DeviceOffboard) -> bool {
    is_final(obj) && obj.labels().get(FINAL_LABEL).map(String::as_str) != Some("true")
}

/// The merge patch that labels a resource final.
pub fn label_patch() -> serde_json::Value {
    json!({ "metadata": { "labels": { FINAL_LABEL: "true" } } })
}

/// Label a final resource (no precondition: it only adds a label, and a
/// final status never changes back).
pub async fn label(
    client: &kube::Client,
    obj: &DeviceOffboard,
) -> Result<DeviceOffboard, kube::Error> {
    let api: Api<DeviceOffboard> =
        Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(super::ports::FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch(&obj.name_any(), &params, &Patch::Merge(&label_patch()))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceOffboardSpec, DeviceOffboardStatus, Phase};

    fn with(phase: Option<Phase>, label: Option<&str>) -> DeviceOffboard {
        let mut obj = DeviceOffboard::new(
            "r",
            DeviceOffboardSpec {
                machine_id: None,
                device_name: Some("d".into()),
                comment: "c".into(),
                ttl_seconds_after_finished: None,
            },
        );
        obj.status = phase.map(|p| DeviceOffboardStatus {
            phase: Some(p),
            ..Default::default()
        });
        if let Some(value) = label {
            obj.labels_mut().insert(FINAL_LABEL.into(), value.into());
        }
        obj
    }

    #[test]
    fn only_final_unlabelled_resources_need_the_label() {
        for (phase, label, needs) in [
            (Some(Phase::Succeeded), None, true),
            (Some(Phase::Failed), None, true),
            (Some(Phase::Failed), Some("false"), true),
            (Some(Phase::Succeeded), Some("true"), false),
            (Some(Phase::InProgress), None, false),
            (Some(Phase::Submitting), None, false),
            (None, None, false),
            // A hand-written label does not make a resource final: the status decides.
            (Some(Phase::Pending), Some("true"), false),
        ] {
            assert_eq!(
                needs_label(&with(phase, label)),
                needs,
                "{phase:?} {label:?}"
            );
        }
    }

    #[test]
    fn the_selector_leaves_out_exactly_the_label() {
        assert_eq!(WATCH_SELECTOR, format!("{FINAL_LABEL}!=true"));
        assert_eq!(label_patch()["metadata"]["labels"][FINAL_LABEL], "true");
    }
}
