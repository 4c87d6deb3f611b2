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
//! reconcile of it only adds the label; a label on a resource whose status is
//! not final was not the operator's and is removed ([`super::stray_label`]).

use crate::crd::DeviceOffboard;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// The label of a finished resource.
pub const FINAL_LABEL: &str = "defender.offboard.dev/final";

/// The UTC hour (`YYYYMMDDHH`) in which a resource was labelled final, set
/// with [`FINAL_LABEL`]. Labelling comes after the send, so a resource sent
/// within the budget's window was labelled in one of the last few hours: the
/// budget seed at start reads only those ([`recent_hours_selector`]), not a
/// cluster's whole history.
pub const FINAL_HOUR_LABEL: &str = "defender.offboard.dev/final-hour";

/// The [`FINAL_HOUR_LABEL`] value for `at`.
pub fn final_hour(at: jiff::Timestamp) -> String {
    at.strftime("%Y%m%d%H").to_string()
}

/// Labelled final in an hour from `since` to `until` (both included).
pub fn recent_hours_selector(since: jiff::Timestamp, until: jiff::Timestamp) -> String {
    let mut hours = Vec::new();
    let mut at = since;
    // Steps of at most an hour: every hour between is hit.
    loop {
        hours.push(final_hour(at));
        if at >= until {
            break;
        }
        at = at
            .saturating_add(jiff::SignedDuration::from_hours(1))
            .unwrap_or(until)
            .min(until);
    }
    hours.dedup();
    format!(
        "{FINAL_LABEL}=true,{FINAL_HOUR_LABEL} in ({})",
        hours.join(",")
    )
}

/// Labelled final by a version that wrote no hour: read whole by the seed.
pub const LABELLED_WITHOUT_HOUR_SELECTOR: &str =
    "defender.offboard.dev/final=true,!defender.offboard.dev/final-hour";

/// What the controller watches: everything not yet labelled final.
pub const WATCH_SELECTOR: &str = "defender.offboard.dev/final!=true";

/// Exactly the resources [`WATCH_SELECTOR`] leaves out: the labelled ones,
/// watched for a label the operator did not write (see [`super::stray_label`]).
pub const LABELLED_SELECTOR: &str = "defender.offboard.dev/final=true";

/// The longest cancel reason kept (and sent to MDE as the cancel's
/// comment), in characters: MDE's comments are short, and an annotation may
/// hold 256 KiB that the cache would otherwise keep for every resource.
pub const MAX_CANCEL_REASON: usize = crate::crd::MAX_COMMENT_LEN;

/// The annotations the decision reads: the cancel and the safety rails'.
pub const KEPT_ANNOTATIONS: [&str; 4] = [
    crate::crd::CANCEL_ANNOTATION,
    crate::crd::RELEASE_BREAKER_ANNOTATION,
    crate::crd::CREATED_BY_ANNOTATION,
    crate::crd::APPROVED_BY_ANNOTATION,
];

/// Drop what the controller never reads before an object enters its cache:
/// `managedFields` (one entry per writer), and every annotation but the
/// ones a decision reads ([`KEPT_ANNOTATIONS`]: `kubectl apply`'s copy of
/// the manifest, and whatever else anyone who may write the resource puts
/// there: up to 256 KiB each), whose values are cut to
/// [`MAX_CANCEL_REASON`] characters (a cut name only ever makes two names
/// look alike, which holds an approval back, never lets one through). Everything the
/// decision reads stays; status writes need only the resourceVersion, which
/// stays too.
pub fn trim_for_cache(obj: &mut DeviceOffboard) {
    obj.metadata.managed_fields = None;
    if let Some(annotations) = obj.metadata.annotations.as_mut() {
        annotations.retain(|key, _| KEPT_ANNOTATIONS.contains(&key.as_str()));
        for value in annotations.values_mut() {
            if let Some((cut, _)) = value.char_indices().nth(MAX_CANCEL_REASON) {
                value.truncate(cut);
            }
        }
        if annotations.is_empty() {
            obj.metadata.annotations = None;
        }
    }
}

/// Whether the status is final.
pub fn is_final(obj: &DeviceOffboard) -> bool {
    obj.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
}

/// Labelled final: outside the controller's watch.
pub fn is_labelled_final(obj: &DeviceOffboard) -> bool {
    obj.labels().get(FINAL_LABEL).map(String::as_str) == Some("true")
}

/// Final in status but not yet labelled so.
pub fn needs_label(obj: &DeviceOffboard) -> bool {
    is_final(obj) && !is_labelled_final(obj)
}

/// The merge patch that labels a resource final, with the resourceVersion
/// the status was read at as a precondition.
pub fn label_patch(resource_version: Option<&str>, now: jiff::Timestamp) -> serde_json::Value {
    json!({ "metadata": { "resourceVersion": resource_version,
        "labels": { FINAL_LABEL: "true", FINAL_HOUR_LABEL: final_hour(now) } } })
}

/// Label a final resource. The patch goes by name, so it carries the
/// resourceVersion of the object whose status is final: without it, a
/// resource deleted and applied again under the same name in between (a
/// GitOps prune and re-apply) would get the label, leave the watch and never
/// be offboarded. A 409 means the object changed; its next reconcile labels
/// it if it is still final.
pub async fn label(
    client: &kube::Client,
    obj: &DeviceOffboard,
) -> Result<DeviceOffboard, kube::Error> {
    let api: Api<DeviceOffboard> =
        Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = label_patch(obj.resource_version().as_deref(), jiff::Timestamp::now());
    api.patch(&obj.name_any(), &params, &Patch::Merge(&patch))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubectl apply` keeps on every object: a copy of the whole manifest.
    const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
    use crate::crd::Phase;
    use crate::test_kit;

    #[test]
    fn the_cache_keeps_what_the_controller_reads() {
        let mut obj = with(None, None);
        obj.metadata.resource_version = Some("7".into());
        obj.metadata.managed_fields = Some(vec![Default::default(), Default::default()]);
        obj.metadata.annotations = Some(
            [
                (
                    LAST_APPLIED.to_string(),
                    "{\"big\":\"manifest\"}".to_string(),
                ),
                (
                    crate::crd::CANCEL_ANNOTATION.to_string(),
                    "wrong device".to_string(),
                ),
            ]
            .into(),
        );
        obj.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("team.example/notes".into(), "x".repeat(256 * 1024));
        // The safety rails' annotations: the breaker's release and the
        // two-person rule's names.
        let rails = [
            (crate::crd::RELEASE_BREAKER_ANNOTATION, "true"),
            (crate::crd::CREATED_BY_ANNOTATION, "alice@contoso.com"),
            (crate::crd::APPROVED_BY_ANNOTATION, "bob@contoso.com"),
        ];
        for (key, value) in rails {
            obj.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(key.into(), value.into());
        }
        let before = obj.clone();
        trim_for_cache(&mut obj);
        assert_eq!(obj.metadata.managed_fields, None);
        let annotations = obj.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.keys().map(String::as_str).collect::<Vec<_>>(),
            {
                let mut kept = KEPT_ANNOTATIONS.to_vec();
                kept.sort();
                kept
            },
            "only the annotations the decision reads"
        );
        assert_eq!(annotations[crate::crd::CANCEL_ANNOTATION], "wrong device");
        for (key, value) in rails {
            assert_eq!(annotations[key], value, "{key}");
        }
        // The rails read the same from the cached copy as from the object.
        use crate::crd::SafetyMarks;
        let marks = SafetyMarks::of(obj.metadata.annotations.as_ref());
        assert_eq!(marks, SafetyMarks::of(before.metadata.annotations.as_ref()));
        assert_eq!(
            marks,
            SafetyMarks {
                created_by: Some("alice@contoso.com"),
                approved_by: Some("bob@contoso.com"),
                release_breaker: true,
            }
        );
        // A value of any size is kept at MDE's comment length.
        let mut long = before.clone();
        for key in KEPT_ANNOTATIONS {
            long.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(key.into(), "é".repeat(300 * 1024));
        }
        trim_for_cache(&mut long);
        let long = long.metadata.annotations.unwrap();
        for key in KEPT_ANNOTATIONS {
            assert_eq!(long[key].chars().count(), MAX_CANCEL_REASON, "{key}");
        }
        assert_eq!(obj.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(
            (obj.spec.clone(), obj.status.clone()),
            (before.spec, before.status)
        );
    }

    /// The seed's selector names every hour from the first to the last.
    #[test]
    fn recent_hours_cover_the_whole_span() {
        let at = |t: &str| t.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(
            recent_hours_selector(at("2026-12-07T11:59:30Z"), at("2026-12-07T13:05:00Z")),
            "defender.offboard.dev/final=true,defender.offboard.dev/final-hour in (2026120711,2026120712,2026120713)"
        );
        assert_eq!(
            recent_hours_selector(at("2026-12-31T23:10:00Z"), at("2027-01-01T00:20:00Z")),
            "defender.offboard.dev/final=true,defender.offboard.dev/final-hour in (2026123123,2027010100)"
        );
    }

    fn with(phase: Option<Phase>, label: Option<&str>) -> DeviceOffboard {
        let mut obj = test_kit::offboard("r").device_name("d").comment("c");
        if let Some(phase) = phase {
            obj = obj.phase(phase);
        }
        if let Some(value) = label {
            obj = obj.label(FINAL_LABEL, value);
        }
        obj.build()
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
        assert_eq!(LABELLED_SELECTOR, format!("{FINAL_LABEL}=true"));
        let patch = label_patch(Some("41"), "2026-12-07T13:45:00Z".parse().unwrap());
        assert_eq!(patch["metadata"]["labels"][FINAL_HOUR_LABEL], "2026120713");
        assert_eq!(patch["metadata"]["labels"][FINAL_LABEL], "true");
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
    }
}
