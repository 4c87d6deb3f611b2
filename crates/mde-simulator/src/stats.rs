//! Counters that tests and benchmarks read from `GET /_sim/stats` or [`super::SimHandle::stats`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// Machines with more than one offboard action created.
    pub duplicate_offboards: u64,
    /// Machine actions created (of any type).
    pub actions_created: u64,
    /// Actions cancelled through the API.
    pub actions_cancelled: u64,
    /// Offboard calls whose action was created but whose answer was lost.
    pub lost_responses: u64,
    /// 500/503 answers injected by `--fault-error-rate`.
    pub injected_errors: u64,
    /// Access tokens issued.
    pub tokens_issued: u64,
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
