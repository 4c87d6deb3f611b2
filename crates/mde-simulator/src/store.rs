//! The simulator's state: inventory, actions, tokens, limiter, faults and counters,
//! behind one lock that is never held across an `.await`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::actions::{Action, Ended, Outcome, Schedule, Status};
use super::certificates::{self, RegisteredCertificate};
use super::config::RateLimit;
use super::config::{SimConfig, scale};
use super::history::{self, ACTION_RETENTION};
use super::machines::{self, Machine, Refusal};
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
/// (`tid`), the app (`appid`) and its application `roles` (none with
/// `token_without_roles`), with a random signature part that makes it
/// unguessable. Clients may read the claims; the simulator only ever looks
/// the whole string up.
fn access_token(caller: &Caller, roles: Option<&[String]>, lifetime: Duration) -> String {
    use base64::Engine as _;
    let encode = |value: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let expires = jiff::Timestamp::now().as_second() + lifetime.as_secs() as i64;
    let header = encode(serde_json::json!({"typ": "JWT", "alg": "RS256"}));
    let mut payload = serde_json::json!({
        "aud": "https://api.securitycenter.microsoft.com",
        "tid": caller.tenant_id,
        "appid": caller.client_id,
        "exp": expires,
    });
    if let Some(roles) = roles {
        payload["roles"] = serde_json::json!(roles);
    }
    let payload = encode(payload);
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
    /// The record was found by device discovery: its `onboardingStatus`.
    NotOnboarded(String),
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
    /// Indexes of each machine's offboard actions, oldest first.
    offboards_of: HashMap<String, Vec<usize>>,
    /// The JSON of actions of the past, which never changes.
    frozen: HashMap<usize, Arc<Value>>,
    /// Machines (lower-cased) whose past holds a `Succeeded` offboard they
    /// were not seen after: a window of recent offboards proves nothing for them.
    offboarded_before: HashSet<String>,
    /// What was sent for each machine and read since (see
    /// [`SimStats::unproven_offboard_requests_by_machine`]).
    proofs: HashMap<String, Proof>,
    /// Offboard POSTs received so far (numbers them for [`Proof`]).
    posts_received: u64,
    tokens: HashMap<String, IssuedToken>,
    /// The certificates registered on the app (from `client_certificates`).
    certificates: Vec<RegisteredCertificate>,
    limiter: Limiter,
    /// Added to the time since start on the limiter's clock, so that calls
    /// made before the start (`prior_calls`) have a place on it.
    limiter_epoch: Duration,
    forced_throttles: HashMap<Family, Instant>,
    /// Until when the token endpoint answers 503 (`POST /_sim/token-outage`).
    token_outage_until: Option<Instant>,
    pub fault_rng: StdRng,
    pub stats: SimStats,
}

/// The offboards sent for one machine, and whether a read has shown since
/// the last one that nothing stands for it.
#[derive(Debug)]
struct Proof {
    first_post: jiff::Timestamp,
    /// The number of the last POST among all received.
    last_post: u64,
    /// POSTs received and not yet answered: a read while one is open proves nothing.
    in_flight: u32,
    proven: bool,
}

/// A machine a list read covers, as it stood when the read was taken: the
/// read proves nothing for a POST received after that.
#[derive(Debug)]
pub struct Covered {
    machine: String,
    last_post: u64,
}

/// A signed duration back from `at`, saturating at the earliest timestamp.
fn before(at: jiff::Timestamp, ago: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(ago)
        .ok()
        .and_then(|ago| at.checked_sub(ago).ok())
        .unwrap_or(jiff::Timestamp::MIN)
}

/// When MDE last saw a machine (`None`: never, or unreadable).
fn last_seen(machine: &Machine) -> Option<jiff::Timestamp> {
    machine.last_seen.parse().ok()
}

/// Whether a `Succeeded` offboard that last changed at `ended` still stands
/// for `machine`: MDE has not seen the machine since.
fn still_offboarded(machine: &Machine, ended: jiff::Timestamp) -> bool {
    last_seen(machine).is_none_or(|seen| seen <= ended)
}

/// The machines and the actions of the past, oldest first, from the
/// configured histories: each named machine's last report set (added to the
/// inventory when it is not in it), past offboards older than MDE keeps dropped.
fn seed_history(
    config: &SimConfig,
    machines: &mut Vec<Machine>,
    started_utc: jiff::Timestamp,
) -> Vec<Action> {
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x01d0_ff1e);
    let mut past = Vec::new();
    let action = |rng: &mut StdRng,
                  machine_id: &str,
                  dns: &str,
                  comment: &str,
                  created_ago: Duration,
                  ended: Ended| Action {
        id: uuid::Builder::from_random_bytes(rng.random()).into_uuid(),
        kind: "Offboard",
        machine_id: machine_id.to_owned(),
        computer_dns_name: dns.to_owned(),
        requestor: config.client_id.clone(),
        comment: comment.to_owned(),
        created: Duration::ZERO,
        created_utc: before(started_utc, created_ago),
        outcome: Outcome::Succeeded,
        cancellation: None,
        ended: Some(ended),
    };
    for (n, history) in config.history.iter().enumerate() {
        let id = history.machine_id.to_ascii_lowercase();
        let index = match machines.iter().position(|m| m.id == id) {
            Some(index) => index,
            None => {
                machines.push(machines::with_id(&mut rng, started_utc, &id, n));
                machines.len() - 1
            }
        };
        let seen = before(started_utc, history.last_seen_ago);
        machines::seen_last_at(&mut machines[index], seen, started_utc);
        let machine = &machines[index];
        for offboard in history
            .offboards
            .iter()
            .filter(|o| o.created_ago <= ACTION_RETENTION)
        {
            let ended = Ended {
                status: offboard.status,
                took: offboard.took,
            };
            past.push(action(
                &mut rng,
                &machine.id,
                &machine.computer_dns_name,
                &offboard.comment,
                offboard.created_ago,
                ended,
            ));
        }
    }
    for (n, offboard) in history::bulk(&config.bulk_history, config.seed)
        .into_iter()
        .filter(|o| o.created_ago <= ACTION_RETENTION)
        .enumerate()
    {
        let ended = Ended {
            status: Status::Succeeded,
            took: Duration::from_secs(600).min(offboard.created_ago),
        };
        past.push(action(
            &mut rng,
            &offboard.machine_id,
            &format!("gone-{n:05}.contoso.local"),
            &offboard.comment,
            offboard.created_ago,
            ended,
        ));
    }
    past.sort_by_key(|a| a.created_utc);
    past
}

impl Store {
    pub fn new(config: SimConfig) -> Self {
        let started_utc = jiff::Timestamp::now();
        let mut machines = machines::inventory(
            config.machines,
            config.seed,
            config.unsuccessful_share,
            config.real_tenant,
            started_utc,
        );
        // `SimConfig::check` has refused certificates that cannot be read.
        let registered = config
            .client_certificates
            .iter()
            .filter_map(|pem| certificates::parse_certificates(pem).ok())
            .flatten()
            .collect();
        let past = seed_history(&config, &mut machines, started_utc);
        let machine_index: HashMap<String, usize> = machines
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
        let limiter_epoch = config
            .prior_calls
            .iter()
            .map(|p| config.scaled(p.over))
            .max()
            .unwrap_or_default();
        let mut store = Self {
            config,
            started: Instant::now(),
            started_utc,
            machines,
            machines_json,
            machine_index,
            actions: Vec::new(),
            action_index: HashMap::new(),
            offboards_of: HashMap::new(),
            frozen: HashMap::new(),
            offboarded_before: HashSet::new(),
            proofs: HashMap::new(),
            posts_received: 0,
            tokens: HashMap::new(),
            certificates: registered,
            limiter: Limiter::default(),
            limiter_epoch,
            forced_throttles: HashMap::new(),
            token_outage_until: None,
            fault_rng,
            stats: SimStats::default(),
        };
        store.add_past(past);
        store.seed_prior_calls();
        store
    }

    /// Stores the actions of the past (oldest first) and notes the machines
    /// they left offboarded.
    fn add_past(&mut self, past: Vec<Action>) {
        let (now, schedule) = (Duration::ZERO, self.schedule());
        for action in past {
            let index = self.actions.len();
            let standing = action.status(now, schedule) == Status::Succeeded
                && self
                    .machine(&action.machine_id)
                    .is_some_and(|m| still_offboarded(m, action.last_update(now, schedule)));
            if standing {
                self.offboarded_before.insert(action.machine_id.clone());
            }
            self.frozen
                .insert(index, Arc::new(action.to_json(now, schedule)));
            self.action_index.insert(action.id, index);
            self.offboards_of
                .entry(action.machine_id.clone())
                .or_default()
                .push(index);
            self.actions.push(action);
        }
    }

    /// Counts `prior_calls` in this application's windows, at their places
    /// before the start on the limiter's clock.
    fn seed_prior_calls(&mut self) {
        let limits = self.limits();
        let caller = Caller {
            tenant_id: self.config.tenant_id.clone(),
            client_id: self.config.client_id.clone(),
        }
        .key();
        for prior in self.config.prior_calls.clone() {
            // Refused by `SimConfig::check` before the simulator starts.
            let Some(family) = Family::parse_limited(&prior.family) else {
                continue;
            };
            let times = prior.times(self.config.scaled(prior.over), self.limiter_epoch);
            self.limiter.seed(
                family.as_str(),
                &caller,
                &limits,
                self.config.window_mode,
                &times,
                self.limiter_epoch,
            );
        }
    }

    /// MDE's clock now.
    fn now_utc(&self) -> jiff::Timestamp {
        self.started_utc + jiff::SignedDuration::try_from(self.now()).unwrap_or_default()
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
        let roles = (!self.config.token_without_roles).then_some(self.config.roles.as_slice());
        let token = access_token(&caller, roles, lifetime);
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

    pub fn certificates(&self) -> &[RegisteredCertificate] {
        &self.certificates
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
        let now = self.now() + self.limiter_epoch;
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
        let index = *self.action_index.get(&id)?;
        Some(self.json_of(index).as_ref().clone())
    }

    /// The JSON of the action at `index`: built afresh (its status depends on
    /// time), or the one of the past that never changes.
    fn json_of(&self, index: usize) -> Arc<Value> {
        match self.frozen.get(&index) {
            Some(json) => json.clone(),
            None => Arc::new(self.actions[index].to_json(self.now(), self.schedule())),
        }
    }

    /// JSON of the actions a list query sees whose id and machine id are among the
    /// given ones (lower-cased; `None` means any), oldest first. Actions younger
    /// than the list lag (`--fault-list-lag`) are not visible to lists yet.
    pub fn actions_json(
        &self,
        ids: Option<&[String]>,
        machine_ids: Option<&[String]>,
        created_from: Option<jiff::Timestamp>,
    ) -> Vec<Arc<Value>> {
        let now = self.now();
        let lag = self.config.scaled(self.config.faults.list_lag);
        let wanted = |values: Option<&[String]>, value: &str| {
            values.is_none_or(|vs| vs.iter().any(|v| v.eq_ignore_ascii_case(value)))
        };
        self.actions
            .iter()
            .enumerate()
            .filter(|(_, a)| a.listed(now, lag))
            .filter(|(_, a)| wanted(ids, &a.id.to_string()) && wanted(machine_ids, &a.machine_id))
            // A second of slack: the filter compares the JSON's own text.
            .filter(|(_, a)| {
                created_from
                    .is_none_or(|from| a.created_utc + jiff::SignedDuration::from_secs(1) >= from)
            })
            .map(|(index, _)| self.json_of(index))
            .collect()
    }

    /// Whether `machine` (as MDE holds it) is offboarded by the action at
    /// `index`: it `Succeeded` and the machine was not seen after it ended.
    fn offboarded_by(&self, machine: &Machine, index: usize) -> bool {
        let (now, schedule) = (self.now(), self.schedule());
        let action = &self.actions[index];
        action.status(now, schedule) == Status::Succeeded
            && still_offboarded(machine, action.last_update(now, schedule))
    }

    /// Creates an offboard action unless MDE would refuse it.
    pub fn offboard(
        &mut self,
        machine_id: &str,
        requestor: &str,
        comment: &str,
    ) -> Result<Value, OffboardRefusal> {
        let machine = self.machine(machine_id).ok_or(OffboardRefusal::NotFound)?;
        match machine.offboard_refusal(self.config.offboard_platforms) {
            Some(Refusal::NotOnboarded(status)) => {
                return Err(OffboardRefusal::NotOnboarded(status));
            }
            Some(Refusal::PlatformNotSupported(platform)) => {
                return Err(OffboardRefusal::PlatformNotSupported(platform));
            }
            None => {}
        }
        let (machine_id, dns, outcome) = (
            machine.id.clone(),
            machine.computer_dns_name.clone(),
            machine.offboard_outcome,
        );
        let (now, schedule) = (self.now(), self.schedule());
        let earlier = self
            .offboards_of
            .get(&machine_id)
            .cloned()
            .unwrap_or_default();
        if let Some(&i) = earlier.last() {
            let previous = &self.actions[i];
            if !previous.status(now, schedule).is_final() {
                return Err(OffboardRefusal::ActiveRequestAlreadyExists(previous.id));
            }
        }
        let offboarded_already = self
            .machine(&machine_id)
            .is_some_and(|m| earlier.iter().any(|&i| self.offboarded_by(m, i)));
        let action = Action {
            id: uuid::Uuid::new_v4(),
            kind: "Offboard",
            machine_id: machine_id.clone(),
            computer_dns_name: dns,
            requestor: requestor.to_owned(),
            comment: comment.to_owned(),
            created: now,
            created_utc: self.now_utc(),
            outcome,
            cancellation: None,
            ended: None,
        };
        let json = action.to_json(now, schedule);
        let index = self.actions.len();
        self.action_index.insert(action.id, index);
        self.offboards_of
            .entry(machine_id.clone())
            .or_default()
            .push(index);
        self.actions.push(action);
        self.stats.record_offboard(&machine_id);
        if offboarded_already {
            *self
                .stats
                .offboarded_again_by_machine
                .entry(machine_id)
                .or_default() += 1;
        }
        Ok(json)
    }

    // ---- what was sent, and what reads showed since ----

    /// An offboard POST for `machine_id` that got past the token and the
    /// limits, under the correlation key `key`: counted as received, and
    /// counted as unproven when it follows an earlier one for the machine
    /// without a read since that showed nothing stands for it. Pair with
    /// [`Self::offboard_request_answered`].
    pub fn offboard_request_received(&mut self, key: &str, machine_id: &str) {
        self.stats.record_offboard_request(key, machine_id);
        if self.stats.first_offboard_request_ms.is_none() {
            self.stats.first_offboard_request_ms =
                Some(u64::try_from(self.now().as_millis()).unwrap_or(u64::MAX));
        }
        let machine = machine_id.to_ascii_lowercase();
        let now_utc = self.now_utc();
        self.posts_received += 1;
        let number = self.posts_received;
        match self.proofs.get_mut(&machine) {
            Some(proof) => {
                if !proof.proven {
                    *self
                        .stats
                        .unproven_offboard_requests_by_machine
                        .entry(machine)
                        .or_default() += 1;
                }
                proof.proven = false;
                proof.in_flight += 1;
                proof.last_post = number;
            }
            None => {
                self.proofs.insert(
                    machine,
                    Proof {
                        first_post: now_utc,
                        last_post: number,
                        in_flight: 1,
                        proven: false,
                    },
                );
            }
        }
    }

    /// The POST [`Self::offboard_request_received`] counted has been answered
    /// (or its connection closed): from now on a read may prove it created nothing.
    pub fn offboard_request_answered(&mut self, machine_id: &str) {
        if let Some(proof) = self.proofs.get_mut(&machine_id.to_ascii_lowercase()) {
            proof.in_flight = proof.in_flight.saturating_sub(1);
        }
    }

    /// The machines a machine-action list read now may prove something for:
    /// each whose last POST is answered and not proven yet, and which the
    /// read covers (the machines its `machineId` filter names, else, for a
    /// window of offboards from `created_from`, every machine first sent for
    /// no earlier and without a past offboard that left it offboarded).
    pub fn covered_by_list(
        &self,
        machine_ids: Option<&[String]>,
        created_from: Option<jiff::Timestamp>,
    ) -> Vec<Covered> {
        self.proofs
            .iter()
            .filter(|(_, proof)| !proof.proven && proof.in_flight == 0)
            .filter(|(machine, proof)| match (machine_ids, created_from) {
                (Some(ids), _) => ids.iter().any(|id| id.eq_ignore_ascii_case(machine)),
                (None, Some(from)) => {
                    from <= proof.first_post && !self.offboarded_before.contains(*machine)
                }
                (None, None) => false,
            })
            .map(|(machine, proof)| Covered {
                machine: machine.clone(),
                last_post: proof.last_post,
            })
            .collect()
    }

    /// The list read taken when [`Self::covered_by_list`] answered `covered`
    /// was answered with `shown` (all it matched when `whole`): it proves
    /// the last POST of each covered machine created nothing that stands
    /// when it shows no live offboard of the machine and no `Succeeded` one
    /// the machine was not seen after, and no POST came since.
    pub fn action_list_answered(&mut self, covered: Vec<Covered>, shown: &[Value], whole: bool) {
        if !whole {
            return;
        }
        // The machines a shown offboard stands for, once per answer: a
        // window answer can show thousands of actions for thousands of
        // covered machines.
        let standing: std::collections::HashSet<String> = shown
            .iter()
            .filter(|a| a.get("type").and_then(Value::as_str) == Some("Offboard"))
            .filter_map(|a| {
                let machine = a.get("machineId").and_then(Value::as_str)?;
                self.stands_for(machine, a)
                    .then(|| machine.to_ascii_lowercase())
            })
            .collect();
        for Covered { machine, last_post } in covered {
            let stands = standing.contains(&machine.to_ascii_lowercase());
            if let Some(proof) = self.proofs.get_mut(&machine)
                && !stands
                && proof.last_post == last_post
            {
                proof.proven = true;
            }
        }
    }

    /// Whether a listed offboard action (its JSON) stands for the machine:
    /// still live, or `Succeeded` with the machine not seen after it ended.
    fn stands_for(&self, machine_id: &str, action: &Value) -> bool {
        match action.get("status").and_then(Value::as_str) {
            Some("Pending" | "InProgress") => true,
            Some("Succeeded") => {
                let ended = action
                    .get("lastUpdateDateTimeUtc")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok());
                match (self.machine(machine_id), ended) {
                    (Some(machine), Some(ended)) => still_offboarded(machine, ended),
                    // A machine MDE no longer holds, or an end that cannot be
                    // read: nothing shows it does not stand.
                    _ => true,
                }
            }
            _ => false,
        }
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
