//! The chart's alerts and dashboard: every query parses as PromQL and names
//! only series the code registers, and both ship only when asked for.

use defender_offboard::metrics::Metrics;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use std::collections::BTreeSet;

const CHART: &str = "charts/defender-offboard";

/// Metric names a query reads.
struct Names(BTreeSet<String>);

impl ExprVisitor for Names {
    type Error = ();
    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
        let selector = match expr {
            Expr::VectorSelector(v) => v,
            Expr::MatrixSelector(m) => &m.vs,
            _ => return Ok(true),
        };
        self.0.extend(selector.name.clone());
        Ok(true)
    }
}

/// Parse `expr` and return the metric names it reads, or why it does not parse.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let ast = parser::parse(expr)?;
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &ast).map_err(|()| "walk failed".to_string())?;
    Ok(names.0)
}

/// Check one query; returns a complaint, if any.
fn check(origin: &str, expr: &str, known: &BTreeSet<String>) -> Option<String> {
    match metric_names(expr) {
        Err(error) => Some(format!("{origin}: does not parse ({error}): {expr}")),
        Ok(names) if names.is_empty() => Some(format!("{origin}: reads no metric: {expr}")),
        Ok(names) => {
            let unknown: Vec<_> = names.difference(known).collect();
            (!unknown.is_empty())
                .then(|| format!("{origin}: {unknown:?} is not registered by the code: {expr}"))
        }
    }
}

/// Grafana's variables, replaced by what Grafana would put there.
fn expand_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$namespace", "defender-offboard")
}

fn rules() -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{CHART}/files/prometheus-rules.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{CHART}/files/grafana-dashboard.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_checker_refuses_bad_promql_and_unknown_metrics() {
    let known = Metrics::default().series_names();
    assert!(check("t", "sum(defender_offboard_leader) != 1", &known).is_none());
    assert!(check("t", "sum(defender_offboard_leader", &known).is_some());
    assert!(check("t", "rate(defender_offboard_mde_requests[5m])", &known).is_some());
    assert!(check("t", "1 + 1", &known).is_some());
}

#[test]
fn every_alert_parses_and_reads_registered_metrics() {
    let known = Metrics::default().series_names();
    let rules = rules();
    let mut alerts = Vec::new();
    let mut problems = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            problems.extend(check(name, expr, &known));
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["warning", "critical"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            alerts.push(name.to_string());
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for expected in [
        "DefenderOffboardThrottled",
        "DefenderOffboardStuckInProgress",
        "DefenderOffboardNoLeader",
        "DefenderOffboardNodeOffboardingFailing",
    ] {
        assert!(alerts.iter().any(|a| a == expected), "{expected} missing");
    }
}

#[test]
fn every_dashboard_query_parses_and_reads_registered_metrics() {
    let known = Metrics::default().series_names();
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "defender-offboard");
    let mut problems = Vec::new();
    let mut titles = Vec::new();
    let mut read = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_string();
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: uses the dashboard's data source variable"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = expand_grafana_variables(target["expr"].as_str().unwrap());
            problems.extend(check(&title, &expr, &known));
            read.extend(metric_names(&expr).unwrap_or_default());
        }
        titles.push(title);
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // What the issue asks the dashboard to show.
    for metric in [
        "defender_offboard_offboards_total",
        "defender_offboard_mde_throttled_total",
        "defender_offboard_budget_remaining",
        "defender_offboard_resources",
        "defender_offboard_in_flight_oldest_seconds",
        "defender_offboard_reconcile_errors_total",
        "defender_offboard_leader",
    ] {
        assert!(
            read.contains(metric),
            "no panel reads {metric}; panels: {titles:?}"
        );
    }
}

#[test]
fn alerts_and_dashboard_ship_only_when_enabled() {
    let values: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap())
            .unwrap();
    assert_eq!(values["prometheusRule"]["enabled"], false);
    assert_eq!(values["grafanaDashboard"]["enabled"], false);
    assert_eq!(
        values["grafanaDashboard"]["labels"]["grafana_dashboard"], "1",
        "the grafana sidecar's default label"
    );
    for (template, gate, file, kind) in [
        (
            "prometheusrule.yaml",
            ".Values.prometheusRule.enabled",
            "files/prometheus-rules.yaml",
            "kind: PrometheusRule",
        ),
        (
            "grafana-dashboard.yaml",
            ".Values.grafanaDashboard.enabled",
            "files/grafana-dashboard.json",
            "kind: ConfigMap",
        ),
    ] {
        let text = std::fs::read_to_string(format!("{CHART}/templates/{template}")).unwrap();
        assert!(
            text.starts_with(&format!("{{{{- if {gate} }}}}")),
            "{template} is not gated on {gate}"
        );
        assert!(text.trim_end().ends_with("{{- end }}"), "{template}");
        assert!(
            text.contains(&format!(".Files.Get \"{file}\"")),
            "{template} must ship {file}"
        );
        assert!(text.contains(kind), "{template}");
    }
}
