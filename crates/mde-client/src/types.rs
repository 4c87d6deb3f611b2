//! MDE's wire types. Every field MDE documents is here; unknown fields are ignored
//! so that MDE adding one never breaks the operator.

use serde::{Deserialize, Deserializer, Serialize};

/// `null` reads as the type's default (MDE sends `"machineTags": null`).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A field no decision reads, as MDE sent it, or `None` when it is `null` or
/// of another type than documented (`rbacGroupId` as a string, `osBuild` as
/// text): such a change must not make the whole machine or action unreadable.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

/// `machineTags`: a list of strings as documented; `null` or missing is no
/// tag, a lone string is one tag, and an entry that is not text is dropped,
/// so a changed shape never makes the machine unreadable.
fn tags<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: Deserializer<'de>,
{
    use serde_json::Value;
    Ok(match Value::deserialize(deserializer)? {
        Value::Array(entries) => entries
            .into_iter()
            .filter_map(|entry| match entry {
                Value::String(tag) => Some(tag),
                _ => None,
            })
            .collect(),
        Value::String(tag) => vec![tag],
        _ => Vec::new(),
    })
}

/// An action's `status` as MDE sent it. A status that is `null`, missing or
/// not a string is read as an unknown status ([`ActionStatus::Other`] holding
/// the JSON text, `"null"` when missing) rather than failing the whole page
/// around it: unknown is never final, so the action is polled on and proves
/// nothing (not ended, not failed, not succeeded) until MDE names a status.
fn status_or_unknown<'de, D>(deserializer: D) -> Result<ActionStatus, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(word) => ActionStatus::from_word(&word),
        other => ActionStatus::Other(other.to_string()),
    })
}

fn missing_status() -> ActionStatus {
    ActionStatus::Other(serde_json::Value::Null.to_string())
}

/// A device in MDE (`GET /api/machines`). The fields a decision reads (id,
/// name, platform, health, onboarding, last seen, VM, tags) are read as
/// documented, `null` as absent; the rest are read leniently ([`lenient`]).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Machine {
    pub id: String,
    pub computer_dns_name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub os_platform: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub os_version: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub os_processor: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub version: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub os_build: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub last_ip_address: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub last_external_ip_address: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub agent_version: Option<String>,
    pub health_status: Option<String>,
    pub onboarding_status: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub device_value: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub rbac_group_id: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub rbac_group_name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub risk_score: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub exposure_level: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub is_aad_joined: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub aad_device_id: Option<String>,
    #[serde(deserialize_with = "tags")]
    pub machine_tags: Vec<String>,
    /// Azure VMs: the VM MDE saw the device on (what a Node's
    /// `spec.providerID` and `systemUUID` name).
    pub vm_metadata: Option<VmMetadata>,
}

/// `vmMetadata` of a machine on a cloud VM.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct VmMetadata {
    pub vm_id: Option<String>,
    pub resource_id: Option<String>,
    pub subscription_id: Option<String>,
    pub cloud_provider: Option<String>,
}

/// MDE's status of a machine action. The last four are final.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ActionStatus {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    TimeOut,
    Cancelled,
    /// A word MDE may add later; treated as not final so nothing is lost.
    #[serde(untagged)]
    Other(String),
}

impl ActionStatus {
    /// Final statuses never change again; polling stops there.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ActionStatus::Succeeded
                | ActionStatus::Failed
                | ActionStatus::TimeOut
                | ActionStatus::Cancelled
        )
    }

    /// MDE's word back as a status (an unknown word is kept as [`ActionStatus::Other`]).
    pub fn from_word(word: &str) -> Self {
        [
            ActionStatus::Pending,
            ActionStatus::InProgress,
            ActionStatus::Succeeded,
            ActionStatus::Failed,
            ActionStatus::TimeOut,
            ActionStatus::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == word)
        .unwrap_or_else(|| ActionStatus::Other(word.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            ActionStatus::Pending => "Pending",
            ActionStatus::InProgress => "InProgress",
            ActionStatus::Succeeded => "Succeeded",
            ActionStatus::Failed => "Failed",
            ActionStatus::TimeOut => "TimeOut",
            ActionStatus::Cancelled => "Cancelled",
            ActionStatus::Other(word) => word,
        }
    }
}

impl std::fmt::Display for ActionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A machine action (`GET /api/machineactions`), e.g. the one an offboard
/// creates. What a decision reads (id, type, status, machine, comments,
/// times) is read as documented, `null` as absent; the rest leniently.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MachineAction {
    pub id: String,
    #[serde(rename = "type")]
    pub action_type: String,
    #[serde(default = "missing_status", deserialize_with = "status_or_unknown")]
    pub status: ActionStatus,
    pub machine_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub scope: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub requestor: Option<String>,
    #[serde(default, rename = "externalID", deserialize_with = "lenient")]
    pub external_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub request_source: Option<String>,
    #[serde(default)]
    pub commands: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub cancellation_requestor: Option<String>,
    #[serde(default)]
    pub requestor_comment: Option<String>,
    #[serde(default)]
    pub cancellation_comment: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub computer_dns_name: Option<String>,
    #[serde(default)]
    pub creation_date_time_utc: Option<String>,
    #[serde(default)]
    pub cancellation_date_time_utc: Option<String>,
    #[serde(default)]
    pub last_update_date_time_utc: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub title: Option<String>,
    #[serde(default)]
    pub related_file_info: Option<serde_json::Value>,
}

impl MachineAction {
    /// An offboard action as a resource's status records it (id, machine,
    /// MDE's status word), for code that knows no more of it.
    pub fn recorded_offboard(id: &str, machine_id: &str, status: ActionStatus) -> Self {
        MachineAction {
            machine_id: Some(machine_id.to_string()),
            ..Self::bare(id.to_string(), "Offboard".to_string(), status)
        }
    }

    /// An action with only its id, type and status known.
    fn bare(id: String, action_type: String, status: ActionStatus) -> Self {
        MachineAction {
            id,
            action_type,
            status,
            machine_id: None,
            scope: None,
            requestor: None,
            external_id: None,
            request_source: None,
            commands: None,
            cancellation_requestor: None,
            requestor_comment: None,
            cancellation_comment: None,
            computer_dns_name: None,
            creation_date_time_utc: None,
            cancellation_date_time_utc: None,
            last_update_date_time_utc: None,
            title: None,
            related_file_info: None,
        }
    }
}

/// What a poll window keeps of each machine action: a window answers with
/// every offboard in flight (10,000 in one page), and the poll reads only
/// these, so the rest of each action (title, DNS name, requestor, commands...)
/// is not held in memory 10,000 times per interval.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WindowAction {
    id: String,
    #[serde(rename = "type")]
    action_type: String,
    #[serde(default = "missing_status", deserialize_with = "status_or_unknown")]
    status: ActionStatus,
    machine_id: Option<String>,
    #[serde(default)]
    requestor_comment: Option<String>,
    #[serde(default)]
    cancellation_comment: Option<String>,
    #[serde(default)]
    creation_date_time_utc: Option<String>,
}

impl From<WindowAction> for MachineAction {
    fn from(kept: WindowAction) -> Self {
        MachineAction {
            machine_id: kept.machine_id,
            requestor_comment: kept.requestor_comment,
            cancellation_comment: kept.cancellation_comment,
            creation_date_time_utc: kept.creation_date_time_utc,
            ..Self::bare(kept.id, kept.action_type, kept.status)
        }
    }
}

/// One page of an OData collection.
#[derive(Deserialize, Debug)]
pub struct ODataPage<T> {
    pub value: Vec<T>,
    #[serde(rename = "@odata.nextLink", default)]
    pub next_link: Option<String>,
}

/// One page of an OData collection read entry by entry: an entry that does
/// not read as `T` at all (no `id`, a field of the wrong type, not an object)
/// is left out and counted instead of failing the page. Whoever reads the
/// page decides what the count means: a list that left an entry out is not
/// complete, so it may show that something is present, never that it is absent.
#[derive(Debug)]
pub(crate) struct CountedPage<T> {
    pub items: Vec<T>,
    /// Entries left out because they did not read.
    pub unreadable: usize,
    pub next_link: Option<String>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for CountedPage<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Either `T`, or anything else (kept as nothing).
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Entry<T> {
            Read(T),
            Unreadable(serde::de::IgnoredAny),
        }
        #[derive(Deserialize)]
        struct Page<T> {
            value: Vec<Entry<T>>,
            #[serde(rename = "@odata.nextLink", default)]
            next_link: Option<String>,
        }
        let page = Page::<T>::deserialize(deserializer)?;
        let mut items = Vec::with_capacity(page.value.len());
        let mut unreadable = 0;
        for entry in page.value {
            match entry {
                Entry::Read(item) => items.push(item),
                Entry::Unreadable(_) => unreadable += 1,
            }
        }
        Ok(CountedPage {
            items,
            unreadable,
            next_link: page.next_link,
        })
    }
}

/// MDE's error body: `{"error": {"code", "message", "target"}}`.
#[derive(Deserialize, Debug, Default)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
}

#[derive(Deserialize, Debug, Default)]
pub struct ErrorDetail {
    #[serde(default, deserialize_with = "null_as_default")]
    pub code: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub message: String,
    /// The correlation id Microsoft support asks for, unchecked (see
    /// [`crate::error::request_id`] before showing it).
    #[serde(default, deserialize_with = "lenient")]
    pub target: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_round_trip() {
        for word in [
            "Pending",
            "InProgress",
            "Succeeded",
            "Failed",
            "TimeOut",
            "Cancelled",
            "Queued",
        ] {
            let parsed = ActionStatus::from_word(word);
            assert_eq!(parsed.as_str(), word);
            let via_serde: ActionStatus = serde_json::from_value(serde_json::json!(word)).unwrap();
            assert_eq!(parsed, via_serde);
        }
    }

    #[test]
    fn nulls_read_as_absent() {
        let machine: Machine = serde_json::from_value(serde_json::json!({
            "id": "0a1b", "computerDnsName": "pc-1", "machineTags": null, "lastSeen": null,
            "osPlatform": null, "osBuild": null, "rbacGroupId": null, "isAadJoined": null
        }))
        .unwrap();
        assert!(machine.machine_tags.is_empty() && machine.last_seen.is_none());
        let action: MachineAction = serde_json::from_value(serde_json::json!({
            "id": "a", "type": "Offboard", "status": "Pending", "machineId": "0a1b",
            "scope": null, "requestor": null, "externalID": null, "requestSource": null,
            "commands": null, "cancellationRequestor": null, "requestorComment": null,
            "cancellationComment": null, "computerDnsName": null, "creationDateTimeUtc": null,
            "cancellationDateTimeUtc": null, "lastUpdateDateTimeUtc": null, "title": null,
            "relatedFileInfo": null
        }))
        .unwrap();
        assert!(action.requestor_comment.is_none());
        let error: ErrorBody =
            serde_json::from_value(serde_json::json!({"error": {"code": null, "message": "m"}}))
                .unwrap();
        assert_eq!(
            (error.error.code.as_str(), error.error.message.as_str()),
            ("", "m")
        );
    }

    #[test]
    fn a_page_with_a_null_status_among_good_ones_reads_whole() {
        let page = serde_json::json!({"value": [
            {"id": "a1", "type": "Offboard", "status": "Pending", "machineId": "m"},
            {"id": "a2", "type": "Offboard", "status": null, "machineId": "m"},
            {"id": "a3", "type": "Offboard", "machineId": "m"},
            {"id": "a4", "type": "Offboard", "status": 3, "machineId": "m"},
            {"id": "a5", "type": "Offboard", "status": "Succeeded", "machineId": "m"},
        ]});
        let full: ODataPage<MachineAction> = serde_json::from_value(page.clone()).unwrap();
        let window: ODataPage<WindowAction> = serde_json::from_value(page).unwrap();
        let window: Vec<MachineAction> = window.value.into_iter().map(Into::into).collect();
        for actions in [full.value, window] {
            let statuses: Vec<(&str, bool)> = actions
                .iter()
                .map(|a| (a.status.as_str(), a.status.is_final()))
                .collect();
            assert_eq!(
                statuses,
                [
                    ("Pending", false),
                    ("null", false),
                    ("null", false),
                    ("3", false),
                    ("Succeeded", true)
                ]
            );
        }
    }

    #[test]
    fn an_entry_that_does_not_read_is_counted_not_fatal() {
        let page: CountedPage<WindowAction> = serde_json::from_value(serde_json::json!({
            "value": [
                {"id": "a1", "type": "Offboard", "status": "Pending", "machineId": "m"},
                {"type": "Offboard", "status": "Pending", "machineId": "m"},
                {"id": 7, "type": "Offboard", "status": "Pending"},
                {"id": "a4", "type": "Offboard", "requestorComment": ["not", "text"]},
                "not an action",
                {"id": "a6", "type": "Offboard", "status": null, "machineId": null},
            ],
            "@odata.nextLink": "https://api.security.microsoft.com/api/machineactions?$skip=6"
        }))
        .unwrap();
        let ids: Vec<String> = page
            .items
            .into_iter()
            .map(|a| MachineAction::from(a).id)
            .collect();
        assert_eq!(ids, ["a1", "a6"]);
        assert_eq!(page.unreadable, 4);
        assert!(page.next_link.is_some());
        let broken =
            serde_json::from_value::<CountedPage<WindowAction>>(serde_json::json!({"value": 3}));
        assert!(broken.is_err(), "a page that is not a page still fails");
    }

    #[test]
    fn all_six_statuses_parse_and_four_are_final() {
        for (word, is_final) in [
            ("Pending", false),
            ("InProgress", false),
            ("Succeeded", true),
            ("Failed", true),
            ("TimeOut", true),
            ("Cancelled", true),
        ] {
            let status: ActionStatus = serde_json::from_value(serde_json::json!(word)).unwrap();
            assert_eq!(status.as_str(), word);
            assert_eq!(status.is_final(), is_final, "{word}");
        }
        let unknown: ActionStatus = serde_json::from_value(serde_json::json!("Queued")).unwrap();
        assert_eq!(unknown, ActionStatus::Other("Queued".into()));
        assert!(!unknown.is_final());
    }

    /// A type changed at MDE in a field no decision reads leaves the machine
    /// readable, the decision fields intact and the odd field absent; the
    /// tags read whatever their shape.
    #[test]
    fn a_machine_with_an_odd_type_in_a_field_no_decision_reads_still_reads() {
        use serde_json::json;
        let base = json!({
            "id": "0a1b", "computerDnsName": "pc-1.contoso.com", "osPlatform": "Windows11",
            "healthStatus": "Active", "onboardingStatus": "Onboarded",
            "lastSeen": "2026-05-01T00:00:00Z", "machineTags": ["finance"],
            "vmMetadata": {"vmId": "vm-1", "cloudProvider": "Azure"}
        });
        type Check = fn(&Machine) -> bool;
        let cases: [(&str, serde_json::Value, Check); 14] = [
            ("rbacGroupId", json!("42"), |m| m.rbac_group_id.is_none()),
            ("rbacGroupId", json!({"id": 42}), |m| {
                m.rbac_group_id.is_none()
            }),
            ("rbacGroupId", json!(42), |m| m.rbac_group_id == Some(42)),
            ("osBuild", json!("19045"), |m| m.os_build.is_none()),
            ("exposureLevel", json!(3), |m| m.exposure_level.is_none()),
            ("riskScore", json!(["High"]), |m| m.risk_score.is_none()),
            ("isAadJoined", json!("true"), |m| m.is_aad_joined.is_none()),
            ("firstSeen", json!(1767225600), |m| m.first_seen.is_none()),
            ("lastIpAddress", json!({"v4": "10.0.0.1"}), |m| {
                m.last_ip_address.is_none()
            }),
            ("version", json!(2009), |m| m.version.is_none()),
            ("machineTags", json!("finance"), |m| {
                m.machine_tags == ["finance"]
            }),
            ("machineTags", json!(null), |m| m.machine_tags.is_empty()),
            ("machineTags", json!(["a", 7, "b"]), |m| {
                m.machine_tags == ["a", "b"]
            }),
            ("machineTags", json!({"tag": "a"}), |m| {
                m.machine_tags.is_empty()
            }),
        ];
        for (field, odd, expected) in cases {
            let mut json = base.clone();
            json[field] = odd.clone();
            let machine: Machine = serde_json::from_value(json.clone())
                .unwrap_or_else(|e| panic!("{field}: {odd} fails the machine: {e}"));
            assert!(expected(&machine), "{field}: {odd} read as {machine:?}");
            assert_eq!(machine.id, "0a1b", "{field}");
            assert_eq!(
                machine.computer_dns_name.as_deref(),
                Some("pc-1.contoso.com")
            );
            assert_eq!(machine.os_platform.as_deref(), Some("Windows11"));
            assert_eq!(machine.health_status.as_deref(), Some("Active"));
            assert_eq!(machine.onboarding_status.as_deref(), Some("Onboarded"));
            assert_eq!(machine.last_seen.as_deref(), Some("2026-05-01T00:00:00Z"));
            let vm = machine.vm_metadata.clone().expect("vmMetadata read");
            assert_eq!(vm.vm_id.as_deref(), Some("vm-1"));
            // In a page too: the entry is read, not counted as unreadable.
            let page: CountedPage<Machine> =
                serde_json::from_value(json!({"value": [json]})).unwrap();
            assert_eq!(
                (page.items.len(), page.unreadable),
                (1, 0),
                "{field}: {odd}"
            );
        }
        // The decision fields stay strict: no id is no machine.
        let mut no_id = base.clone();
        no_id["id"] = json!(7);
        assert!(serde_json::from_value::<Machine>(no_id).is_err());
    }

    #[test]
    fn an_action_with_an_odd_type_in_a_field_no_decision_reads_still_reads() {
        use serde_json::json;
        let action: MachineAction = serde_json::from_value(json!({
            "id": "a1", "type": "Offboard", "status": "Succeeded", "machineId": "0a1b",
            "requestorComment": "[defender-offboard:k] retired",
            "creationDateTimeUtc": "2026-05-01T00:00:00Z",
            "scope": 1, "requestor": {"upn": "x"}, "externalID": 5, "requestSource": [],
            "cancellationRequestor": false, "computerDnsName": 3, "title": {"en": "t"}
        }))
        .unwrap();
        assert_eq!(action.status, ActionStatus::Succeeded);
        assert_eq!(action.machine_id.as_deref(), Some("0a1b"));
        assert!(action.requestor_comment.is_some() && action.creation_date_time_utc.is_some());
        assert!(action.scope.is_none() && action.requestor.is_none() && action.title.is_none());
        assert!(action.external_id.is_none() && action.computer_dns_name.is_none());
    }

    #[test]
    fn machine_action_tolerates_unknown_fields() {
        let action: MachineAction = serde_json::from_value(serde_json::json!({
            "id": "5382f7ea-7557-4ab7-9782-d50480024a4e",
            "type": "Offboard",
            "status": "TimeOut",
            "machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
            "requestorComment": "decommissioned",
            "somethingNew": {"x": 1}
        }))
        .unwrap();
        assert_eq!(action.status, ActionStatus::TimeOut);
        assert_eq!(action.action_type, "Offboard");
    }
}
