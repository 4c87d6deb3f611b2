//! An in-memory MDE for unit tests of the reconcile step: scripted send
//! outcomes, a list that can lag or fail, and offboard POSTs counted per
//! correlation key, whatever the answer. It parses the marker itself rather
//! than calling the client's helpers, so it cannot share their mistakes.

use super::decision::Note;
use super::ports::{MdeCalls, MemoryStore, StatusStore};
use crate::crd::{DeviceOffboard, DeviceOffboardStatus};
use crate::error::Error;
use mde_client::limiter::Permit;
use mde_client::{ActionStatus, Machine, MachineAction, MdeError, RateBudget, RateLimits};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// What one offboard POST does.
#[derive(Debug, Clone)]
pub enum Send {
    /// Create the action and answer it.
    Accept,
    /// Create the action, then lose the answer with this error (timeout,
    /// reset, 5xx after the fact, a garbled 2xx body).
    CreateThenFail(MdeError),
    /// Answer this error without creating anything (timeout before MDE
    /// acted, 5xx, 429, 401, ...).
    Fail(MdeError),
}

/// What one lookup (list of a machine's actions) answers.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The truth: every action created so far.
    Complete,
    Fail(MdeError),
}

#[derive(Default)]
struct State {
    actions: Vec<MachineAction>,
    /// When each action was created (MDE lists it `list_lag` later).
    created: Vec<tokio::time::Instant>,
    list_lag: std::time::Duration,
    /// POSTs that failed ambiguously without creating anything: the only
    /// ones after which a second POST for the key is right.
    refused_before_acting: u32,
    posts_by_key: BTreeMap<String, u32>,
    sends: VecDeque<Send>,
    /// Scripted cancel outcomes (`Accept` cancels a non-final action).
    cancels: VecDeque<Send>,
    /// Cancel POSTs received per action id, whatever the answer.
    cancels_by_action: BTreeMap<String, u32>,
    lookups: VecDeque<Lookup>,
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
            state: Mutex::new(State::default()),
        }
    }
}

impl FakeMde {
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
        if let Some(action) = self.lock().actions.iter_mut().find(|a| a.id == action_id) {
            action.status = status;
        }
    }

    /// Append a scripted lookup outcome.
    pub fn push_lookup(&self, lookup: Lookup) {
        self.lock().lookups.push_back(lookup);
    }

    /// Script the next lookups (then every lookup is complete).
    pub fn lookups(self, script: impl IntoIterator<Item = Lookup>) -> Self {
        self.lock().lookups.extend(script);
        self
    }

    /// Offboard POSTs received with `key` in their marker, whatever the answer.
    pub fn posts_for(&self, key: &str) -> u32 {
        self.lock().posts_by_key.get(key).copied().unwrap_or(0)
    }

    /// Actions that exist for `machine_id`.
    pub fn actions_for(&self, machine_id: &str) -> usize {
        let state = self.lock();
        state
            .actions
            .iter()
            .filter(|a| a.machine_id.as_deref() == Some(machine_id))
            .count()
    }

    /// Every call made, of any kind.
    pub fn calls(&self) -> u32 {
        self.lock().calls
    }

    /// An action created earlier (by a previous process, say).
    pub fn insert(&self, machine_id: &str, comment: &str) -> MachineAction {
        let mut state = self.lock();
        let action = new_action(state.actions.len(), machine_id, comment);
        state.actions.push(action.clone());
        state.created.push(tokio::time::Instant::now());
        action
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The key in a `[defender-offboard:KEY]` marker at the start of the comment.
fn key_of(comment: &str) -> Option<String> {
    let rest = comment.strip_prefix("[defender-offboard:")?;
    let end = rest.find(']')?;
    Some(rest[..end].to_string())
}

fn new_action(n: usize, machine_id: &str, comment: &str) -> MachineAction {
    serde_json::from_value(serde_json::json!({
        "id": format!("00000000-0000-4000-8000-{n:012}"),
        "type": "Offboard",
        "status": "Pending",
        "machineId": machine_id,
        "requestorComment": comment,
        "creationDateTimeUtc": format!("2026-01-01T00:00:{:02}Z", n % 60),
    }))
    .expect("a valid MachineAction")
}

impl crate::tenants::TenantClient for FakeMde {
    fn budget(&self) -> &RateBudget {
        &self.budget
    }
}

impl MdeCalls for FakeMde {
    fn rate_limits(&self) -> &RateLimits {
        &self.limits
    }

    async fn find_machines_by_name(&self, name: &str) -> Result<Vec<Machine>, MdeError> {
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
        let mut state = self.lock();
        state.calls += 1;
        let lag = state.list_lag;
        match state.lookups.pop_front().unwrap_or(Lookup::Complete) {
            Lookup::Fail(error) => Err(error),
            Lookup::Complete => Ok(state
                .actions
                .iter()
                .zip(&state.created)
                .filter(|(a, created)| {
                    a.machine_id.as_deref() == Some(machine_id) && created.elapsed() >= lag
                })
                .map(|(a, _)| a.clone())
                .collect()),
        }
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
        let script = state.sends.pop_front().unwrap_or(Send::Accept);
        // As MDE's own counters would: a 429 or 401 refusal is not a POST
        // that could have created anything.
        let refused = matches!(
            &script,
            Send::Fail(MdeError::Throttled { .. } | MdeError::Unauthorized { .. })
        );
        if let Some(key) = key_of(comment).filter(|_| !refused) {
            *state.posts_by_key.entry(key).or_default() += 1;
        }
        let create = |state: &mut State| {
            let action = new_action(state.actions.len(), machine_id, comment);
            state.actions.push(action.clone());
            state.created.push(tokio::time::Instant::now());
            action
        };
        match script {
            Send::Accept => Ok(create(&mut state)),
            Send::CreateThenFail(error) => {
                create(&mut state);
                Err(error)
            }
            Send::Fail(error) => {
                if error.may_have_created() {
                    state.refused_before_acting += 1;
                }
                Err(error)
            }
        }
    }

    async fn machine_actions_by_ids(&self, ids: &[String]) -> Result<Vec<MachineAction>, MdeError> {
        let mut state = self.lock();
        state.calls += 1;
        Ok(state
            .actions
            .iter()
            .filter(|a| ids.contains(&a.id))
            .cloned()
            .collect())
    }

    async fn offboard_actions_since(
        &self,
        since: jiff::Timestamp,
        _top: usize,
        _expected: &[String],
    ) -> Result<Vec<MachineAction>, MdeError> {
        let mut state = self.lock();
        state.calls += 1;
        Ok(state
            .actions
            .iter()
            .filter(|a| {
                a.creation_date_time_utc
                    .as_deref()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| t >= since)
            })
            .cloned()
            .collect())
    }

    async fn get_machine_action(&self, id: &str) -> Result<MachineAction, MdeError> {
        let mut state = self.lock();
        state.calls += 1;
        state
            .actions
            .iter()
            .find(|a| a.id == id)
            .cloned()
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
            let action = state
                .actions
                .iter_mut()
                .find(|a| a.id == id)
                .ok_or_else(|| MdeError::NotFound {
                    message: format!("Action {id} was not found"),
                })?;
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
        ..Default::default()
    };
    if let Some(window) = state.adopt.window() {
        fresh.adopt.use_window(window);
    }
    fresh
}
