//! `defender-offboard plan`: what the operator would do for `DeviceOffboard`
//! manifests, before they are applied, with read-only MDE calls.
//!
//! Each resource goes through the controller's own decision functions on a
//! fresh status: [`decision::plan`] says what to read, [`decision::after_resolve`]
//! chooses the record of a `deviceName` (and refuses a protected one),
//! [`decision::after_machine_read`] checks the record a `machineId` names, and
//! [`decision::found_in`] says which existing action the resource would adopt.
//! Nothing here decides on its own what the operator would do; only the
//! checks the API server's schema makes on apply are repeated, so an invalid
//! manifest shows as `invalid` instead of an error from `kubectl apply`.

use crate::cli::{ConnectionArgs, ProtectionArgs};
use mde_client::{ActionStatus, DefenderClient, Machine, MachineAction, MdeError, NoObserver};
use offboard_operator::crd::{DeviceOffboard, DeviceOffboardStatus, MAX_COMMENT_LEN};
use offboard_operator::offboard::decision::{
    self, Found, Plan, Settings, Transition, View, pending_in,
};
use offboard_operator::offboard::status::{READY, condition};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The exit codes, as `--help` and docs/operations.md ("Plan before apply") state them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  every resource would be sent, would adopt an existing action, or needs
     nothing (already offboarded); resources of another connection are skipped
  2  some resource would not be offboarded: not-found, ambiguous, protected,
     identity-unverified or invalid
  1  an error: a manifest cannot be read, or MDE cannot be read (the plan is
     incomplete)";

/// Exit code: every resource would be offboarded or needs nothing.
pub const EXIT_OK: i32 = 0;
/// Exit code: an error; the plan is incomplete.
pub const EXIT_ERROR: i32 = 1;
/// Exit code: some resource would not be offboarded.
pub const EXIT_NOT_OFFBOARDED: i32 = 2;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = EXIT_CODES)]
pub struct PlanArgs {
    /// Manifests, as `kubectl apply -f` takes them: a file, a directory (its
    /// .yaml, .yml and .json files), or `-` for standard input. Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    pub filenames: Vec<PathBuf>,
    /// Read the directories' subdirectories too.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// `text` (a table, then the details) or `json` (one array).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Plan the DeviceOffboards whose spec.connectionRef names this
    /// DefenderConnection (give that tenant's credentials); by default those
    /// without spec.connectionRef. The others are listed as skipped.
    #[arg(long, value_name = "NAME")]
    pub connection_ref: Option<String>,
    /// As `run --adopt-window`: how far back another request's Succeeded
    /// offboard may stand for a machine not seen since.
    #[arg(long, default_value = "180d", value_parser = humantime::parse_duration)]
    pub adopt_window: Duration,
    #[command(flatten)]
    pub protection: ProtectionArgs,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

/// What ends the command before any row: a manifest or the sign-in.
#[derive(thiserror::Error, Debug)]
pub enum PlanError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Mde(#[from] MdeError),
}

/// What the operator would do for one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Send an offboard request.
    Send,
    /// Record an action that exists (or that an earlier resource sends).
    Adopt,
    /// Send nothing; `reason` says why.
    Nothing,
    /// Not planned here (another connection's resource).
    Skipped,
    /// MDE could not be read for it.
    Error,
}

/// Why nothing would be sent (`reason` of a `nothing` row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nothing {
    AlreadyOffboarded,
    NotFound,
    Ambiguous,
    Protected,
    IdentityUnverified,
    Invalid,
}

impl Nothing {
    fn as_str(self) -> &'static str {
        match self {
            Nothing::AlreadyOffboarded => "already-offboarded",
            Nothing::NotFound => "not-found",
            Nothing::Ambiguous => "ambiguous",
            Nothing::Protected => "protected",
            Nothing::IdentityUnverified => "identity-unverified",
            Nothing::Invalid => "invalid",
        }
    }
}

/// The MDE record a row is about, as the portal shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    pub computer_dns_name: Option<String>,
    pub os_platform: Option<String>,
    pub health_status: Option<String>,
    pub last_seen: Option<String>,
    pub onboarding_status: Option<String>,
    pub machine_tags: Vec<String>,
}

impl From<&Machine> for Record {
    fn from(m: &Machine) -> Self {
        Record {
            id: m.id.clone(),
            computer_dns_name: m.computer_dns_name.clone(),
            os_platform: m.os_platform.clone(),
            health_status: m.health_status.clone(),
            last_seen: m.last_seen.clone(),
            onboarding_status: m.onboarding_status.clone(),
            machine_tags: m.machine_tags.clone(),
        }
    }
}

/// One resource's plan.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The file (`-` for standard input) and the document's place in it.
    pub source: String,
    pub namespace: Option<String>,
    pub name: String,
    pub device_name: Option<String>,
    pub machine_id: Option<String>,
    pub action: Action,
    /// For `adopt` and `already-offboarded`: the existing action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    /// For `adopt` of an action not sent yet: the earlier resource that sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopts_from: Option<String>,
    /// For `nothing`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Nothing>,
    /// The record that would be offboarded (or was refused).
    pub machine: Option<Record>,
    /// Which records matched the name, which was chosen and why the others
    /// were skipped (the controller's `status.resolution`).
    pub resolution: Option<String>,
    /// What the operator would write to `Ready` (or the read's error).
    pub message: Option<String>,
    pub notes: Vec<String>,
}

impl Row {
    fn new(source: String, obj: &DeviceOffboard) -> Self {
        Row {
            source,
            namespace: obj.metadata.namespace.clone(),
            name: obj.metadata.name.clone().unwrap_or_default(),
            device_name: obj.spec.device_name.clone(),
            machine_id: obj.spec.machine_id.clone(),
            action: Action::Error,
            action_id: None,
            adopts_from: None,
            reason: None,
            machine: None,
            resolution: None,
            message: None,
            notes: Vec::new(),
        }
    }

    fn nothing(mut self, reason: Nothing, message: impl Into<String>) -> Self {
        self.action = Action::Nothing;
        self.reason = Some(reason);
        self.message = Some(message.into());
        self
    }

    fn error(mut self, message: impl Into<String>) -> Self {
        self.action = Action::Error;
        self.message = Some(message.into());
        self
    }

    /// `namespace/name`, or the name alone.
    fn resource(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// `send`, `adopt <id>`, `nothing: <reason>`...
    fn action_text(&self) -> String {
        match (&self.action, &self.reason) {
            (Action::Send, _) => "send".into(),
            (Action::Adopt, _) => match (&self.action_id, &self.adopts_from) {
                (Some(id), _) => format!("adopt {id}"),
                (None, Some(from)) => format!("adopt (from {from})"),
                (None, None) => "adopt".into(),
            },
            (Action::Nothing, Some(reason)) => format!("nothing: {}", reason.as_str()),
            (Action::Nothing, None) => "nothing".into(),
            (Action::Skipped, _) => "skipped".into(),
            (Action::Error, _) => "error".into(),
        }
    }
}

/// The exit code for these rows (see [`EXIT_CODES`]).
pub fn exit_code(rows: &[Row]) -> i32 {
    if rows.iter().any(|r| r.action == Action::Error) {
        EXIT_ERROR
    } else if rows
        .iter()
        .any(|r| r.action == Action::Nothing && r.reason != Some(Nothing::AlreadyOffboarded))
    {
        EXIT_NOT_OFFBOARDED
    } else {
        EXIT_OK
    }
}

pub async fn run(args: PlanArgs) -> Result<i32, PlanError> {
    let (manifests, notes) = read_manifests(&args.filenames, args.recursive)?;
    for note in &notes {
        eprintln!("plan: {note}");
    }
    let config = args.connection.client_config().map_err(PlanError::Input)?;
    let client = DefenderClient::new(config, Arc::new(NoObserver))?;
    client.check_sign_in().await?;
    let settings = Settings {
        adopt_window: args.adopt_window,
        protection: args.protection.protection(),
        ..Settings::default()
    };
    let mut planner = Planner {
        client: &client,
        settings: &settings,
        connection_ref: args.connection_ref.as_deref(),
        sending: HashMap::new(),
    };
    let mut rows = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        rows.push(planner.row(manifest).await);
    }
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialize")
        ),
        OutputFormat::Text => print!("{}", text(&rows)),
    }
    let code = exit_code(&rows);
    eprintln!("plan: {}; exit {code}", summary(&rows));
    Ok(code)
}

/// One manifest document that names a DeviceOffboard.
pub struct Manifest {
    pub source: String,
    /// The resource, or why it is not one the API server would accept.
    pub object: Result<DeviceOffboard, (String, String)>,
}

/// Every DeviceOffboard in `paths`, and notes on what was skipped.
pub fn read_manifests(
    paths: &[PathBuf],
    recursive: bool,
) -> Result<(Vec<Manifest>, Vec<String>), PlanError> {
    let mut manifests = Vec::new();
    let mut notes = Vec::new();
    for path in paths {
        let inputs = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| PlanError::Input(format!("-f -: cannot read standard input: {e}")))?;
            vec![("-".to_string(), text)]
        } else {
            let mut files = Vec::new();
            collect_files(path, recursive, true, &mut files)?;
            files
                .into_iter()
                .map(|file| {
                    std::fs::read_to_string(&file)
                        .map(|text| (file.display().to_string(), text))
                        .map_err(|e| {
                            PlanError::Input(format!("-f {}: cannot read: {e}", file.display()))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        for (source, text) in inputs {
            for (n, document) in documents(&source, &text)?.into_iter().enumerate() {
                expand(
                    document,
                    &format!("{source}#{}", n + 1),
                    &mut manifests,
                    &mut notes,
                );
            }
        }
    }
    Ok((manifests, notes))
}

/// The manifest files under `path`: `path` itself when it is a file (any
/// name, as kubectl takes it), else the directory's .yaml, .yml and .json
/// files in name order, and its subdirectories' with `recursive`.
fn collect_files(
    path: &Path,
    recursive: bool,
    top: bool,
    files: &mut Vec<PathBuf>,
) -> Result<(), PlanError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| PlanError::Input(format!("-f {}: {e}", path.display())))?;
    if !meta.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    if !top && !recursive {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| PlanError::Input(format!("-f {}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, recursive, false, files)?;
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["yaml", "yml", "json"].contains(&e))
        {
            files.push(entry);
        }
    }
    Ok(())
}

/// The documents of one input: a JSON stream, or multi-document YAML.
fn documents(source: &str, text: &str) -> Result<Vec<serde_json::Value>, PlanError> {
    let bad = |e: String| PlanError::Input(format!("-f {source}: not YAML or JSON: {e}"));
    if text.trim_start().starts_with('{') {
        return serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()));
    }
    let mut out = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).map_err(|e| bad(e.to_string()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

const API_GROUP: &str = "defender.offboard.dev/";

/// A document's DeviceOffboards: itself, or a `List`'s items; others noted.
fn expand(
    value: serde_json::Value,
    source: &str,
    manifests: &mut Vec<Manifest>,
    notes: &mut Vec<String>,
) {
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    if kind.ends_with("List")
        && let Some(items) = value["items"].as_array()
    {
        for (n, item) in items.iter().enumerate() {
            expand(
                item.clone(),
                &format!("{source} item {}", n + 1),
                manifests,
                notes,
            );
        }
        return;
    }
    if kind != "DeviceOffboard" || !api_version.starts_with(API_GROUP) {
        let name = value["metadata"]["name"].as_str().unwrap_or("(no name)");
        let kind = if kind.is_empty() { "(no kind)" } else { &kind };
        notes.push(format!(
            "skipped {kind} {name:?} ({source}): not a DeviceOffboard"
        ));
        return;
    }
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or("(no name)")
        .to_string();
    let object = serde_json::from_value::<DeviceOffboard>(value)
        .map_err(|e| (name, format!("not a valid DeviceOffboard: {e}")))
        .and_then(|obj| match spec_problem(&obj) {
            Some(problem) => Err((obj.metadata.name.clone().unwrap_or_default(), problem)),
            None => Ok(obj),
        });
    manifests.push(Manifest {
        source: source.to_string(),
        object,
    });
}

/// What the API server's schema refuses on apply (the CRD's rules), named
/// as it names it.
pub fn spec_problem(obj: &DeviceOffboard) -> Option<String> {
    let spec = &obj.spec;
    if obj.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Some("metadata.name is missing".into());
    }
    if spec.machine_id.is_some() == spec.device_name.is_some() {
        return Some("exactly one of spec.machineId or spec.deviceName must be set".into());
    }
    if let Some(id) = &spec.machine_id
        && !(id.len() == 40
            && id
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)))
    {
        return Some(format!(
            "spec.machineId {id:?} is not an MDE machine id: 40 lowercase hexadecimal characters"
        ));
    }
    if let Some(name) = &spec.device_name {
        let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        let valid = (1..=255).contains(&name.len())
            && edge(name.chars().next())
            && edge(name.chars().last())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !valid {
            return Some(format!(
                "spec.deviceName {name:?} is not a device name: letters, digits, '.', '_' and '-', starting and ending with a letter or digit"
            ));
        }
    }
    if spec.node.is_some() && spec.device_name.is_none() {
        return Some("spec.node goes with spec.deviceName".into());
    }
    if spec.comment.trim().is_empty() {
        return Some("spec.comment must not be blank: say why the device is offboarded".into());
    }
    if spec.comment.chars().count() > MAX_COMMENT_LEN {
        return Some(format!(
            "spec.comment is longer than {MAX_COMMENT_LEN} characters"
        ));
    }
    if spec.comment.contains("[defender-offboard:") {
        return Some(
            "spec.comment must not carry a [defender-offboard:...] marker: the operator adds its own"
                .into(),
        );
    }
    None
}

/// The plan of one resource after another, with what earlier rows send.
struct Planner<'a> {
    client: &'a DefenderClient,
    settings: &'a Settings,
    connection_ref: Option<&'a str>,
    /// Machine id → the resource planned to send for it: a later resource
    /// for the machine adopts that action (one offboard per machine).
    sending: HashMap<String, String>,
}

/// How many times a read is tried when MDE throttles or is briefly unavailable.
const READ_ATTEMPTS: usize = 3;

/// A read, tried again after a 429 (the client's budget then waits out
/// MDE's Retry-After) or a transient failure.
async fn read<T, F, Fut>(call: F) -> Result<T, MdeError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, MdeError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Err(
                MdeError::Throttled { .. }
                | MdeError::Unavailable { .. }
                | MdeError::NotSent { .. }
                | MdeError::OutcomeUnknown { .. },
            ) if attempt < READ_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

impl Planner<'_> {
    async fn row(&mut self, manifest: Manifest) -> Row {
        let obj = match manifest.object {
            Ok(obj) => obj,
            Err((name, problem)) => {
                let mut row = Row::new(manifest.source, &blank(&name));
                row.name = name;
                return row.nothing(Nothing::Invalid, problem);
            }
        };
        let mut row = Row::new(manifest.source, &obj);
        let connection = obj.spec.connection_ref.as_ref().map(|c| c.name.as_str());
        if connection != self.connection_ref {
            row.action = Action::Skipped;
            row.message = Some(match connection {
                Some(name) => format!(
                    "offboarded through DefenderConnection {name:?}: plan it with that tenant's credentials and --connection-ref {name}"
                ),
                None => {
                    "uses the operator's own credentials: plan it without --connection-ref".into()
                }
            });
            return row;
        }
        self.plan(obj, row).await
    }

    async fn plan(&mut self, obj: DeviceOffboard, mut row: Row) -> Row {
        let status = DeviceOffboardStatus::default();
        let view = View {
            spec: &obj.spec,
            status: &status,
            generation: Some(1),
            now: jiff::Timestamp::now(),
            submitting: None,
            retry_wait: None,
            cancel: None,
            cancel_clock: None,
            not_found_for: None,
            own_retry_at: false,
            created: None,
            tenant: None,
        };
        let machine = match decision::plan(&view, self.settings) {
            Plan::Resolve {
                device_name,
                check_node,
            } => {
                if check_node {
                    row.notes.push(format!(
                        "made for deleted Node {:?}: the operator first waits --node-offboard-grace and sends nothing if the Node is back (not checked here); --node-identity taken as required",
                        obj.spec.node.as_ref().map_or("", |n| n.name.as_str())
                    ));
                }
                let found = read(|| self.client.find_machines_by_name(&device_name)).await;
                let machines = match found {
                    Ok(machines) => machines,
                    Err(error) => {
                        return row
                            .error(format!("listing machines named {device_name:?}: {error}"));
                    }
                };
                match decision::after_resolve(
                    &view,
                    &device_name,
                    Ok(machines.clone()),
                    self.settings,
                ) {
                    Ok(resolution) => {
                        row.resolution = Some(resolution.why);
                        machines.into_iter().find(|m| m.id == resolution.machine_id)
                    }
                    Err(transition) => return refused(row, &transition, &machines),
                }
            }
            Plan::CheckProtection { machine_id } | Plan::Submit { machine_id, .. } => {
                let machine = match read(|| self.client.get_machine(&machine_id)).await {
                    Ok(machine) => machine,
                    Err(MdeError::NotFound { message }) => {
                        return row.nothing(
                            Nothing::NotFound,
                            format!(
                                "MDE has no machine {machine_id} ({message}); the operator confirms a 404 once more before it fails the resource"
                            ),
                        );
                    }
                    Err(error) => {
                        return row.error(format!("reading machine {machine_id}: {error}"));
                    }
                };
                let checked = decision::after_machine_read(
                    &view,
                    &machine_id,
                    Ok(machine.clone()),
                    self.settings,
                );
                match checked {
                    Ok(resolution) => row.resolution = Some(resolution.why),
                    Err(transition) => {
                        return refused(row, &transition, std::slice::from_ref(&machine));
                    }
                }
                Some(machine)
            }
            Plan::Write(transition) => return refused(row, &transition, &[]),
            other => {
                return row.error(format!(
                    "unexpected first step for a new resource: {other:?}"
                ));
            }
        };
        let Some(machine) = machine else {
            return row.error("the chosen record is not in MDE's answer");
        };
        row.machine = Some(Record::from(&machine));
        if !machine
            .os_platform
            .as_deref()
            .is_some_and(|p| p.starts_with("Windows"))
        {
            row.notes.push(format!(
                "MDE decides whether it offboards {} devices: a tenant may answer OsPlatformNotSupported (the operator then ends the resource Failed, PlatformNotSupported)",
                machine.os_platform.as_deref().unwrap_or("unknown-platform")
            ));
        }
        if let Some(earlier) = self.sending.get(&machine.id) {
            row.action = Action::Adopt;
            row.adopts_from = Some(earlier.clone());
            row.message = Some(format!(
                "{earlier} sends the offboard of this machine first; this resource adopts its action"
            ));
            return row;
        }
        let actions = match read(|| self.client.offboard_actions(&machine.id)).await {
            Ok(actions) => actions,
            Err(error) => {
                return row.error(format!(
                    "listing the offboard actions of {}: {error}",
                    machine.id
                ));
            }
        };
        let key = obj
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let now = jiff::Timestamp::now();
        match decision::found_in(&actions, &key, Some(&machine), now, self.settings) {
            Found::Ours(action) | Found::Shared { action, .. } => adopted(row, &action),
            Found::Nothing | Found::NeedsMachine => match pending_in(&actions) {
                // MDE refuses a second offboard while one is pending, and the
                // operator adopts the pending one.
                Some(pending) => adopted(row, pending),
                None => {
                    self.sending.insert(machine.id.clone(), row.resource());
                    row.action = Action::Send;
                    row
                }
            },
        }
    }
}

/// A resource that only carries a name (for the row of one that did not read).
fn blank(name: &str) -> DeviceOffboard {
    DeviceOffboard::new(
        name,
        offboard_operator::crd::DeviceOffboardSpec {
            machine_id: None,
            device_name: None,
            comment: String::new(),
            ttl_seconds_after_finished: None,
            connection_ref: None,
            node: None,
        },
    )
}

/// The row of an existing action the resource would take as its own.
fn adopted(mut row: Row, action: &MachineAction) -> Row {
    row.action_id = Some(action.id.clone());
    if action.status == ActionStatus::Succeeded {
        return row.nothing(
            Nothing::AlreadyOffboarded,
            format!(
                "offboard action {} Succeeded and MDE has not seen the machine since: the resource adopts it and ends Succeeded",
                action.id
            ),
        );
    }
    row.action = Action::Adopt;
    row.message = Some(format!(
        "offboard action {} is {}: the resource adopts it",
        action.id, action.status
    ));
    row
}

/// The row of a resource the decision ends without sending.
fn refused(row: Row, transition: &Transition, records: &[Machine]) -> Row {
    let ready = condition(&transition.status, READY);
    let reason = ready.map_or("", |c| c.reason.as_str());
    let message = ready.map_or_else(String::new, |c| c.message.clone());
    let nothing = match reason {
        "DeviceNotFound" => Nothing::NotFound,
        "DeviceAmbiguous" => Nothing::Ambiguous,
        "DeviceProtected" => Nothing::Protected,
        "NodeIdentityUnverified" => Nothing::IdentityUnverified,
        "InvalidSpec" => Nothing::Invalid,
        // A failed read kept the resource waiting: the plan is incomplete.
        _ => return row.error(message),
    };
    let mut row = row.nothing(nothing, message);
    row.resolution = transition.status.resolution.clone();
    row.machine = transition
        .status
        .machine_id
        .as_ref()
        .and_then(|id| records.iter().find(|m| &m.id == id))
        .map(Record::from);
    row
}

/// "5 resources: 2 send, 1 adopt, 2 nothing".
fn summary(rows: &[Row]) -> String {
    let count = |action: Action| rows.iter().filter(|r| r.action == action).count();
    format!(
        "{} resources: {} send, {} adopt, {} nothing, {} skipped, {} error",
        rows.len(),
        count(Action::Send),
        count(Action::Adopt),
        count(Action::Nothing),
        count(Action::Skipped),
        count(Action::Error)
    )
}

/// A table with one row per resource, then each resource's details.
pub fn text(rows: &[Row]) -> String {
    let header = [
        "RESOURCE",
        "ACTION",
        "MACHINE",
        "NAME",
        "OS",
        "HEALTH",
        "LAST SEEN",
        "ONBOARDING",
        "TAGS",
    ];
    let dash = || "-".to_string();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let m = row.machine.as_ref();
            let field = |f: fn(&Record) -> Option<String>| m.and_then(f).unwrap_or_else(dash);
            vec![
                row.resource(),
                row.action_text(),
                m.map_or_else(dash, |m| m.id.clone()),
                field(|m| m.computer_dns_name.clone()),
                field(|m| m.os_platform.clone()),
                field(|m| m.health_status.clone()),
                field(|m| m.last_seen.clone()),
                field(|m| m.onboarding_status.clone()),
                field(|m| (!m.machine_tags.is_empty()).then(|| m.machine_tags.join(","))),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        let mut out = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    for row in rows {
        let details: Vec<(&str, &String)> =
            [("why", &row.message), ("resolution", &row.resolution)]
                .into_iter()
                .filter_map(|(label, text)| Some((label, text.as_ref()?)))
                .chain(row.notes.iter().map(|n| ("note", n)))
                .collect();
        if details.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{} ({}):\n", row.resource(), row.source));
        for (label, text) in details {
            out.push_str(&format!("  {label}: {text}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifests(text: &str) -> (Vec<Manifest>, Vec<String>) {
        let mut manifests = Vec::new();
        let mut notes = Vec::new();
        for (n, doc) in documents("t", text).unwrap().into_iter().enumerate() {
            expand(doc, &format!("t#{}", n + 1), &mut manifests, &mut notes);
        }
        (manifests, notes)
    }

    /// Multi-document YAML, `List` kinds and other kinds, as kubectl reads them.
    #[test]
    fn manifests_are_read_as_kubectl_takes_them() {
        let (found, notes) = manifests(
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
---
apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata: {name: a}
spec: {deviceName: a.contoso.com, comment: retired}
---
apiVersion: v1
kind: List
items:
  - apiVersion: defender.offboard.dev/v1alpha1
    kind: DeviceOffboard
    metadata: {name: b}
    spec: {machineId: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567", comment: retired}
  - apiVersion: defender.offboard.dev/v1alpha1
    kind: DeviceOffboard
    metadata: {name: both}
    spec: {machineId: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567", deviceName: x, comment: c}
"#,
        );
        assert_eq!(found.len(), 3);
        assert!(
            notes.len() == 1 && notes[0].contains("ConfigMap \"settings\""),
            "{notes:?}"
        );
        assert_eq!(found[1].source, "t#3 item 1");
        let (name, problem) = found[2].object.as_ref().unwrap_err();
        assert_eq!(name, "both");
        assert!(problem.contains("exactly one"), "{problem}");
        let (json, _) = manifests(
            r#"{"apiVersion":"defender.offboard.dev/v1alpha1","kind":"DeviceOffboard","metadata":{"name":"j"},"spec":{"deviceName":"j","comment":"c"}}"#,
        );
        assert!(json[0].object.is_ok());
        assert!(documents("bad.yaml", "a: [").is_err());
    }

    #[test]
    fn the_schemas_refusals_are_named() {
        let (found, _) = manifests(
            r#"
apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata: {name: upper}
spec: {machineId: "0A1B2C3D4E5F60718293A4B5C6D7E8F901234567", comment: c}
---
apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata: {name: blank}
spec: {deviceName: pc, comment: "  "}
---
apiVersion: defender.offboard.dev/v1alpha1
kind: DeviceOffboard
metadata: {name: nocomment}
spec: {deviceName: pc}
"#,
        );
        let problems: Vec<String> = found
            .iter()
            .map(|m| m.object.as_ref().unwrap_err().1.clone())
            .collect();
        assert!(problems[0].contains("spec.machineId"), "{problems:?}");
        assert!(problems[1].contains("spec.comment"), "{problems:?}");
        assert!(problems[2].contains("comment"), "{problems:?}");
    }

    #[test]
    fn exit_codes_follow_the_worst_row() {
        let obj = blank("r");
        let row = || Row::new("s".into(), &obj);
        let send = Row {
            action: Action::Send,
            ..row()
        };
        let done = row().nothing(Nothing::AlreadyOffboarded, "");
        assert_eq!(exit_code(&[send.clone(), done.clone()]), EXIT_OK);
        let protected = row().nothing(Nothing::Protected, "");
        assert_eq!(
            exit_code(&[send.clone(), protected.clone()]),
            EXIT_NOT_OFFBOARDED
        );
        assert_eq!(exit_code(&[protected, row().error("x")]), EXIT_ERROR);
        assert_eq!(exit_code(&[]), EXIT_OK);
    }
}
