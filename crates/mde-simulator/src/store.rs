//! The simulator's state: inventory, actions, tokens, limiter, faults and counters,
//! behind one lock that is never held across an `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;

use super::actions::{Action, Schedule, Status};
use super::config::RateLimit;
use super::config::{SimConfig, scale};
use super::machines::{self, Machine};
use super::ratelimit::{Decision, Limiter};
use super::stats::SimStats;

/// API families that are rate limited and counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Token,
    Machines,
    MachineActions,
    Offboard,
    Cancel,
}

impl Family {
    pub const LIMITED: [Family; 4] = [
        Family::Machines,
        Family::MachineActions,
        Family::Offboard,
        Family::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Token => "token",
            Family::Machines => "machines",
            Family::MachineActions => "machineactions",
            Family::Offboard => "offboard",
            Family::Cancel => "cancel",
        }
    }

    pub fn parse_limited(s: &str) -> Option<Family> {
        Self::LIMITED.into_iter().find(|f| f.as_str() == s)
    }
}

/// Who an accepted bearer token belongs to.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant_id: String,
    pub client_id: String,
}

/// An access token shaped like Entra's: a JWT whose payload names the tenant
/// (`tid`), the app (`appid`) and its application `roles`, with a random
/// signature part that makes it unguessable. Clients may read the claims; the
/// simulator only ever looks the whole string up.
fn access_token(caller: &Caller, roles: &[String], lifetime: Duration) -> String {
    use base64::Engine as _;
    let encode = |value: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let expires = jiff::Timestamp::now().as_second() + lifetime.as_secs() as i64;
    let header = encode(serde_json::json!({"typ": "JWT", "alg": "RS256"}));
    let payload = encode(serde_json::json!({
        "aud": "https://api.securitycenter.microsoft.com",
        "tid": caller.tenant_id,
        "appid": caller.client_id,
        "roles": roles,
        "exp": expires,
    }));
    let signature: [u8; 32] = rand::random();
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature);
    format!("{header}.{payload}.{signature}")
}

impl Caller {
    /// Key of the caller's rate-limit windows: limits are per tenant and application.
    fn key(&self) -> String {
        format!("{}/{}", self.tenant_id, self.client_id)
    }
}

struct IssuedToken {
    caller: Caller,
    expires: Instant,
}

/// Why an offboard was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum OffboardRefusal {
    NotFound,
    PlatformNotSupported(String),
    ActiveRequestAlreadyExists(uuid::Uuid),
}

/// Why a cancel was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelRefusal {
    NotFound,
    AlreadyFinal(Status),
}

pub struct Store {
    pub config: SimConfig,
    started: Instant,
    started_utc: jiff::Timestamp,
    machines: Vec<Machine>,
    /// Machines never change, so their JSON is built once for list calls.
    machines_json: Arc<Vec<Value>>,
    machine_index: HashMap<String, usize>,
    actions: Vec<Action>,
    action_index: HashMap<uuid::Uuid, usize>,
    /// Index of the newest offboard action of each machine.
    latest_offboard: HashMap<String, usize>,
    tokens: HashMap<String, IssuedToken>,
    limiter: Limiter,
    forced_throttles: HashMap<Family, Instant>,
    /// Until when the token endpoint answers 503 (`POST /_sim/token-outage`).
    token_outage_until: Option<Instant>,
    pub fault_rng: StdRng,
    pub stats: SimStats,
}

impl Store {
    pub fn new(config: SimConfig) -> Self {
        let started_utc = jiff::Timestamp::now();
        let machines = machines::inventory(
            config.machines,
            config.seed,
            config.unsuccessful_share,
            started_utc,
        );
        let machine_index = machines
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        let machines_json = Arc::new(
            machines
                .iter()
                .map(|m| serde_json::to_value(m).expect("machine serialises"))
                .collect(),
        );
        // Faults draw from their own stream so changing them leaves the inventory alone.
        let fault_rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_fa17);
        Self {
            config,
            started: Instant::now(),
            started_utc,
            machines,
            machines_json,
            machine_index,
            actions: Vec::new(),
            action_index: HashMap::new(),
            latest_offboard: HashMap::new(),
            tokens: HashMap::new(),
            limiter: Limiter::default(),
            forced_throttles: HashMap::new(),
            token_outage_until: None,
            fault_rng,
            stats: SimStats::default(),
        }
    }

    /// Wall-clock time since start.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            pending_for: self.config.scaled(self.config.pending_for),
            in_progress_for: self.config.scaled(self.config.in_progress_for),
        }
    }

    fn limits(&self) -> Vec<RateLimit> {
        self.config
            .rate_limits
            .iter()
            .map(|l| RateLimit {
                window: scale(l.window, self.config.time_scale),
                ..*l
            })
            .collect()
    }

    // ---- tokens ----

    /// Issues a fresh opaque token; returns it and its lifetime in wall-clock time.
    pub fn issue_token(&mut self, caller: Caller) -> (String, Duration) {
        let lifetime = self.config.scaled(self.config.token_lifetime);
        let token = access_token(&caller, &self.config.roles, lifetime);
        self.tokens.insert(
            token.clone(),
            IssuedToken {
                caller,
                expires: Instant::now() + lifetime,
            },
        );
        self.stats.tokens_issued += 1;
        (token, lifetime)
    }

    /// The caller of a valid, unexpired token.
    pub fn authenticate(&mut self, token: &str) -> Option<Caller> {
        let now = Instant::now();
        self.tokens.retain(|_, t| t.expires > now);
        self.tokens.get(token).map(|t| t.caller.clone())
    }

    /// Takes the token endpoint down for `for_how_long` (wall-clock time):
    /// tokens already issued keep working until they expire or are revoked.
    pub fn token_outage(&mut self, for_how_long: Duration) {
        self.token_outage_until = Some(Instant::now() + for_how_long);
    }

    /// Whether the token endpoint is down right now.
    pub fn token_endpoint_down(&mut self) -> bool {
        match self.token_outage_until {
            Some(until) if until > Instant::now() => true,
            Some(_) => {
                self.token_outage_until = None;
                false
            }
            None => false,
        }
    }

    pub fn revoke_tokens(&mut self) -> usize {
        let n = self.tokens.len();
        self.tokens.clear();
        n
    }

    // ---- rate limits ----

    /// Counts the call against the caller's budget, or says how long to wait.
    pub fn admit(&mut self, family: Family, caller: &Caller) -> Decision {
        let now_instant = Instant::now();
        if let Some(until) = self.forced_throttles.get(&family) {
            if *until > now_instant {
                return Decision::Throttled(*until - now_instant);
            }
            self.forced_throttles.remove(&family);
        }
        let limits = self.limits();
        let now = self.now();
        self.limiter.check(
            family.as_str(),
            &caller.key(),
            &limits,
            self.config.window_mode,
            now,
        )
    }

    /// Makes every caller of `family` get 429 for `for_how_long` (wall-clock time).
    pub fn force_throttle(&mut self, family: Family, for_how_long: Duration) {
        self.forced_throttles
            .insert(family, Instant::now() + for_how_long);
    }

    // ---- machines ----

    pub fn machine(&self, id: &str) -> Option<&Machine> {
        self.machine_index
            .get(&id.to_ascii_lowercase())
            .map(|&i| &self.machines[i])
    }

    pub fn machines_json(&self) -> Arc<Vec<Value>> {
        self.machines_json.clone()
    }

    // ---- actions ----

    pub fn action_json(&self, id: &str) -> Option<Value> {
        let id = uuid::Uuid::parse_str(id).ok()?;
        let action = &self.actions[*self.action_index.get(&id)?];
        Some(action.to_json(self.now(), self.schedule()))
    }

    /// JSON of the actions a list query sees whose id and machine id are among the
    /// given ones (lower-cased; `None` means any), oldest first. Actions younger
    /// than the list lag (`--fault-list-lag`) are not visible to lists yet.
    pub fn actions_json(
        &self,
        ids: Option<&[String]>,
        machine_ids: Option<&[String]>,
        created_from: Option<jiff::Timestamp>,
    ) -> Vec<Value> {
        let (now, schedule) = (self.now(), self.schedule());
        let lag = self.config.scaled(self.config.faults.list_lag);
        let wanted = |values: Option<&[String]>, value: &str| {
            values.is_none_or(|vs| vs.iter().any(|v| v.eq_ignore_ascii_case(value)))
        };
        self.actions
            .iter()
            .filter(|a| a.age(now) >= lag)
            .filter(|a| wanted(ids, &a.id.to_string()) && wanted(machine_ids, &a.machine_id))
            // A second of slack: the filter compares the JSON's own text.
            .filter(|a| {
                created_from
                    .is_none_or(|from| a.created_utc + jiff::SignedDuration::from_secs(1) >= from)
            })
            .map(|a| a.to_json(now, schedule))
            .collect()
    }

    /// Creates an offboard action unless MDE would refuse it.
    pub fn offboard(
        &mut self,
        machine_id: &str,
        requestor: &str,
        comment: &str,
    ) -> Result<Value, OffboardRefusal> {
        let machine = self.machine(machine_id).ok_or(OffboardRefusal::NotFound)?;
        if !machine.offboard_supported() {
            return Err(OffboardRefusal::PlatformNotSupported(
                machine.os_platform.clone(),
            ));
        }
        let (machine_id, dns, outcome) = (
            machine.id.clone(),
            machine.computer_dns_name.clone(),
            machine.offboard_outcome,
        );
        let (now, schedule) = (self.now(), self.schedule());
        if let Some(&i) = self.latest_offboard.get(&machine_id) {
            let previous = &self.actions[i];
            if !previous.status(now, schedule).is_final() {
                return Err(OffboardRefusal::ActiveRequestAlreadyExists(previous.id));
            }
        }
        let action = Action {
            id: uuid::Uuid::new_v4(),
            kind: "Offboard",
            machine_id: machine_id.clone(),
            computer_dns_name: dns,
            requestor: requestor.to_owned(),
            comment: comment.to_owned(),
            created: now,
            created_utc: self.started_utc
                + jiff::SignedDuration::try_from(now).unwrap_or(jiff::SignedDuration::ZERO),
            outcome,
            cancellation: None,
        };
        let json = action.to_json(now, schedule);
        let index = self.actions.len();
        self.action_index.insert(action.id, index);
        self.latest_offboard.insert(machine_id.clone(), index);
        self.actions.push(action);
        self.stats.record_offboard(&machine_id);
        Ok(json)
    }

    pub fn cancel(
        &mut self,
        action_id: &str,
        requestor: &str,
        comment: &str,
    ) -> Result<Value, CancelRefusal> {
        let id = uuid::Uuid::parse_str(action_id).map_err(|_| CancelRefusal::NotFound)?;
        let &index = self.action_index.get(&id).ok_or(CancelRefusal::NotFound)?;
        let (now, schedule) = (self.now(), self.schedule());
        let action = &mut self.actions[index];
        let status = action.status(now, schedule);
        if status.is_final() {
            return Err(CancelRefusal::AlreadyFinal(status));
        }
        action.cancellation = Some(super::actions::Cancellation {
            requestor: requestor.to_owned(),
            comment: comment.to_owned(),
            at: action.age(now),
        });
        self.stats.actions_cancelled += 1;
        Ok(action.to_json(now, schedule))
    }
}

/// State shared by all connections.
pub struct Shared {
    /// Used for `@odata.nextLink` when a request carries no `Host` header.
    pub local_addr: SocketAddr,
    store: Mutex<Store>,
}

impl Shared {
    pub fn new(config: SimConfig, local_addr: SocketAddr) -> Self {
        Self {
            local_addr,
            store: Mutex::new(Store::new(config)),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every change is one
        // assignment), so keep serving.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machines::EXAMPLE_MACHINES;

    fn store() -> Store {
        Store::new(SimConfig {
            machines: 5,
            pending_for: Duration::from_secs(3600),
            ..SimConfig::default()
        })
    }

    #[test]
    fn offboard_refusals_follow_mde() {
        let mut s = store();
        assert_eq!(s.offboard("ffff", "c", "x"), Err(OffboardRefusal::NotFound));
        assert_eq!(
            s.offboard(EXAMPLE_MACHINES[3].id, "c", "x"),
            Err(OffboardRefusal::PlatformNotSupported("Linux".into()))
        );
        let created = s.offboard(EXAMPLE_MACHINES[0].id, "c", "x").unwrap();
        assert_eq!(created["status"], "Pending");
        let id = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
        assert_eq!(
            s.offboard(&EXAMPLE_MACHINES[0].id.to_uppercase(), "c", "x"),
            Err(OffboardRefusal::ActiveRequestAlreadyExists(id))
        );
        // Once the first is final (here: cancelled) a second one is created.
        s.cancel(&id.to_string(), "c", "stop").unwrap();
        assert!(s.offboard(EXAMPLE_MACHINES[0].id, "c", "again").is_ok());
        assert_eq!(s.stats.duplicate_offboards, 1);
        assert!(matches!(
            s.cancel(&id.to_string(), "c", "again"),
            Err(CancelRefusal::AlreadyFinal(Status::Cancelled))
        ));
    }

    #[test]
    fn tokens_are_revocable() {
        let mut s = store();
        let caller = Caller {
            tenant_id: "t".into(),
            client_id: "c".into(),
        };
        let (token, _) = s.issue_token(caller);
        assert!(s.authenticate(&token).is_some());
        assert!(s.authenticate("other").is_none());
        assert_eq!(s.revoke_tokens(), 1);
        assert!(s.authenticate(&token).is_none());
    }
}
