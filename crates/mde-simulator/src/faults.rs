//! Fault injection decisions, drawn from the simulator's seeded generator so a run
//! with the same seed and the same call order fails the same way.

use std::time::Duration;

use axum::http::StatusCode;
use rand::Rng;
use serde::Deserialize;

use super::config::{
    FaultConfig, LostResponseMode, NextLinkMode, PendingConflictWording, RetryAfterMode,
};

/// How a lost answer is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostResponse {
    /// Close the connection without a response.
    Drop,
    /// Answer `504` after the action was committed.
    GatewayTimeout,
}

/// Whether this call is answered with an injected 500 or 503.
pub fn injected_error(rng: &mut impl Rng, faults: &FaultConfig) -> Option<StatusCode> {
    if faults.error_rate <= 0.0 || !rng.random_bool(faults.error_rate.min(1.0)) {
        return None;
    }
    Some(if rng.random_bool(0.5) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

/// Whether the answer to a committed offboard is lost, and how.
pub fn lost_response(rng: &mut impl Rng, faults: &FaultConfig) -> Option<LostResponse> {
    if faults.lost_response_rate <= 0.0 || !rng.random_bool(faults.lost_response_rate.min(1.0)) {
        return None;
    }
    Some(match faults.lost_response_mode {
        LostResponseMode::Drop => LostResponse::Drop,
        LostResponseMode::GatewayTimeout => LostResponse::GatewayTimeout,
        LostResponseMode::Mixed if rng.random_bool(0.5) => LostResponse::Drop,
        LostResponseMode::Mixed => LostResponse::GatewayTimeout,
    })
}

/// Whether this machine-action list is answered `404` instead of its real answer.
pub fn list_not_found(rng: &mut impl Rng, faults: &FaultConfig) -> bool {
    faults.list_404_rate > 0.0 && rng.random_bool(faults.list_404_rate.min(1.0))
}

/// Body of `POST /_sim/faults`: only the fields present change.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    pub error_rate: Option<f64>,
    #[serde(default, with = "optional_duration")]
    pub latency: Option<Duration>,
    pub lost_response_rate: Option<f64>,
    pub lost_response_mode: Option<LostResponseMode>,
    #[serde(default, with = "optional_duration")]
    pub list_lag: Option<Duration>,
    pub next_link: Option<NextLinkMode>,
    pub retry_after: Option<RetryAfterMode>,
    pub pending_conflict_wording: Option<PendingConflictWording>,
    pub nulls: Option<bool>,
    pub list_404_rate: Option<f64>,
    pub refuse_in: Option<bool>,
}

impl FaultUpdate {
    /// Applies the update, refusing shares outside 0..=1 (naming the field).
    pub fn apply(self, faults: &mut FaultConfig) -> Result<(), String> {
        for (name, value) in [
            ("error_rate", self.error_rate),
            ("lost_response_rate", self.lost_response_rate),
            ("list_404_rate", self.list_404_rate),
        ] {
            if let Some(v) = value
                && !(0.0..=1.0).contains(&v)
            {
                return Err(format!("{name} must be between 0 and 1, got {v}"));
            }
        }
        if let Some(v) = self.error_rate {
            faults.error_rate = v;
        }
        if let Some(v) = self.latency {
            faults.latency = v;
        }
        if let Some(v) = self.lost_response_rate {
            faults.lost_response_rate = v;
        }
        if let Some(v) = self.lost_response_mode {
            faults.lost_response_mode = v;
        }
        if let Some(v) = self.list_lag {
            faults.list_lag = v;
        }
        if let Some(v) = self.next_link {
            faults.next_link = v;
        }
        if let Some(v) = self.retry_after {
            faults.retry_after = v;
        }
        if let Some(v) = self.pending_conflict_wording {
            faults.pending_conflict_wording = v;
        }
        if let Some(v) = self.nulls {
            faults.nulls = v;
        }
        if let Some(v) = self.list_404_rate {
            faults.list_404_rate = v;
        }
        if let Some(v) = self.refuse_in {
            faults.refuse_in = v;
        }
        Ok(())
    }
}

mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "crate::config::humantime_serde_compat")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn rates_are_respected_and_deterministic() {
        let faults = FaultConfig {
            error_rate: 0.3,
            ..FaultConfig::default()
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..1000)
                .map(|_| injected_error(&mut rng, &faults))
                .collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        let hits = a.iter().filter(|e| e.is_some()).count();
        assert!((200..400).contains(&hits), "{hits}");
        assert!(injected_error(&mut StdRng::seed_from_u64(1), &FaultConfig::default()).is_none());
    }

    #[test]
    fn lost_response_follows_the_mode() {
        let mut faults = FaultConfig {
            lost_response_rate: 1.0,
            ..FaultConfig::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(lost_response(&mut rng, &faults), Some(LostResponse::Drop));
        faults.lost_response_mode = LostResponseMode::GatewayTimeout;
        assert_eq!(
            lost_response(&mut rng, &faults),
            Some(LostResponse::GatewayTimeout)
        );
    }

    #[test]
    fn updates_change_only_given_fields() {
        let mut faults = FaultConfig {
            error_rate: 0.1,
            ..FaultConfig::default()
        };
        let update: FaultUpdate =
            serde_json::from_str(r#"{"latency":"250ms","lost_response_mode":"504"}"#).unwrap();
        update.apply(&mut faults).unwrap();
        assert_eq!(faults.error_rate, 0.1);
        assert_eq!(faults.latency, Duration::from_millis(250));
        assert_eq!(faults.lost_response_mode, LostResponseMode::GatewayTimeout);
        let bad: FaultUpdate = serde_json::from_str(r#"{"error_rate":2}"#).unwrap();
        assert!(bad.apply(&mut faults).unwrap_err().contains("error_rate"));
        let bad: FaultUpdate = serde_json::from_str(r#"{"list_404_rate":-0.5}"#).unwrap();
        assert!(
            bad.apply(&mut faults)
                .unwrap_err()
                .contains("list_404_rate")
        );

        let quirks: FaultUpdate = serde_json::from_str(
            r#"{"list_lag":"3s","next_link":"mangled","retry_after":"http-date",
                "pending_conflict_wording":"message-only","nulls":true,"list_404_rate":0.5,
                "refuse_in":true}"#,
        )
        .unwrap();
        quirks.apply(&mut faults).unwrap();
        assert_eq!(faults.list_lag, Duration::from_secs(3));
        assert_eq!(faults.next_link, NextLinkMode::Mangled);
        assert_eq!(faults.retry_after, RetryAfterMode::HttpDate);
        assert_eq!(
            faults.pending_conflict_wording,
            PendingConflictWording::MessageOnly
        );
        assert!(faults.nulls);
        assert_eq!(faults.list_404_rate, 0.5);
        assert!(faults.refuse_in);
        assert_eq!(faults.latency, Duration::from_millis(250), "untouched");
    }
}
