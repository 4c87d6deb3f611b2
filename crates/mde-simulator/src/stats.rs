//! Counters that tests and benchmarks read from `GET /_sim/stats` or [`super::SimHandle::stats`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Start of the correlation marker the product puts at the start of an offboard
/// `Comment`: `[defender-offboard:KEY] rest of comment`.
pub const CORRELATION_MARKER: &str = "[defender-offboard:";

/// The `KEY` of a comment that starts with `[defender-offboard:KEY]`; `None` when it
/// does not start so (leading spaces included) or the marker is not closed.
///
/// The simulator parses the marker itself: a double must not share the code it checks.
pub fn correlation_key(comment: &str) -> Option<&str> {
    let rest = comment.strip_prefix(CORRELATION_MARKER)?;
    let end = rest.find(']')?;
    Some(&rest[..end])
}

/// The key an offboard request body counts under: the marker's key, or `""` when
/// the body has no string `Comment` or the comment has no marker.
pub(crate) fn body_correlation_key(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .as_ref()
        .and_then(|v| v.get("Comment"))
        .and_then(serde_json::Value::as_str)
        .and_then(correlation_key)
        .unwrap_or_default()
        .to_owned()
}

/// A snapshot of what the simulator has seen. Same JSON as `GET /_sim/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// API family (`token`, `machines`, `machineactions`, `offboard`, `cancel`, `other`)
    /// → status code (or `dropped` for a closed connection) → count.
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    /// `429 TooManyRequests` answers served.
    pub throttled: u64,
    /// Machine id → offboard actions created for it.
    pub offboard_actions_by_machine: BTreeMap<String, u64>,
    /// Machines with more than one offboard action *created*. A POST that MDE
    /// refuses (e.g. `400 ActiveRequestAlreadyExists`) creates none, so a product
    /// that sends twice can still show 0 here: assert "exactly once" on
    /// [`Self::offboard_requests_by_key`] (and [`Self::offboard_requests_by_machine`]),
    /// which count what was sent.
    pub duplicate_offboards: u64,
    /// Correlation key → offboard POSTs received for it that could have created an
    /// action: every answer except a `429` or `401` refusal, so including
    /// `400 ActiveRequestAlreadyExists`, `403`, `404`, injected `5xx`, lost answers
    /// and dropped connections. The key comes from a marker at the very start of the
    /// `Comment` (`[defender-offboard:KEY] rest of comment`); a comment without one
    /// (or a body without a `Comment`) counts under `""`.
    ///
    /// This is what "each device is offboarded exactly once" must be asserted on:
    /// every key should show 1.
    pub offboard_requests_by_key: BTreeMap<String, u64>,
    /// Machine id (as in the path, lower-cased) → offboard POSTs received for it,
    /// counted like [`Self::offboard_requests_by_key`].
    pub offboard_requests_by_machine: BTreeMap<String, u64>,
    /// Machine id (lower-cased) → offboard POSTs for it that followed an
    /// earlier one with no read in between that showed nothing to adopt:
    /// "at most one POST per machine unless a proving read in between showed
    /// none" is asserted on this being empty. Counted like
    /// [`Self::offboard_requests_by_machine`]. A read proves none when MDE
    /// answered it (not a `404`) after every earlier POST for the machine had
    /// been answered, it listed all it matched in one answer, and it showed
    /// no offboard of the machine that is `Pending` or `InProgress`, nor a
    /// `Succeeded` one the machine was not seen after (a device offboarded
    /// already). It is a list of the machine's actions (`machineId eq`), or
    /// a window of offboards (`creationDateTimeUtc ge T`) from no later than
    /// the machine's first POST for a machine without such a past offboard.
    #[serde(default)]
    pub unproven_offboard_requests_by_machine: BTreeMap<String, u64>,
    /// Machine id → offboard actions created while an earlier offboard of the
    /// machine had `Succeeded` and MDE had not seen the machine since: the
    /// device was offboarded already. One after a `Failed`, `TimeOut` or
    /// `Cancelled` offboard, or after the machine was onboarded again (seen
    /// after the success), is not counted.
    #[serde(default)]
    pub offboarded_again_by_machine: BTreeMap<String, u64>,
    /// When the first offboard POST was received (counted as in
    /// [`Self::offboard_requests_by_key`]), in wall-clock milliseconds since
    /// the simulator started; multiply by the time scale for MDE's time.
    #[serde(default)]
    pub first_offboard_request_ms: Option<u64>,
    /// Offboard POSTs refused before they could create anything: `429` (throttled)
    /// or `401` (missing, invalid, expired or revoked token).
    pub offboard_requests_refused: u64,
    /// Machine actions created (of any type).
    pub actions_created: u64,
    /// Actions cancelled through the API.
    pub actions_cancelled: u64,
    /// Action id → cancel POSTs that reached the action (past the token, the
    /// limits and injected faults), whether MDE cancelled it or refused: where
    /// "one cancel per request" is asserted.
    pub cancel_requests_by_action: BTreeMap<String, u64>,
    /// Offboard calls whose action was created but whose answer was lost.
    pub lost_responses: u64,
    /// 500/503 answers injected by `--fault-error-rate`.
    pub injected_errors: u64,
    /// Access tokens issued.
    pub tokens_issued: u64,
    /// Machine-action lists filtered by `machineId` (one machine's actions,
    /// as the check before a first send reads them).
    #[serde(default)]
    pub machine_action_lists: u64,
}

impl SimStats {
    pub(crate) fn record_request(&mut self, family: &str, status: &str) {
        *self
            .requests
            .entry(family.to_owned())
            .or_default()
            .entry(status.to_owned())
            .or_default() += 1;
        if status == "429" {
            self.throttled += 1;
        }
    }

    pub(crate) fn record_offboard(&mut self, machine_id: &str) {
        self.actions_created += 1;
        let count = self
            .offboard_actions_by_machine
            .entry(machine_id.to_owned())
            .or_default();
        *count += 1;
        if *count == 2 {
            self.duplicate_offboards += 1;
        }
    }

    /// An offboard POST that got past authentication and the rate limits.
    pub(crate) fn record_offboard_request(&mut self, key: &str, machine_id: &str) {
        *self
            .offboard_requests_by_key
            .entry(key.to_owned())
            .or_default() += 1;
        *self
            .offboard_requests_by_machine
            .entry(machine_id.to_ascii_lowercase())
            .or_default() += 1;
    }

    /// Offboard POSTs received under `key` (0 when none).
    pub fn offboard_requests_for_key(&self, key: &str) -> u64 {
        self.offboard_requests_by_key.get(key).copied().unwrap_or(0)
    }

    /// Requests of one family answered with one status (0 when none).
    pub fn count(&self, family: &str, status: &str) -> u64 {
        self.requests
            .get(family)
            .and_then(|by_status| by_status.get(status))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_count_machines_not_actions() {
        let mut s = SimStats::default();
        for id in ["a", "a", "a", "b", "c", "c"] {
            s.record_offboard(id);
        }
        assert_eq!(s.actions_created, 6);
        assert_eq!(s.duplicate_offboards, 2);
        assert_eq!(s.offboard_actions_by_machine["a"], 3);
    }

    #[test]
    fn correlation_markers_are_parsed_from_the_start_only() {
        let key = correlation_key;
        assert_eq!(
            key("[defender-offboard:ns/name/uid] offboarding"),
            Some("ns/name/uid")
        );
        assert_eq!(key("[defender-offboard:k]"), Some("k"));
        assert_eq!(key("[defender-offboard:] x"), Some(""));
        assert_eq!(key(" [defender-offboard:k] x"), None, "not at the start");
        assert_eq!(key("offboarding [defender-offboard:k]"), None);
        assert_eq!(key("[defender-offboard:k unclosed"), None);
        assert_eq!(key("[Defender-Offboard:k] x"), None, "case-sensitive");
        assert_eq!(key("decommissioned"), None);
        let body = |b: &str| body_correlation_key(b.as_bytes());
        assert_eq!(body(r#"{"Comment":"[defender-offboard:a-1] x"}"#), "a-1");
        assert_eq!(body(r#"{"comment":"[defender-offboard:a-1] x"}"#), "");
        assert_eq!(body(r#"{"Comment":7}"#), "");
        assert_eq!(body("not json"), "");
    }

    #[test]
    fn offboard_requests_count_by_key_and_machine() {
        let mut s = SimStats::default();
        s.record_offboard_request("k1", "AB");
        s.record_offboard_request("k1", "ab");
        s.record_offboard_request("", "cd");
        assert_eq!(s.offboard_requests_for_key("k1"), 2);
        assert_eq!(s.offboard_requests_for_key(""), 1);
        assert_eq!(s.offboard_requests_for_key("k2"), 0);
        assert_eq!(s.offboard_requests_by_machine["ab"], 2);
        assert_eq!(s.actions_created, 0, "requests are not actions");
    }

    #[test]
    fn throttled_follows_429s() {
        let mut s = SimStats::default();
        s.record_request("offboard", "201");
        s.record_request("offboard", "429");
        s.record_request("machines", "429");
        assert_eq!(s.throttled, 2);
        assert_eq!(s.count("offboard", "201"), 1);
        assert_eq!(s.count("offboard", "500"), 0);
    }
}
