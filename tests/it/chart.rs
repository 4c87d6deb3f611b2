//! The Helm chart and the examples agree with the code.

use defender_offboard::crd::{DeviceOffboard, crd_yaml};
use defender_offboard::operator::tenants::resource::connection_crd_yaml;

#[test]
fn chart_crd_is_the_generated_crd() {
    let chart = std::fs::read_to_string(
        "charts/defender-offboard/crds/deviceoffboards.defender.offboard.dev.yaml",
    )
    .unwrap();
    assert!(
        chart == crd_yaml(),
        "the chart's CRD is stale: cp crds/deviceoffboards.defender.offboard.dev.yaml charts/defender-offboard/crds/"
    );
    let chart = std::fs::read_to_string(
        "charts/defender-offboard/crds/defenderconnections.defender.offboard.dev.yaml",
    )
    .unwrap();
    assert!(
        chart == connection_crd_yaml(),
        "the chart's DefenderConnection CRD is stale: cp crds/defenderconnections.defender.offboard.dev.yaml charts/defender-offboard/crds/"
    );
}

#[test]
fn examples_are_valid_device_offboards() {
    let mut count = 0;
    for entry in std::fs::read_dir("examples").unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(document).unwrap();
            let resource: DeviceOffboard = serde_yaml_ng::from_value(value)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let spec = &resource.spec;
            assert!(
                spec.machine_id.is_some() != spec.device_name.is_some(),
                "{}",
                path.display()
            );
            assert!(!spec.comment.trim().is_empty());
            count += 1;
        }
    }
    assert!(count >= 6, "examples hold {count} resources");
}

use serde::Deserialize;

/// Every `--flag` the chart passes to `run` (the controller and the uninstall
/// hook) is one `run` accepts.
#[test]
fn chart_flags_are_flags_of_run() {
    use clap::Args;
    let run = defender_offboard::cli::RunArgs::augment_args(clap::Command::new("run"));
    let known: Vec<String> = run
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut seen = Vec::new();
    for file in ["deployment.yaml", "node-finalizer-cleanup.yaml"] {
        let text =
            std::fs::read_to_string(format!("charts/defender-offboard/templates/{file}")).unwrap();
        for word in text.split(|c: char| c.is_whitespace() || c == '"') {
            let Some(flag) = word.strip_prefix("--") else {
                continue;
            };
            let flag: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if flag.is_empty() || flag.starts_with('-') {
                continue;
            }
            assert!(
                known.contains(&flag),
                "{file} passes --{flag}, which `run` does not accept"
            );
            seen.push(flag.to_string());
        }
    }
    for expected in [
        "offboard-deleted-nodes",
        "node-selector",
        "node-device-name",
        "node-offboard-ttl-seconds",
        "remove-node-finalizers",
        "stop-deployment",
        "node-identity",
        "node-offboard-grace",
        "protected-tag",
        "protected-name",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "the chart never passes --{expected}"
        );
    }
}

/// The chart's node offboarding defaults are `run`'s: identity `required`, a
/// grace of 5 minutes (a chart install is as strict as the binary).
#[test]
fn chart_node_identity_and_grace_default_as_run_does() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        nodes: defender_offboard::cli::NodeArgs,
    }
    let run = Cli::parse_from(["run"]).nodes;
    let values: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string("charts/defender-offboard/values.yaml").unwrap(),
    )
    .unwrap();
    let nodes = &values["nodeOffboarding"];
    let identity = nodes["identity"]
        .as_str()
        .expect("nodeOffboarding.identity");
    assert_eq!(identity, "required");
    assert_eq!(identity.parse().ok(), Some(run.node_identity));
    let grace = nodes["grace"].as_str().expect("nodeOffboarding.grace");
    assert_eq!(
        humantime::parse_duration(grace).unwrap(),
        run.node_offboard_grace
    );
    let deployment =
        std::fs::read_to_string("charts/defender-offboard/templates/deployment.yaml").unwrap();
    for arg in [
        "--node-identity=%v\" .Values.nodeOffboarding.identity",
        "--node-offboard-grace=%v\" .Values.nodeOffboarding.grace",
    ] {
        assert!(deployment.contains(arg), "deployment.yaml lacks {arg}");
    }
}
