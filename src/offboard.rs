//! `defender-offboard offboard`: one device from the command line, through the
//! controller's own exactly-once path. The command holds a `DeviceOffboard` in
//! memory (its idempotency key plays the uid) and drives the same reconcile
//! step ([`step::step`]) with the MDE client; only the ending differs: it
//! exits where the controller would wait for a person.

use crate::cli::{ConnectionArgs, ProtectionArgs};
use mde_client::limiter::Permit;
use mde_client::{
    DefenderClient, Machine, MachineAction, MdeError, NoObserver, RateBudget, RateLimits,
};
use offboard_operator::crd::{
    DeviceOffboard, DeviceOffboardSpec, DeviceOffboardStatus, MAX_COMMENT_LEN, Phase,
};
use offboard_operator::metrics::Metrics;
use offboard_operator::offboard::decision::{Note, Settings};
use offboard_operator::offboard::ports::{MdeCalls, MemoryStore};
use offboard_operator::offboard::state::OffboardState;
use offboard_operator::offboard::status::{READY, Reason, condition};
use offboard_operator::offboard::step::{self, Ports};
use offboard_operator::tenants::TenantClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["machine_id", "device_name"])))]
pub struct OffboardArgs {
    /// The MDE machine id (40 lowercase hex characters).
    #[arg(long)]
    pub machine_id: Option<String>,
    /// The device's computerDnsName; must match exactly one machine.
    #[arg(long)]
    pub device_name: Option<String>,
    /// Why the device is offboarded (sent as the action's comment).
    #[arg(long)]
    pub comment: String,
    /// Poll until the action is final; exit non-zero unless it Succeeded.
    #[arg(long)]
    pub wait: bool,
    /// A key for this request: a rerun with the same key (after a crash or
    /// timeout) adopts the action the first run created instead of sending again.
    /// A run with a key looks first; when it finds nothing it waits
    /// --lookup-delay and looks again before sending (MDE's list may lag).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Pause before looking the action up after an ambiguous answer (keep it
    /// a minute above --request-timeout: MDE may still be processing a
    /// timed-out request, and list its action only later).
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub lookup_delay: Duration,
    /// How often `--wait` polls.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Give up after this long in all (waiting out 429s included); a rerun with
    /// the same --idempotency-key picks up where this one stopped.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub protection: ProtectionArgs,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// What ends the command, as one line for a person.
#[derive(thiserror::Error, Debug)]
pub enum OffboardError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Mde(#[from] MdeError),
    #[error("offboard action {id} ended {status}")]
    NotSucceeded { id: String, status: String },
    #[error("{0}")]
    Stopped(String),
}

impl OffboardError {
    pub fn exit_code(&self) -> i32 {
        match self {
            OffboardError::NotSucceeded { .. } => 2,
            _ => 1,
        }
    }
}

/// Check the flags before any network call.
pub fn validate(args: &OffboardArgs) -> Result<(), OffboardError> {
    if let Some(id) = &args.machine_id
        && !(id.len() == 40
            && id
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)))
    {
        return Err(OffboardError::Input(format!(
            "--machine-id {id:?} is not an MDE machine id: expected 40 lowercase hexadecimal characters"
        )));
    }
    if args
        .device_name
        .as_deref()
        .is_some_and(|n| n.trim().is_empty())
    {
        return Err(OffboardError::Input(
            "--device-name is empty: give the device's computerDnsName".into(),
        ));
    }
    if args.comment.trim().is_empty() {
        return Err(OffboardError::Input(
            "--comment is empty: say why the device is offboarded".into(),
        ));
    }
    if args.comment.len() > MAX_COMMENT_LEN {
        return Err(OffboardError::Input(format!(
            "--comment is longer than {MAX_COMMENT_LEN} characters"
        )));
    }
    if let Some(key) = &args.idempotency_key
        && (key.is_empty()
            || key.len() > 64
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(OffboardError::Input(
            "--idempotency-key must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
        ));
    }
    Ok(())
}

pub async fn run(args: OffboardArgs) -> Result<(), OffboardError> {
    validate(&args)?;
    let config = args
        .connection
        .client_config()
        .map_err(OffboardError::Input)?;
    let client = DefenderClient::new(config, Arc::new(NoObserver))?;
    // Sign in first: a wrong secret or unreachable login host ends here, at once.
    client.check_sign_in().await?;
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mde = Remembering::new(client.clone());
    let store = MemoryStore::with_notes(
        request(&args, &key, args.idempotency_key.is_some()),
        print_note,
    );
    let settings = Settings {
        lookup_delay: args.lookup_delay,
        retry_backoff: Duration::from_secs(2),
        access_backoff: Duration::from_secs(2),
        protection: args.protection.protection(),
        ..Settings::default()
    };
    let metrics = Metrics::default();
    let state = OffboardState::default();
    let ports = Ports {
        mde: &mde,
        store: &store,
        state: &state,
        settings: &settings,
        metrics: &metrics,
    };
    let deadline = Instant::now() + args.timeout;
    // The whole run is bounded, the waits inside a step included (a call may
    // wait in the budget for a parked family's Retry-After, up to an hour).
    let status = match tokio::time::timeout_at(deadline, drive(&ports, &args, &key)).await {
        Ok(status) => status?,
        Err(_) => {
            return Err(OffboardError::Stopped(format!(
                "gave up after --timeout {}{}",
                humantime::format_duration(args.timeout),
                key_hint(&store.object().status.unwrap_or_default(), &key)
            )));
        }
    };
    let action = mde.last(status.machine_action_id.as_deref()).ok_or_else(|| {
        OffboardError::Stopped(format!(
            "the action was recorded but not read back; rerun with --idempotency-key {key} to print it"
        ))
    })?;
    println!(
        "{}",
        serde_json::to_string_pretty(&action).expect("a MachineAction serializes")
    );
    match status.phase {
        Some(Phase::Failed) if args.wait => Err(OffboardError::NotSucceeded {
            id: action.id,
            status: action.status.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The resource the command works on: its key is the uid the marker carries.
/// A run with a key starts in `Submitting`, as if a crash had cut an earlier
/// run short: it looks first and adopts what an earlier run with that key
/// created, and sends only once a lookup after --lookup-delay proved absence.
fn request(args: &OffboardArgs, key: &str, rerun: bool) -> DeviceOffboard {
    let mut obj = DeviceOffboard::new(
        "offboard",
        DeviceOffboardSpec {
            machine_id: args.machine_id.clone(),
            device_name: args.device_name.clone(),
            comment: args.comment.clone(),
            ttl_seconds_after_finished: None,
            connection_ref: None,
            node: None,
        },
    );
    obj.metadata.uid = Some(key.to_string());
    obj.metadata.generation = Some(1);
    if rerun {
        obj.status = Some(DeviceOffboardStatus {
            phase: Some(Phase::Submitting),
            machine_id: args.machine_id.clone(),
            ..DeviceOffboardStatus::default()
        });
    }
    obj
}

fn print_note(note: &Note) {
    eprintln!("{}: {}", note.reason.event_reason(), note.message);
}

/// Step until the action is recorded (and final, with `--wait`), or until the
/// status says a person must act.
async fn drive(
    ports: &Ports<'_, Remembering, MemoryStore>,
    args: &OffboardArgs,
    key: &str,
) -> Result<DeviceOffboardStatus, OffboardError> {
    loop {
        let obj = ports.store.object();
        let status = obj.status.clone().unwrap_or_default();
        let pause = if let Some(id) = status.machine_action_id.clone() {
            if !args.wait || status.phase.is_some_and(Phase::is_terminal) {
                return Ok(status);
            }
            poll(ports, &obj, &id).await?;
            args.poll_interval
        } else {
            if let Some(stop) = must_stop(&status, key) {
                return Err(stop);
            }
            let requeue = step::step(&obj, ports)
                .await
                .map_err(|e| OffboardError::Stopped(e.to_string()))?;
            let after = ports.store.object().status.unwrap_or_default();
            if after.machine_action_id.is_some() || must_stop(&after, key).is_some() {
                continue;
            }
            requeue.unwrap_or(Duration::from_millis(100))
        };
        tokio::time::sleep(pause).await;
    }
}

/// Read the action once and fold it in; a transient failure only waits.
async fn poll(
    ports: &Ports<'_, Remembering, MemoryStore>,
    obj: &DeviceOffboard,
    id: &str,
) -> Result<(), OffboardError> {
    match ports.mde.get_machine_action(id).await {
        Ok(action) => step::record_poll(ports, obj, &action)
            .await
            .map_err(|e| OffboardError::Stopped(e.to_string())),
        Err(error @ MdeError::Throttled { .. }) | Err(error @ MdeError::Unavailable { .. }) => {
            eprintln!("{error}; polling again");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Where the controller would wait for a person (a final failure, bad
/// credentials, a missing permission), the command stops with that message.
fn must_stop(status: &DeviceOffboardStatus, key: &str) -> Option<OffboardError> {
    let ready = condition(status, READY)?;
    // Paging that never ends will not improve by retrying in a command's lifetime.
    let unusable = status
        .last_error
        .as_ref()
        .is_some_and(|e| e.code == "PagingFailed");
    let person_must_act = status.phase == Some(Phase::Failed)
        || unusable
        || [Reason::AuthenticationFailed, Reason::PermissionDenied]
            .iter()
            .any(|r| r.as_str() == ready.reason);
    person_must_act.then(|| {
        let message = status
            .last_error
            .as_ref()
            .map_or(ready.message.as_str(), |e| e.message.as_str());
        OffboardError::Input(format!("{}{}", as_flags(message), key_hint(status, key)))
    })
}

/// The decision names the resource's fields; the command's user knows flags.
fn as_flags(message: &str) -> String {
    message
        .replace("; retrying the lookup before any resend", "")
        .replace(
            "create the DeviceOffboard with spec.machineId set to",
            "rerun with --machine-id set to",
        )
        .replace("spec.machineId", "--machine-id")
        .replace("spec.deviceName", "--device-name")
}

/// Once a send may have created an action, every way out names the key that
/// lets a rerun adopt it instead of sending again.
fn key_hint(status: &DeviceOffboardStatus, key: &str) -> String {
    if status.phase == Some(Phase::Submitting) && status.attempts.unwrap_or(0) > 0 {
        format!(
            "; an offboard action may have been created: rerun with --idempotency-key {key} to adopt it instead of sending again"
        )
    } else {
        String::new()
    }
}

/// The MDE client, remembering the MachineActions it saw, so the command can
/// print the action the step recorded without reading it again.
struct Remembering {
    client: DefenderClient,
    seen: Mutex<HashMap<String, MachineAction>>,
}

impl Remembering {
    fn new(client: DefenderClient) -> Self {
        Remembering {
            client,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn last(&self, id: Option<&str>) -> Option<MachineAction> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(id?).cloned()
    }

    fn remember<'a>(&self, actions: impl IntoIterator<Item = &'a MachineAction>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for action in actions {
            seen.insert(action.id.clone(), action.clone());
        }
    }
}

impl TenantClient for Remembering {
    fn budget(&self) -> &RateBudget {
        self.client.budget()
    }

    fn account(&self) -> &mde_client::Account {
        self.client.account()
    }
}

impl MdeCalls for Remembering {
    async fn get_machine_action(&self, id: &str) -> Result<MachineAction, MdeError> {
        let result = self.client.get_machine_action(id).await;
        self.remember(result.as_ref().ok());
        result
    }

    async fn cancel_action(
        &self,
        slot: Permit,
        id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        let result = self.client.cancel_action(Some(slot), id, comment).await;
        self.remember(result.as_ref().ok());
        result
    }

    fn rate_limits(&self) -> &RateLimits {
        self.client.rate_limits()
    }

    async fn find_machines_by_name(&self, name: &str) -> Result<Vec<Machine>, MdeError> {
        self.client.find_machines_by_name(name).await
    }

    async fn sign_in(&self) -> Result<(), MdeError> {
        self.client.check_sign_in().await
    }

    async fn offboard_actions(&self, machine_id: &str) -> Result<Vec<MachineAction>, MdeError> {
        let result = self.client.offboard_actions(machine_id).await;
        self.remember(result.iter().flatten());
        result
    }

    async fn offboard(
        &self,
        slot: Permit,
        machine_id: &str,
        comment: &str,
    ) -> Result<MachineAction, MdeError> {
        let result = self
            .client
            .offboard_reserved(Some(slot), machine_id, comment)
            .await;
        self.remember(result.as_ref().ok());
        result
    }

    async fn machine_actions_by_ids(&self, ids: &[String]) -> Result<Vec<MachineAction>, MdeError> {
        self.client.machine_actions_by_ids(ids).await
    }

    async fn offboard_actions_since(
        &self,
        since: jiff::Timestamp,
        top: usize,
        expected: &[String],
    ) -> Result<Vec<MachineAction>, MdeError> {
        self.client
            .offboard_actions_since(since, top, expected)
            .await
    }

    async fn offboard_actions_page(
        &self,
        since: jiff::Timestamp,
        top: usize,
        skip: usize,
    ) -> Result<Vec<MachineAction>, MdeError> {
        self.client.offboard_actions_page(since, top, skip).await
    }

    async fn get_machine(&self, id: &str) -> Result<Machine, MdeError> {
        self.client.get_machine(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: OffboardArgs,
    }

    fn parse(extra: &[&str]) -> OffboardArgs {
        let mut argv = vec!["offboard"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn bad_input_is_named() {
        let err = validate(&parse(&["--machine-id", "ABC", "--comment", "x"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--machine-id") && err.contains("40 lowercase"),
            "{err}"
        );
        let err = validate(&parse(&["--device-name", "pc", "--comment", "  "]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--comment"), "{err}");
        let err = validate(&parse(&[
            "--device-name",
            "pc",
            "--comment",
            "x",
            "--idempotency-key",
            "a b",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("--idempotency-key"), "{err}");
        assert!(
            validate(&parse(&[
                "--machine-id",
                &"a".repeat(40),
                "--comment",
                "retired"
            ]))
            .is_ok()
        );
    }
}
