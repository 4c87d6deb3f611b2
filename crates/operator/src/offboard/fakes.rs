//! An in-memory MDE for unit tests of the reconcile step, as hard as the
//! real service: every call spends a slot of its own rate budget (and a read
//! it refuses answers `BudgetSpent`, as the client does when it may not
//! wait), window reads come in pages of `$top`, lists lag behind creation
//! (one action may lag longer than the others), a POST for a machine with an
//! offboard in flight is answered "already pending", and MDE moves its
//! actions on by itself. Send outcomes and list failures can be scripted.
//!
//! It keeps the server's view of what happened: offboard POSTs counted per
//! correlation key and per machine whatever the answer, and per machine a log
//! of the POSTs and of the reads that listed the machine's actions, so a test
//! can ask whether any second POST came without a read in between that
//! proved there was nothing to adopt ([`FakeMde::double_posts`]). It parses
//! markers itself rather than calling the client's or the operator's
//! helpers, so it cannot share their mistakes.

use super::decision::Note;
use super::ports::{MdeCalls, MemoryStore, StatusStore};
use crate::crd::{DeviceOffboard, DeviceOffboardStatus};
use crate::error::Error;
use jiff::{SignedDuration, Timestamp};
use mde_client::limiter::Permit;
use mde_client::{
    ActionStatus, ApiFamily, Machine, MachineAction, MdeError, RateBudget, RateLimits,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// MDE's largest `$top`: a page never holds more.
const MDE_MAX_TOP: usize = 10_000;
/// Pages a whole window read follows before it gives up, as a client must.
const WINDOW_PAGES: usize = 100;
/// Ids in one `id in (...)` list call.
const IDS_PER_LIST: usize = 50;

/// What one offboard POST does.
#[derive(Debug, Clone)]
pub enum Send {
    /// Act (create the action, or refuse as "already pending") and answer it.
    Accept,
    /// Act, then lose the answer with this error (timeout, reset, 5xx after
    /// the fact, a garbled 2xx body).
    CreateThenFail(MdeError),
    /// Answer this error without acting (timeout before MDE acted, 5xx,
    /// 429, 401, ...).
    Fail(MdeError),
}

/// What one list read answers.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The truth, as far as the list shows it yet.
    Complete,
    Fail(MdeError),
}

/// What MDE did with one counted offboard POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostDid {
    /// Created this action.
    Created(String),
    /// Refused: an offboard of the machine is not final yet. Nothing created.
    AlreadyPending,
    /// Failed before MDE acted. Nothing created.
    Nothing,
}

/// Which read listed a machine's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKind {
    /// Every offboard of the machine (`machineId eq ...`).
    Exact,
    /// One page of the offboards created from `since` (floored to the second,
    /// as the filter's text is), `skip` in; `short`: the last page.
    Page {
        since: Timestamp,
        skip: usize,
        short: bool,
    },
}

/// One entry of a machine's log, in the order MDE received the requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Request number `n` was an offboard POST, received at `at`.
    Post { n: u64, at: Timestamp, did: PostDid },
    /// Request number `n` listed the machine's actions (an exact read, or a
    /// window page reaching the end, from no later than the machine's last
    /// POST) and showed `showed` of them. `proves`: MDE held no offboard of
    /// the machine that is live, nor one that succeeded since the machine's
    /// first POST and was not followed by the machine being seen again, so a
    /// POST after it is right. What the read hid (a list's lag) counts: a
    /// read that missed an action proves nothing.
    Read {
        n: u64,
        read: ReadKind,
        showed: usize,
        proves: bool,
    },
}

/// One action as MDE holds it.
struct Held {
    action: MachineAction,
    /// MDE's creation time.
    created: Timestamp,
    /// When it was created on the test's clock: lists show it a lag later,
    /// and MDE moves it on from there. `None`: made before the test, listed
    /// at once and never moved on.
    born: Option<Instant>,
}

struct State {
    /// MDE's wall clock: `start` at the instant `origin`, moving with tokio's.
    start: Timestamp,
    origin: Instant,
    /// Oldest first, as created (or inserted).
    actions: Vec<Held>,
    list_lag: Duration,
    /// The list lag of single actions, by their number (0: the first created).
    spikes: BTreeMap<usize, Duration>,
    /// MDE finishes an offboard (`Succeeded`) this long after creating it
    /// (`InProgress` from halfway); `None`: only `set_status` moves it.
    finish_after: Option<Duration>,
    /// When MDE last saw each machine (lower-case id); others were seen a day
    /// before the test began.
    last_seen: BTreeMap<String, Timestamp>,
    /// POSTs that failed ambiguously without creating anything: the only
    /// ones after which a second POST for the key is right.
    refused_before_acting: u32,
    posts_by_key: BTreeMap<String, u32>,
    posts_by_machine: BTreeMap<String, u32>,
    /// Per machine (lower-case id): its POSTs and the reads that listed it.
    log: BTreeMap<String, Vec<Seen>>,
    /// The most offboards of one machine that were live at once.
    most_live: BTreeMap<String, usize>,
    /// Requests received (counted POSTs and reads), numbering the log.
    requests: u64,
    sends: VecDeque<Send>,
    /// Scripted cancel outcomes (`Accept` cancels a non-final action).
    cancels: VecDeque<Send>,
    /// Cancel POSTs received per action id, whatever the answer.
    cancels_by_action: BTreeMap<String, u32>,
    /// Scripted exact reads (`offboard_actions`).
    lookups: VecDeque<Lookup>,
    /// Scripted window pages (`offboard_actions_page`, and each page of
    /// `offboard_actions_since`).
    window_reads: VecDeque<Lookup>,
    calls: u32,
}

pub struct FakeMde {
    budget: RateBudget,
    limits: RateLimits,
    state: Mutex<State>,
}

impl Default for FakeMde {
    fn default() -> Self {
        let limits: RateLimits = "1000/1s".parse().expect("valid limits");
        FakeMde {
            budget: RateBudget::new(&limits),
            limits,
            state: Mutex::new(State {
                start: Timestamp::now(),
                origin: Instant::now(),
                actions: Vec::new(),
                list_lag: Duration::ZERO,
                spikes: BTreeMap::new(),
                finish_after: None,
                last_seen: BTreeMap::new(),
                refused_before_acting: 0,
                posts_by_key: BTreeMap::new(),
                posts_by_machine: BTreeMap::new(),
                log: BTreeMap::new(),
                most_live: BTreeMap::new(),
                requests: 0,
                sends: VecDeque::new(),
                cancels: VecDeque::new(),
                cancels_by_action: BTreeMap::new(),
                lookups: VecDeque::new(),
                window_reads: VecDeque::new(),
                calls: 0,
            }),
        }
    }
}

impl FakeMde {
    /// MDE's rate limits, the same for every family (default `1000/1s`): a
    /// new, unspent budget, so before [`Self::spent`].
    pub fn limits(mut self, limits: RateLimits) -> Self {
        self.budget = RateBudget::new(&limits);
        self.limits = limits;
        self
    }

    /// `calls` of `family` answered just now, by an earlier process say: a
    /// test can start with the read budget nearly spent.
    pub fn spent(self, family: ApiFamily, calls: usize) -> Self {
        self.budget
            .record_past(family, &vec![Instant::now(); calls]);
        self
    }

    /// Script the next POSTs (then every POST is accepted).
    pub fn sends(self, script: impl IntoIterator<Item = Send>) -> Self {
        self.lock().sends.extend(script);
        self
    }

    /// New actions show in lists only this long after they were created.
    pub fn list_lag(self, lag: std::time::Duration) -> Self {
        self.lock().list_lag = lag;
        self
    }

    /// Action number `nth` (0: the first created or inserted) shows in lists
    /// only `lag` after its creation, whatever the others' lag.
    pub fn lag_spike(self, nth: usize, lag: Duration) -> Self {
        self.lock().spikes.insert(nth, lag);
        self
    }

    /// MDE finishes each offboard by itself: `InProgress` after half of
    /// `after`, `Succeeded` after `after` (unless cancelled first).
    pub fn finish_after(self, after: Duration) -> Self {
        self.lock().finish_after = Some(after);
        self
    }

    /// MDE's clock now.
    pub fn now(&self) -> Timestamp {
        wall(&self.lock())
    }

    /// MDE last saw `machine_id` at `at` (a machine onboarded again after
    /// its offboard succeeded is seen after that offboard's last update).
    pub fn last_seen(&self, machine_id: &str, at: Timestamp) {
        self.lock()
            .last_seen
            .insert(machine_id.to_ascii_lowercase(), at);
    }

    /// Ambiguous POST failures that created nothing.
    pub fn refused_before_acting(&self) -> u32 {
        self.lock().refused_before_acting
    }

    /// Append a scripted POST outcome.
    pub fn push_send(&self, send: Send) {
        self.lock().sends.push_back(send);
    }

    /// Script the next cancel POSTs (then every cancel is accepted).
    pub fn cancels(self, script: impl IntoIterator<Item = Send>) -> Self {
        self.lock().cancels.extend(script);
        self
    }

    /// Cancel POSTs received for `action_id`, whatever the answer.
    pub fn cancels_for(&self, action_id: &str) -> u32 {
        self.lock()
            .cancels_by_action
            .get(action_id)
            .copied()
            .unwrap_or(0)
    }

    /// MDE moves the action on (to `InProgress`, say).
    pub fn set_status(&self, action_id: &str, status: ActionStatus) {
        let mut state = self.lock();
        let now = wall(&state);
        if let Some(held) = state.actions.iter_mut().find(|h| h.action.id == action_id) {
            held.action.status = status;
            held.action.last_update_date_time_utc = Some(now.to_string());
            if let Some(machine) = held.action.machine_id.clone() {
                note_live(&mut state, &machine);
            }
        }
    }

    /// Append a scripted exact read outcome.
    pub fn push_lookup(&self, lookup: Lookup) {
        self.lock().lookups.push_back(lookup);
    }

    /// Script the next exact reads (then every read is complete).
    pub fn lookups(self, script: impl IntoIterator<Item = Lookup>) -> Self {
        self.lock().lookups.extend(script);
        self
    }

    /// Append a scripted window page outcome.
    pub fn push_window_read(&self, lookup: Lookup) {
        self.lock().window_reads.push_back(lookup);
    }

    /// From now on every answer is the truth: the scripts left are dropped.
    pub fn behave(&self) {
        let mut state = self.lock();
        state.sends.clear();
        state.cancels.clear();
        state.lookups.clear();
        state.window_reads.clear();
    }

    /// Offboard POSTs received with `key` in their marker, whatever the answer.
    pub fn posts_for(&self, key: &str) -> u32 {
        self.lock().posts_by_key.get(key).copied().unwrap_or(0)
    }

    /// Offboard POSTs received for `machine_id`, whatever the answer (429 and
    /// 401 refusals, made before MDE acts, are not counted).
    pub fn posts_for_machine(&self, machine_id: &str) -> u32 {
        self.lock()
            .posts_by_machine
            .get(&machine_id.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Machines with a second (or later) offboard POST that no proving read
    /// (see [`Seen::Read`]) preceded since the POST before it.
    pub fn double_posts(&self) -> Vec<String> {
        self.lock()
            .log
            .iter()
            .filter(|(_, log)| {
                let (mut posts, mut proven) = (0, false);
                log.iter().any(|seen| match seen {
                    Seen::Post { .. } => {
                        let unproven = posts > 0 && !proven;
                        posts += 1;
                        proven = false;
                        unproven
                    }
                    Seen::Read { proves, .. } => {
                        proven |= *proves;
                        false
                    }
                })
            })
            .map(|(machine, _)| machine.clone())
            .collect()
    }

    /// What MDE received for `machine_id`, in order.
    pub fn machine_log(&self, machine_id: &str) -> Vec<Seen> {
        self.lock()
            .log
            .get(&machine_id.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    /// The most offboards of `machine_id` that MDE held live at once.
    pub fn most_live_at_once(&self, machine_id: &str) -> usize {
        self.lock()
            .most_live
            .get(&machine_id.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Whether action `action_id` offboarded its machine: it succeeded, and
    /// MDE has not seen the machine since.
    pub fn offboarded_by(&self, action_id: &str) -> bool {
        let state = self.lock();
        state
            .actions
            .iter()
            .any(|h| h.action.id == action_id && offboarded(&state, h))
    }

    /// Actions that exist for `machine_id`.
    pub fn actions_for(&self, machine_id: &str) -> usize {
        let state = self.lock();
        state
            .actions
            .iter()
            .filter(|h| is_machine(&h.action, machine_id))
            .count()
    }

    /// Every call made, of any kind (calls the budget refused are not made).
    pub fn calls(&self) -> u32 {
        self.lock().calls
    }

    /// An action created just now (by a previous process, say): `Pending`,
    /// listed after the list lag, moved on by MDE like any other.
    pub fn insert(&self, machine_id: &str, comment: &str) -> MachineAction {
        let mut state = self.lock();
        let now = wall(&state);
        let born = Some(Instant::now());
        create(
            &mut state,
            machine_id,
            comment,
            now,
            born,
            ActionStatus::Pending,
            now,
        )
    }

    /// An action created long before the test (listed at once, never moved
    /// on): e.g. a `Succeeded` offboard of months ago.
    pub fn insert_at(
        &self,
        machine_id: &str,
        comment: &str,
        status: ActionStatus,
        created: Timestamp,
        last_update: Timestamp,
    ) -> MachineAction {
        let mut state = self.lock();
        create(
            &mut state,
            machine_id,
            comment,
            created,
            None,
            status,
            last_update,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        move_on(&mut state);
        state
    }

    /// A slot of `family`, or the answer a client that may not wait gives.
    fn reserve(&self, family: ApiFamily) -> Result<Permit, MdeError> {
        self.budget
            .try_reserve(family)
            .map_err(|not_yet| MdeError::BudgetSpent {
                family,
                ready_in: not_yet
                    .retry_at
                    .map(|at| at.saturating_duration_since(Instant::now())),
            })
    }

    /// One page of the window read (the budget slot already taken).
    fn page(
        &self,
        since: Timestamp,
        top: usize,
        skip: usize,
    ) -> Result<Vec<MachineAction>, MdeError> {
        let mut state = self.lock();
        state.calls += 1;
        let n = next_request(&mut state);
        if let Some(Lookup::Fail(error)) = state.window_reads.pop_front() {
            return Err(error);
        }
        let top = top.clamp(1, MDE_MAX_TOP);
        // The filter's text carries whole seconds.
        let since = Timestamp::from_second(since.as_second()).unwrap_or(since);
        let mut listed: Vec<&Held> = state
            .actions
            .iter()
            .enumerate()
            .filter(|(i, h)| h.created >= since && listed_yet(&state, *i, h))
            .map(|(_, h)| h)
            .collect();
        listed.sort_by_key(|h| h.created);
        let page: Vec<&Held> = listed.into_iter().skip(skip).take(top).collect();
        let short = page.len() < top;
        let first = page.first().map(|h| h.created);
        let answer: Vec<MachineAction> = page.iter().map(|h| as_window(&h.action)).collect();
        let read = ReadKind::Page { since, skip, short };
        // A page covers a machine's last POST when it reads to the end from
        // no later than that POST.
        let covers = |last_post: Timestamp| {
            short && since <= last_post && (skip == 0 || first.is_none_or(|f| f <= last_post))
        };
        log_read(&mut state, n, &read, &answer, None, covers);
        Ok(answer)
    }
}

/// The key in a `[defender-offboard:KEY]` marker at the start of the comment.
fn key_of(comment: &str) -> Option<String> {
    let rest = comment.trim_start().strip_prefix("[defender-offboard:")?;
    let end = rest.find(']')?;
    Some(rest[..end].to_string())
}

fn is_machine(action: &MachineAction, machine_id: &str) -> bool {
    action
        .machine_id
        .as_deref()
        .is_some_and(|m| m.eq_ignore_ascii_case(machine_id))
}

fn wall(state: &State) -> Timestamp {
    let elapsed = SignedDuration::try_from(state.origin.elapsed()).unwrap_or_default();
    state.start.checked_add(elapsed).unwrap_or(state.start)
}

fn next_request(state: &mut State) -> u64 {
    state.requests += 1;
    state.requests
}

/// Whether lists show action number `i` yet.
fn listed_yet(state: &State, i: usize, held: &Held) -> bool {
    let lag = state.spikes.get(&i).copied().unwrap_or(state.list_lag);
    held.born.is_none_or(|born| born.elapsed() >= lag)
}

/// What a window read keeps of an action (as the client does: no times but
/// the creation, no requestor).
fn as_window(action: &MachineAction) -> MachineAction {
    serde_json::from_value(serde_json::json!({
        "id": action.id,
        "type": action.action_type,
        "status": action.status.as_str(),
        "machineId": action.machine_id,
        "requestorComment": action.requestor_comment,
        "cancellationComment": action.cancellation_comment,
        "creationDateTimeUtc": action.creation_date_time_utc,
    }))
    .expect("a valid MachineAction")
}

fn create(
    state: &mut State,
    machine_id: &str,
    comment: &str,
    created: Timestamp,
    born: Option<Instant>,
    status: ActionStatus,
    last_update: Timestamp,
) -> MachineAction {
    let n = state.actions.len();
    let action: MachineAction = serde_json::from_value(serde_json::json!({
        "id": format!("00000000-0000-4000-8000-{n:012}"),
        "type": "Offboard",
        "status": status.as_str(),
        "machineId": machine_id,
        "requestor": "fake-mde-app",
        "requestorComment": comment,
        "creationDateTimeUtc": created.to_string(),
        "lastUpdateDateTimeUtc": last_update.to_string(),
    }))
    .expect("a valid MachineAction");
    let live = !action.status.is_final();
    state.actions.push(Held {
        action: action.clone(),
        created,
        born,
    });
    if live {
        note_live(state, machine_id);
    }
    action
}

fn note_live(state: &mut State, machine_id: &str) {
    let live = state
        .actions
        .iter()
        .filter(|h| is_machine(&h.action, machine_id) && !h.action.status.is_final())
        .count();
    let most = state
        .most_live
        .entry(machine_id.to_ascii_lowercase())
        .or_default();
    *most = (*most).max(live);
}

/// MDE works on its offboards: each is `InProgress` from half of
/// `finish_after` and `Succeeded` at `finish_after`, its last update then.
fn move_on(state: &mut State) {
    let Some(after) = state.finish_after else {
        return;
    };
    for held in &mut state.actions {
        let Some(born) = held.born else { continue };
        let age = born.elapsed();
        let status = &held.action.status;
        let (next, at) =
            if age >= after && matches!(status, ActionStatus::Pending | ActionStatus::InProgress) {
                (ActionStatus::Succeeded, after)
            } else if age >= after / 2 && *status == ActionStatus::Pending {
                (ActionStatus::InProgress, after / 2)
            } else {
                continue;
            };
        let at = SignedDuration::try_from(at)
            .ok()
            .and_then(|d| held.created.checked_add(d).ok())
            .unwrap_or(held.created);
        held.action.status = next;
        held.action.last_update_date_time_utc = Some(at.to_string());
    }
}

/// Whether MDE holds an offboard of `machine_id` that another POST must not
/// duplicate: one not final yet, or one that offboarded the machine since
/// `first_post` (what stood before the machine's first POST that one judged).
fn stands(state: &State, machine_id: &str, first_post: Option<Timestamp>) -> bool {
    state.actions.iter().any(|h| {
        is_machine(&h.action, machine_id)
            && (!h.action.status.is_final()
                || (offboarded(state, h) && first_post.is_none_or(|at| updated(h) >= at)))
    })
}

fn updated(held: &Held) -> Timestamp {
    held.action
        .last_update_date_time_utc
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .unwrap_or(held.created)
}

/// Whether `held` offboarded its machine: it succeeded, and MDE has not seen
/// the machine since (onboarded again).
fn offboarded(state: &State, held: &Held) -> bool {
    let action = &held.action;
    let machine = action.machine_id.as_deref().unwrap_or_default();
    action.status == ActionStatus::Succeeded && last_seen(state, machine) <= updated(held)
}

/// When MDE last saw `machine_id`: as configured, else a day before the test.
fn last_seen(state: &State, machine_id: &str) -> Timestamp {
    state
        .last_seen
        .get(&machine_id.to_ascii_lowercase())
        .copied()
        .unwrap_or_else(|| default_last_seen(state))
}

/// Machines nobody configured were last seen a day before the test began.
fn default_last_seen(state: &State) -> Timestamp {
    state
        .start
        .checked_sub(SignedDuration::from_hours(24))
        .unwrap_or(state.start)
}

/// Log a read that answered `answer`: for `exact` that machine, else every
/// machine with a POST whose last POST the read `covers`.
fn log_read(
    state: &mut State,
    n: u64,
    read: &ReadKind,
    answer: &[MachineAction],
    exact: Option<&str>,
    covers: impl Fn(Timestamp) -> bool,
) {
    let machines: Vec<String> = match exact {
        Some(machine) => vec![machine.to_ascii_lowercase()],
        None => state.posts_by_machine.keys().cloned().collect(),
    };
    for machine in machines {
        let posts: Vec<Timestamp> = state
            .log
            .get(&machine)
            .into_iter()
            .flatten()
            .filter_map(|seen| match seen {
                Seen::Post { at, .. } => Some(*at),
                Seen::Read { .. } => None,
            })
            .collect();
        let last_post = posts.last().copied();
        if exact.is_none() && !last_post.is_some_and(&covers) {
            continue;
        }
        let showed = answer.iter().filter(|a| is_machine(a, &machine)).count();
        let proves = !stands(state, &machine, posts.first().copied());
        state.log.entry(machine).or_default().push(Seen::Read {
            n,
            read: read.clone(),
            showed,
            proves,
        });
    }
}

impl crate::tenants::TenantClient for FakeMde {
    fn budget(&self) -> &RateBudget {
        &self.budget
    }

    fn account(&self) -> &mde_client::Account {
        static ACCOUNT: std::sync::LazyLock<mde_client::Account> =
            std::sync::LazyLock::new(|| mde_client::Account {
                tenant: "00000000-0000-4000-8000-00000000000t".into(),
                app: "00000000-0000-4000-8000-00000000000a".into(),
                api: "https://api.security.microsoft.com/".into(),
            });
        &ACCOUNT
    }
}

impl MdeCalls for FakeMde {
    fn rate_limits(&self) -> &RateLimits {
        &self.limits
    }

    async fn find_machines_by_name(&self, name: &str) -> Result<Vec<Machine>, MdeError> {
        let _slot = self.reserve(ApiFamily::Machines)?;
        self.lock().calls += 1;
        let machine: Machine = serde_json::from_value(serde_json::json!({
            "id": "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
            "computerDnsName": name,
        }))
        .expect("a valid Machine");
        Ok(vec![machine])
    }

    async fn sign_in(&self) -> Result<(), MdeError> {
        Ok(())
    }

    async fn offboard_actions(&self, machine_id: &str) -> Result<Vec<MachineAction>, MdeError> {
        let _slot = self.reserve(ApiFamily::MachineActions)?;
        let mut state = self.lock();
        state.calls += 1;
        let n = next_request(&mut state);
        if let Some(Lookup::Fail(error)) = state.lookups.pop_front() {
            return Err(error);
        }
        let mut listed: Vec<&Held> = state
            .actions
            .iter()
            .enumerate()
            .filter(|(i, h)| is_machine(&h.action, machine_id) && listed_yet(&state, *i, h))
            .map(|(_, h)| h)
            .collect();
        listed.sort_by_key(|h| h.created);
        let answer: Vec<MachineAction> = listed.into_iter().map(|h| h.action.clone()).collect();
        log_read(
            &mut state,
            n,
            &ReadKind::Exact,
            &answer,
            Some(machine_id),
            |_| true,
        );
        Ok(answer)
    }

    async fn offboard(
        &self,
        slot: Permit,
        machine_id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        slot.complete();
        let mut state = self.lock();
        state.calls += 1;
        // As MDE's own counters would: a 429 or 401 refusal is not a POST
        // that could have created anything. A 429 pauses the family, as the
        // client does on one.
        let script = match state.sends.pop_front().unwrap_or(Send::Accept) {
            Send::Fail(error @ (MdeError::Throttled { .. } | MdeError::Unauthorized { .. })) => {
                if let MdeError::Throttled { retry_at, .. } = &error {
                    let wait = Duration::try_from(retry_at.duration_since(wall(&state)))
                        .unwrap_or_default();
                    self.budget.park(ApiFamily::Offboard, Instant::now() + wait);
                }
                return Err(error);
            }
            script => script,
        };
        let n = next_request(&mut state);
        let at = wall(&state);
        if let Some(key) = key_of(comment) {
            *state.posts_by_key.entry(key).or_default() += 1;
        }
        let machine = machine_id.to_ascii_lowercase();
        *state.posts_by_machine.entry(machine.clone()).or_default() += 1;
        let post = |state: &mut State, did| {
            let seen = Seen::Post { n, at, did };
            state.log.entry(machine.clone()).or_default().push(seen);
        };
        if let Send::Fail(error) = script {
            post(&mut state, PostDid::Nothing);
            if error.may_have_created() {
                state.refused_before_acting += 1;
            }
            return Err(error);
        }
        let pending = state
            .actions
            .iter()
            .any(|h| is_machine(&h.action, machine_id) && !h.action.status.is_final());
        let acted = if pending {
            post(&mut state, PostDid::AlreadyPending);
            Err(MdeError::AlreadyPending {
                message: "Action is already in progress".into(),
            })
        } else {
            let born = Some(Instant::now());
            let action = create(
                &mut state,
                machine_id,
                comment,
                at,
                born,
                ActionStatus::Pending,
                at,
            );
            post(&mut state, PostDid::Created(action.id.clone()));
            Ok(action)
        };
        match script {
            Send::CreateThenFail(error) => Err(error),
            _ => acted,
        }
    }

    async fn machine_actions_by_ids(&self, ids: &[String]) -> Result<Vec<MachineAction>, MdeError> {
        let mut found = Vec::new();
        for chunk in ids.chunks(IDS_PER_LIST) {
            let _slot = self.reserve(ApiFamily::MachineActions)?;
            let mut state = self.lock();
            state.calls += 1;
            found.extend(
                state
                    .actions
                    .iter()
                    .enumerate()
                    .filter(|(i, h)| chunk.contains(&h.action.id) && listed_yet(&state, *i, h))
                    .map(|(_, h)| h.action.clone()),
            );
        }
        Ok(found)
    }

    async fn offboard_actions_since(
        &self,
        since: jiff::Timestamp,
        top: usize,
        expected: &[String],
    ) -> Result<Vec<MachineAction>, MdeError> {
        let top = top.clamp(1, MDE_MAX_TOP);
        let mut actions: Vec<MachineAction> = Vec::new();
        for page in 0..WINDOW_PAGES {
            let answer = self.offboard_actions_page(since, top, page * top).await?;
            let short = answer.len() < top;
            actions.extend(answer);
            let all_found = !expected.is_empty()
                && expected
                    .iter()
                    .all(|id| actions.iter().any(|a| &a.id == id));
            if short || all_found {
                return Ok(actions);
            }
        }
        Err(MdeError::Paging {
            message: format!("more than {WINDOW_PAGES} pages of {top} offboard actions"),
        })
    }

    async fn offboard_actions_page(
        &self,
        since: jiff::Timestamp,
        top: usize,
        skip: usize,
    ) -> Result<Vec<MachineAction>, MdeError> {
        let _slot = self.reserve(ApiFamily::MachineActions)?;
        self.page(since, top, skip)
    }

    async fn get_machine(&self, id: &str) -> Result<Machine, MdeError> {
        let _slot = self.reserve(ApiFamily::Machines)?;
        let mut state = self.lock();
        state.calls += 1;
        let seen = last_seen(&state, id);
        Ok(serde_json::from_value(serde_json::json!({
            "id": id,
            "lastSeen": seen.to_string(),
        }))
        .expect("a valid Machine"))
    }

    async fn get_machine_action(&self, id: &str) -> Result<MachineAction, MdeError> {
        let _slot = self.reserve(ApiFamily::MachineActions)?;
        let mut state = self.lock();
        state.calls += 1;
        // A read by id finds an action at once, whatever the list lag.
        state
            .actions
            .iter()
            .find(|h| h.action.id == id)
            .map(|h| h.action.clone())
            .ok_or_else(|| MdeError::NotFound {
                message: format!("MachineAction {id} was not found"),
            })
    }

    async fn cancel_action(
        &self,
        slot: Permit,
        id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        slot.complete();
        let mut state = self.lock();
        state.calls += 1;
        *state.cancels_by_action.entry(id.to_string()).or_default() += 1;
        let script = state.cancels.pop_front().unwrap_or(Send::Accept);
        let cancel = |state: &mut State| {
            let now = wall(state);
            let held = state
                .actions
                .iter_mut()
                .find(|h| h.action.id == id)
                .ok_or_else(|| MdeError::NotFound {
                    message: format!("Action {id} was not found"),
                })?;
            let action = &mut held.action;
            if action.status.is_final() {
                return Err(MdeError::BadRequest {
                    status: 400,
                    code: "BadRequest".into(),
                    message: format!(
                        "Action {id} is already {} and can no longer be cancelled.",
                        action.status
                    ),
                });
            }
            action.status = ActionStatus::Cancelled;
            action.cancellation_comment = Some(comment.to_string());
            action.last_update_date_time_utc = Some(now.to_string());
            Ok(action.clone())
        };
        match script {
            Send::Accept => cancel(&mut state),
            Send::CreateThenFail(error) => {
                cancel(&mut state)?;
                Err(error)
            }
            Send::Fail(error) => Err(error),
        }
    }
}

/// How a scripted write fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailWith {
    Conflict,
    /// The process "dies" before the write lands.
    Crash,
}

/// The unit tests' Kubernetes: a [`MemoryStore`] whose chosen writes fail
/// (a test's "crash" or "conflict"), counting every attempt.
pub struct ScriptedStore {
    store: MemoryStore,
    attempts: std::sync::atomic::AtomicU64,
    /// Writes with these 1-based numbers fail.
    failing: Mutex<Vec<(u64, FailWith)>>,
}

impl ScriptedStore {
    pub fn new(object: DeviceOffboard) -> Self {
        ScriptedStore {
            store: MemoryStore::new(object),
            attempts: Default::default(),
            failing: Mutex::default(),
        }
    }

    /// Make write number `n` (1-based, counting every attempt) fail.
    pub fn fail_write(&self, n: u64, with: FailWith) {
        self.failing.lock().unwrap().push((n, with));
    }

    /// The writes scripted to fail and not reached yet will not fail.
    pub fn heal(&self) {
        self.failing.lock().unwrap().clear();
    }

    /// Write attempts so far (failed ones included).
    pub fn writes(&self) -> u64 {
        self.attempts.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn object(&self) -> DeviceOffboard {
        self.store.object()
    }

    pub fn notes(&self) -> Vec<Note> {
        self.store.notes()
    }

    pub fn add_node(&self, node: k8s_openapi::api::core::v1::Node) {
        self.store.add_node(node)
    }
}

impl StatusStore for ScriptedStore {
    async fn write_status(
        &self,
        current: &DeviceOffboard,
        status: &DeviceOffboardStatus,
    ) -> crate::error::Result<DeviceOffboard> {
        let n = self
            .attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let failing = self
            .failing
            .lock()
            .unwrap()
            .iter()
            .find(|(at, _)| *at == n)
            .map(|f| f.1);
        match failing {
            Some(FailWith::Conflict) => Err(Error::Conflict),
            Some(FailWith::Crash) => Err(Error::Kube(kube::Error::Service(
                "the process died before the write landed".into(),
            ))),
            None => self.store.write_status(current, status).await,
        }
    }

    async fn label_final(&self, current: &DeviceOffboard) -> crate::error::Result<DeviceOffboard> {
        self.store.label_final(current).await
    }

    async fn publish(&self, obj: &DeviceOffboard, note: &Note) {
        self.store.publish(obj, note).await
    }

    async fn node_back(
        &self,
        node: &crate::crd::NodeIdentity,
    ) -> crate::error::Result<Option<String>> {
        self.store.node_back(node).await
    }
}

/// A process's state whose wall clock moves with tokio's (paused) clock.
pub fn on_tokio_time() -> super::state::OffboardState {
    let (start, at) = (jiff::Timestamp::now(), tokio::time::Instant::now());
    super::state::OffboardState {
        wall: super::state::WallClock::from_fn(move || {
            let elapsed = jiff::SignedDuration::try_from(at.elapsed()).unwrap_or_default();
            start.checked_add(elapsed).unwrap_or(start)
        }),
        ..Default::default()
    }
}

/// A new process's state (it remembers nothing) on the same wall clock,
/// with the adopt index used as before.
pub fn restarted(state: &super::state::OffboardState) -> super::state::OffboardState {
    let fresh = super::state::OffboardState {
        wall: state.wall.clone(),
        after_predecessor: state.after_predecessor,
        ..Default::default()
    };
    if let Some(window) = state.adopt.window() {
        fresh.adopt.use_window(window);
    }
    fresh
}

/// The double itself: what the step's and property tests rely on it for.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::TenantClient;

    const M1: &str = "1111111111111111111111111111111111111111";
    const M2: &str = "2222222222222222222222222222222222222222";

    async fn post(mde: &FakeMde, machine: &str, key: &str) -> Result<MachineAction, MdeError> {
        let slot = mde.budget().try_reserve(ApiFamily::Offboard).unwrap();
        mde.offboard(
            slot,
            machine,
            &format!("[defender-offboard:{key}] returned"),
        )
        .await
    }

    fn ago(mde: &FakeMde, secs: i64) -> Timestamp {
        mde.now() - SignedDuration::from_secs(secs)
    }

    #[tokio::test(start_paused = true)]
    async fn window_reads_come_in_pages_and_each_page_spends_a_read() {
        let mde = FakeMde::default()
            .limits("3/60s".parse().unwrap())
            .spent(ApiFamily::MachineActions, 0);
        for i in 0..5 {
            mde.insert(&format!("{i:040}"), "by hand");
        }
        let since = ago(&mde, 60);
        let all = mde.offboard_actions_since(since, 2, &[]).await.unwrap();
        assert_eq!(all.len(), 5, "three pages of two");
        assert!(all.iter().all(|a| a.last_update_date_time_utc.is_none()));
        let spent = mde.offboard_actions_page(since, 2, 4).await;
        let Err(MdeError::BudgetSpent { family, ready_in }) = spent else {
            panic!("the budget is spent: {spent:?}");
        };
        assert_eq!(family, ApiFamily::MachineActions);
        assert_eq!(ready_in, Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(60)).await;
        let last = mde.offboard_actions_page(since, 2, 4).await.unwrap();
        assert_eq!(last.len(), 1);
        // A read budget nearly spent at the start: one read, then none.
        let busy = MdeError::Unavailable {
            status: 503,
            message: "busy".into(),
        };
        let nearly = FakeMde::default()
            .limits("10/60s".parse().unwrap())
            .spent(ApiFamily::MachineActions, 8)
            .lookups([Lookup::Complete, Lookup::Fail(busy)]);
        assert!(nearly.offboard_actions(M1).await.is_ok());
        assert!(
            matches!(
                nearly.offboard_actions(M1).await,
                Err(MdeError::Unavailable { .. })
            ),
            "a failed read spends its slot too"
        );
        assert!(matches!(
            nearly.get_machine_action("x").await,
            Err(MdeError::BudgetSpent { .. })
        ));
        assert!(nearly.get_machine(M1).await.is_ok(), "another family");
    }

    /// How many of `ids` the exact, the window and the by-id lists show.
    async fn listed(mde: &FakeMde, since: Timestamp, ids: &[String]) -> (usize, usize, usize) {
        let exact = mde.offboard_actions(M1).await.unwrap().len();
        let window = mde.offboard_actions_since(since, 10, &[]).await.unwrap();
        let by_ids = mde.machine_actions_by_ids(ids).await.unwrap().len();
        (exact, window.len(), by_ids)
    }

    #[tokio::test(start_paused = true)]
    async fn lists_lag_and_one_action_may_lag_longer() {
        let mde = FakeMde::default()
            .list_lag(Duration::from_secs(5))
            .lag_spike(1, Duration::from_secs(30));
        let first = mde.insert(M1, "a");
        let second = mde.insert(M1, "b");
        let since = ago(&mde, 1);
        let ids = [first.id.clone(), second.id.clone()];
        assert_eq!(listed(&mde, since, &ids).await, (0, 0, 0));
        assert!(
            mde.get_machine_action(&second.id).await.is_ok(),
            "a read by id finds it at once"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(listed(&mde, since, &ids).await, (1, 1, 1));
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(listed(&mde, since, &ids).await, (2, 2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_while_an_offboard_is_not_final_is_answered_already_pending() {
        let mde = FakeMde::default();
        post(&mde, M1, "a").await.unwrap();
        let again = post(&mde, M1, "b").await;
        assert!(
            matches!(again, Err(MdeError::AlreadyPending { .. })),
            "{again:?}"
        );
        assert_eq!(mde.actions_for(M1), 1, "nothing created");
        assert_eq!(mde.posts_for_machine(M1), 2, "but the POST was received");
        assert_eq!(mde.most_live_at_once(M1), 1);
        // A 429 is refused before MDE acts: not counted.
        mde.push_send(Send::Fail(MdeError::Throttled {
            family: ApiFamily::Offboard,
            retry_at: mde.now(),
        }));
        assert!(post(&mde, M2, "c").await.is_err());
        assert_eq!(mde.posts_for_machine(M2), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_post_needs_a_proving_read_since_the_first() {
        let unknown = || MdeError::OutcomeUnknown {
            reason: "timed out".into(),
        };
        // Failed before MDE acted, read, sent again: proven.
        let mde = FakeMde::default().sends([Send::Fail(unknown())]);
        assert!(post(&mde, M1, "a").await.is_err());
        assert!(mde.offboard_actions(M1).await.unwrap().is_empty());
        post(&mde, M1, "a").await.unwrap();
        assert!(mde.double_posts().is_empty(), "{:?}", mde.machine_log(M1));
        // Created, the answer lost, a read inside the list's lag shows
        // nothing: no proof, and the next POST is a double.
        let mde = FakeMde::default()
            .list_lag(Duration::from_secs(30))
            .sends([Send::CreateThenFail(unknown())]);
        assert!(post(&mde, M1, "a").await.is_err());
        assert!(mde.offboard_actions(M1).await.unwrap().is_empty());
        assert!(post(&mde, M1, "a").await.is_err(), "already pending");
        assert_eq!(mde.double_posts(), vec![M1.to_string()]);
        // A succeeded offboard stands for the machine until MDE sees it
        // again; a window page from before the POST to the end proves, one
        // from after it says nothing of it.
        let mde = FakeMde::default();
        let action = post(&mde, M1, "a").await.unwrap();
        mde.set_status(&action.id, ActionStatus::Succeeded);
        let before = ago(&mde, 10);
        mde.offboard_actions_since(before, 10, &[]).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        mde.last_seen(M1, mde.now());
        mde.offboard_actions_since(mde.now(), 10, &[])
            .await
            .unwrap();
        let proofs = |mde: &FakeMde| {
            mde.machine_log(M1)
                .iter()
                .filter_map(|s| match s {
                    Seen::Read { proves, .. } => Some(*proves),
                    Seen::Post { .. } => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(proofs(&mde), [false], "the later window does not cover it");
        mde.offboard_actions_since(before, 10, &[]).await.unwrap();
        assert_eq!(proofs(&mde), [false, true]);
        post(&mde, M1, "b").await.unwrap();
        assert!(mde.double_posts().is_empty(), "{:?}", mde.machine_log(M1));
    }

    #[tokio::test(start_paused = true)]
    async fn mde_finishes_offboards_and_knows_when_it_last_saw_a_machine() {
        let mde = FakeMde::default().finish_after(Duration::from_secs(60));
        let created = mde.now();
        let action = post(&mde, M1, "a").await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let read = mde.get_machine_action(&action.id).await.unwrap();
        assert_eq!(read.status, ActionStatus::InProgress);
        tokio::time::advance(Duration::from_secs(30)).await;
        let read = mde.get_machine_action(&action.id).await.unwrap();
        assert_eq!(read.status, ActionStatus::Succeeded);
        let updated: Timestamp = read.last_update_date_time_utc.unwrap().parse().unwrap();
        assert_eq!(updated, created + SignedDuration::from_secs(60));
        assert!(mde.offboarded_by(&action.id));
        // Seen a day before the test by default, or when the test says.
        let seen = |machine: &Machine| -> Timestamp {
            machine.last_seen.as_deref().unwrap().parse().unwrap()
        };
        let machine = mde.get_machine(M1).await.unwrap();
        assert!(seen(&machine) < created);
        tokio::time::advance(Duration::from_secs(1)).await;
        mde.last_seen(M1, mde.now());
        let machine = mde.get_machine(M1).await.unwrap();
        assert_eq!(seen(&machine), mde.now());
        assert!(
            !mde.offboarded_by(&action.id),
            "seen after it succeeded: onboarded again"
        );
        // An offboard of months ago, of another key: listed at once, as old.
        let months = ago(&mde, 90 * 86_400);
        let old = mde.insert_at(
            M2,
            "[defender-offboard:old] x",
            ActionStatus::Succeeded,
            months,
            months,
        );
        let listed = mde.offboard_actions(M2).await.unwrap();
        assert_eq!(old.creation_date_time_utc, Some(months.to_string()));
        assert_eq!(listed, [old]);
        assert_eq!(mde.most_live_at_once(M2), 0);
    }
}
