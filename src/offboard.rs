//! `defender-offboard offboard`: the same client for people and pipelines.

use crate::crd::MAX_COMMENT_LEN;
use crate::defender::{
    ConnectionArgs, DefenderClient, MachineAction, MdeError, comment_with_marker,
    correlation_marker,
};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;

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
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Pause before looking the action up after an ambiguous answer (keep it
    /// above --request-timeout: MDE may still be processing a timed-out request).
    #[arg(long, default_value = "35s", value_parser = humantime::parse_duration)]
    pub lookup_delay: Duration,
    /// How often `--wait` polls.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
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
    let client = DefenderClient::new(config, Arc::new(Metrics::default()))?;
    // Sign in first: a wrong secret or unreachable login host ends here, at once.
    client.check_sign_in().await?;
    let machine_id = match (&args.machine_id, &args.device_name) {
        (Some(id), _) => id.clone(),
        (None, Some(name)) => resolve(&client, name).await?,
        (None, None) => unreachable!("clap requires one of the two"),
    };
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let action = offboard_once(
        &client,
        &machine_id,
        &args.comment,
        &key,
        args.idempotency_key.is_some(),
        args.lookup_delay,
    )
    .await?;
    let action = if args.wait {
        wait_until_final(&client, action, args.poll_interval).await?
    } else {
        action
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&action).expect("a MachineAction serializes")
    );
    match action.status.as_str() {
        "Succeeded" => Ok(()),
        _ if args.wait => Err(OffboardError::NotSucceeded {
            id: action.id,
            status: action.status.to_string(),
        }),
        _ => Ok(()),
    }
}

async fn resolve(client: &DefenderClient, name: &str) -> Result<String, OffboardError> {
    let machines = client.find_machines_by_name(name).await?;
    match machines.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(OffboardError::Input(format!(
            "no MDE machine has computerDnsName {name:?}"
        ))),
        several => {
            let ids: Vec<String> = several
                .iter()
                .map(|m| {
                    format!(
                        "{} (lastSeen {})",
                        m.id,
                        m.last_seen.as_deref().unwrap_or("unknown")
                    )
                })
                .collect();
            Err(OffboardError::Input(format!(
                "{} machines share computerDnsName {name:?}: {}; rerun with --machine-id",
                several.len(),
                ids.join(", ")
            )))
        }
    }
}

/// Send at most once per proven absence: an ambiguous outcome is always
/// followed by a lookup of the marker before anything is sent again.
async fn offboard_once(
    client: &DefenderClient,
    machine_id: &str,
    comment: &str,
    key: &str,
    check_first: bool,
    lookup_delay: Duration,
) -> Result<MachineAction, OffboardError> {
    const ATTEMPTS: u32 = 5;
    let marker = correlation_marker(key);
    let mut must_look_up = check_first;
    // Once a send may have created an action, every way out names the key
    // that lets a rerun adopt it instead of sending again.
    let mut may_exist = false;
    let hint = |error: MdeError, may_exist: bool| -> OffboardError {
        if may_exist {
            OffboardError::Input(format!(
                "{error}; an offboard action may have been created: rerun with --idempotency-key {key} to adopt it instead of sending again"
            ))
        } else {
            error.into()
        }
    };
    for attempt in 1..=ATTEMPTS {
        if must_look_up {
            let found = client.find_offboard_action(machine_id, &marker).await;
            if let Some(action) = found.map_err(|e| hint(e, may_exist))? {
                eprintln!(
                    "adopting offboard action {} created earlier with this key",
                    action.id
                );
                return Ok(action);
            }
            must_look_up = false;
        }
        match client
            .offboard(machine_id, &comment_with_marker(comment, key))
            .await
        {
            Ok(action) => return Ok(action),
            Err(MdeError::AlreadyPending { .. }) => {
                let pending = client.find_pending_offboard(machine_id).await;
                if let Some(action) = pending.map_err(|e| hint(e, may_exist))? {
                    eprintln!(
                        "an offboard is already pending for {machine_id}: adopting action {}",
                        action.id
                    );
                    return Ok(action);
                }
                must_look_up = true;
            }
            Err(error @ MdeError::OutcomeUnknown { .. }) => {
                eprintln!(
                    "{error}; looking the action up in {} before any resend",
                    humantime::format_duration(lookup_delay)
                );
                may_exist = true;
                tokio::time::sleep(lookup_delay).await;
                must_look_up = true;
            }
            Err(error @ (MdeError::NotSent { .. } | MdeError::Throttled { .. }))
                if attempt < ATTEMPTS =>
            {
                // Nothing was created; the budget is parked until Retry-After on a 429.
                eprintln!("{error}; retrying");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
            }
            Err(error) => return Err(hint(error, may_exist)),
        }
    }
    Err(MdeError::OutcomeUnknown {
        reason: format!("gave up after {ATTEMPTS} attempts; rerun with --idempotency-key {key}"),
    }
    .into())
}

async fn wait_until_final(
    client: &DefenderClient,
    mut action: MachineAction,
    every: Duration,
) -> Result<MachineAction, OffboardError> {
    while !action.status.is_final() {
        eprintln!("action {} is {}", action.id, action.status);
        tokio::time::sleep(every).await;
        match client.get_machine_action(&action.id).await {
            Ok(fresh) => action = fresh,
            Err(error)
                if matches!(
                    error.class(),
                    crate::defender::ErrorClass::Transient | crate::defender::ErrorClass::Throttled
                ) =>
            {
                eprintln!("{error}; polling again");
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(action)
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
