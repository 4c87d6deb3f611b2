#!/usr/bin/env python3
"""Lint and render the Helm chart with Helm's own library (no cluster, no
`helm` binary: the `helm-python-sdk` wheel carries Helm's Go SDK).

Every `ci/*-values.yaml` must pass `helm lint --strict` and render; the
connections RBAC must be least privilege (only `secrets: get` and
`serviceaccounts/token: create`, a Role per listed namespace, a ClusterRole
only when asked); a values file that would leave the operator without what
it needs must fail to render with a message naming the value; without
leader election an upgrade stops the old pod before it starts the new one.
Run by `.ci/run`; exits non-zero on the first problem.
"""

import glob
import os
import sys

import helm_python as helm
import yaml

CHART = os.path.join(os.path.dirname(__file__), "..", "charts", "defender-offboard")
SECRET = {"tenantId": "t", "clientId": "c", "credentials": {"clientSecret": "s"}}


def fail(message):
    print(f"chart-check: {message}", file=sys.stderr)
    sys.exit(1)


def documents(manifests):
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                yield document


def render(values):
    chart = helm.Chart.load(CHART)
    return list(documents(chart.render(values, name="defender-offboard", namespace="ops")))


def render_error(values):
    """The chart's refusal of `values` (empty when it renders)."""
    try:
        render(values)
    except Exception as error:  # the Helm library raises on `fail`
        return str(error)
    return ""


def lint_every_ci_values_file():
    files = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    if not files:
        fail("no ci/*-values.yaml")
    for path in files:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        report = helm.lint(CHART, values, strict=True)
        errors = report.get("errors") or [
            m["error"] for m in report.get("messages", []) if m.get("severity", 0) >= 2
        ]
        if errors:
            fail(f"helm lint --strict {os.path.basename(path)}: {errors}")
        render(values)
        print(f"chart-check: {os.path.basename(path)} lints and renders")


def connection_rules(objects):
    return [
        o for o in objects if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"].endswith("-connections")
    ]


def check_connections_rbac():
    off = render(SECRET)
    if connection_rules(off):
        fail("connections RBAC rendered with connections.enabled=false")
    listed = render({**SECRET, "connections": {"enabled": True, "namespaces": ["mssp-contoso", "mssp-fabrikam"]}})
    roles = connection_rules(listed)
    if sorted((r["kind"], r["metadata"].get("namespace")) for r in roles) != [
        ("Role", "mssp-contoso"),
        ("Role", "mssp-fabrikam"),
    ]:
        fail(f"expected one Role per listed namespace, got {[(r['kind'], r['metadata'].get('namespace')) for r in roles]}")
    for role in roles:
        granted = sorted(
            (resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]
        )
        if granted != [("secrets", "get"), ("serviceaccounts", "get"), ("serviceaccounts/token", "create")]:
            fail(f"connections Role grants more or less than it should: {granted}")
    deployment = next(o for o in listed if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    if "--connections" not in args:
        fail(f"connections.enabled does not pass --connections: {args}")
    refused = render_error({**SECRET, "connections": {"enabled": True, "clusterWide": True, "namespaces": ["a"]}})
    if "connections.clusterWide was removed" not in refused:
        fail(f"connections.clusterWide must be refused: {refused!r}")
    # Connections alone: the operator needs no credentials of its own.
    render({"connections": {"enabled": True, "namespaces": ["a"]}})
    print("chart-check: connections RBAC is least privilege")


def check_refusals():
    for values, expected in [
        ({**SECRET, "connections": {"enabled": True}}, "connections"),
        ({}, "credential"),
    ]:
        try:
            render(values)
        except helm.HelmError as error:
            if expected not in str(error):
                fail(f"render of {values} failed without naming {expected!r}: {error}")
            continue
        fail(f"render of {values} should fail")
    print("chart-check: incomplete values are refused with the value named")


def check_rollout():
    """Without leader election nothing stops two pods from reconciling at once,
    so an upgrade must stop the old pod before the new one starts; with it, the
    new pod waits for the Lease and may start first."""
    for replicas in (0, 1):
        unelected = render({**SECRET, "replicas": replicas, "leaderElection": {"enabled": False}})
        strategy = next(o for o in unelected if o["kind"] == "Deployment")["spec"].get("strategy", {})
        if strategy.get("type") != "Recreate":
            fail(f"replicas={replicas} without leader election rolls with {strategy}: two controllers at once")
    for replicas in (1, 2):
        elected = render({**SECRET, "replicas": replicas})
        deployment = next(o for o in elected if o["kind"] == "Deployment")
        strategy = deployment["spec"].get("strategy", {})
        rolling = strategy.get("rollingUpdate", {})
        if "--leader-elect" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]:
            fail("leader election is on by default but --leader-elect is not passed")
        if strategy.get("type") != "RollingUpdate" or rolling.get("maxUnavailable") != 0:
            fail(f"replicas={replicas} with leader election should roll with no pod unavailable: {strategy}")
    print("chart-check: without leader election an upgrade never runs two controllers")


def check_network_policy():
    """The metrics port admits the named namespaces only, and nobody when none are named."""
    def policy(extra):
        objects = render({**SECRET, "networkPolicy": {"enabled": True, **extra}})
        return next(o for o in objects if o["kind"] == "NetworkPolicy")["spec"]
    closed = policy({})
    if closed.get("ingress") != []:
        fail(f"a NetworkPolicy without metricsNamespaces admits {closed.get('ingress')}")
    spec = policy({"metricsNamespaces": ["monitoring"]})
    peers = [peer for rule in spec["ingress"] for peer in rule.get("from", [])]
    expected = [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}]}}]
    if peers != expected or any("from" not in rule for rule in spec["ingress"]):
        fail(f"metricsNamespaces [monitoring] renders ingress {spec['ingress']}")
    print("chart-check: the NetworkPolicy admits the metrics port from the named namespaces only")



def check_safety_flags():
    """`safety.*` values reach `run` as its flags, one per list entry, and
    the defaults pass none (nothing protected unless asked)."""
    def args(values):
        deployment = next(o for o in render(values) if o["kind"] == "Deployment")
        return deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    default = [a for a in args(SECRET) if a.startswith("--protected-")]
    if default:
        fail(f"the default values pass protection flags: {default}")
    safety = {"protectedTags": ["do-not-offboard", "Tier0"], "protectedNamePatterns": ["^dc-\\d+$"]}
    given = args({**SECRET, "safety": safety})
    for expected in ["--protected-tag=do-not-offboard", "--protected-tag=Tier0", "--protected-name=^dc-\\d+$"]:
        if expected not in given:
            fail(f"safety values do not pass {expected}: {given}")
    print("chart-check: safety.protectedTags and safety.protectedNamePatterns pass --protected-tag and --protected-name")


def check_breaker_and_approval_flags():
    """`safety.maxOffboardsPerHour` and `safety.requireApproval` reach `run`
    as its flags: the breaker on by default (100, as `run`'s own default,
    checked by `cargo test`), the two-person rule off unless asked."""
    def args(values):
        deployment = next(o for o in render(values) if o["kind"] == "Deployment")
        return deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    default = args(SECRET)
    if "--max-offboards-per-hour=100" not in default or "--require-approval" in default:
        fail(f"the default values should pass --max-offboards-per-hour=100 and no --require-approval: {default}")
    given = args({**SECRET, "safety": {"maxOffboardsPerHour": 0, "requireApproval": True}})
    for expected in ["--max-offboards-per-hour=0", "--require-approval"]:
        if expected not in given:
            fail(f"safety values do not pass {expected}: {given}")
    print("chart-check: safety.maxOffboardsPerHour and safety.requireApproval pass --max-offboards-per-hour and --require-approval")


lint_every_ci_values_file()
check_network_policy()
check_connections_rbac()
check_refusals()
check_rollout()
check_safety_flags()
check_breaker_and_approval_flags()
