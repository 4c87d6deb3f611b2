#!/usr/bin/env python3
"""The chart's ValidatingAdmissionPolicies, evaluated against sample admission
requests (allowed and refused) by a CEL interpreter (`cel-python`), as the
API server would: a policy applies when every matchCondition holds, and then
refuses the request when any validation is false.

Rendered by Helm's own library (as scripts/chart-check.py). A policy whose
expression does not compile, or a sample whose outcome differs from the one
written here, fails CI.
"""

import copy
import os
import sys

import celpy
import helm_python as helm
import yaml

CHART = os.path.join(os.path.dirname(__file__), "..", "charts", "defender-offboard")
OPERATOR = "system:serviceaccount:ops:defender-offboard"
SOMEONE = "alice@contoso.com"
FINAL = "defender.offboard.dev/final"
CANCEL = "defender.offboard.dev/cancel"
OTHER = "bob@contoso.com"
CREATED = "defender.offboard.dev/created-by"
APPROVED = "defender.offboard.dev/approved-by"


def fail(message):
    print(f"admission-policy-check: {message}", file=sys.stderr)
    sys.exit(1)


def render(values):
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values, name="defender-offboard", namespace="ops")
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                yield document


ENV = celpy.Environment()


def evaluate(expression, activation):
    try:
        program = ENV.program(ENV.compile(expression))
    except Exception as error:
        fail(f"does not compile: {expression!r}: {error}")
    value = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    if isinstance(value, Exception):
        raise value
    return bool(value)


def admit(policy, request):
    """(allowed, message) for one request, as the API server decides."""
    activation = {
        "request": {"userInfo": {"username": request["user"]}, "operation": request["operation"]},
        "object": request.get("object"),
        "oldObject": request.get("oldObject"),
    }
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    if not any(request["resource"] in r["resources"] and request["operation"] in r["operations"] for r in rules):
        return True, "not matched"
    for condition in policy["spec"].get("matchConditions", []):
        if not evaluate(condition["expression"], activation):
            return True, f"matchCondition {condition['name']} false"
    for validation in policy["spec"]["validations"]:
        if not evaluate(validation["expression"], activation):
            return False, validation.get("message", validation["expression"])
    return True, "every validation holds"


def node(labels=None, annotations=None, finalizers=None, taints=None):
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "aks-pool-1",
            **({"labels": labels} if labels is not None else {}),
            **({"annotations": annotations} if annotations is not None else {}),
            **({"finalizers": finalizers} if finalizers is not None else {}),
        },
        "spec": {"providerID": "azure:///x", **({"taints": taints} if taints is not None else {})},
    }


def offboard(labels=None, annotations=None):
    return {
        "apiVersion": "defender.offboard.dev/v1alpha1",
        "kind": "DeviceOffboard",
        "metadata": {"name": "pc-1", "namespace": "it", **({"labels": labels} if labels is not None else {}),
                     **({"annotations": annotations} if annotations is not None else {})},
        "spec": {"deviceName": "pc-1.contoso.com", "comment": "returned"},
    }


def create(user, annotations=None):
    return {"resource": "deviceoffboards", "operation": "CREATE", "user": user, "oldObject": None,
            "object": offboard(annotations=annotations)}


def update(user, before, after, labels=None):
    return {"resource": "deviceoffboards", "operation": "UPDATE", "user": user,
            "oldObject": offboard(labels=labels, annotations=before), "object": offboard(labels=labels, annotations=after)}


BY_SOMEONE = {CREATED: SOMEONE}
APPROVED_BY_OTHER = {CREATED: SOMEONE, APPROVED: OTHER}
# The two-person rule (safety.requireApproval): (description, request, allowed?)
APPROVAL_SAMPLES = [
    ("the creator stamps their own name on create", create(SOMEONE, BY_SOMEONE), True),
    ("a create without the creator's name", create(SOMEONE), False),
    ("forging created-by: a create naming someone else", create(SOMEONE, {CREATED: OTHER}), False),
    ("an approval on create (by the creator, necessarily)", create(SOMEONE, {CREATED: SOMEONE, APPROVED: SOMEONE}), False),
    ("the operator creates a deleted Node's resource without a name", create(OPERATOR), True),
    ("the operator creates one naming someone else", create(OPERATOR, {CREATED: SOMEONE}), False),
    ("self-approval: the creator approves", update(SOMEONE, BY_SOMEONE, {CREATED: SOMEONE, APPROVED: SOMEONE}), False),
    ("approval by another person", update(OTHER, BY_SOMEONE, APPROVED_BY_OTHER), True),
    ("forging approved-by: one person writes another's name", update(OTHER, BY_SOMEONE, {CREATED: SOMEONE, APPROVED: "carol@contoso.com"}), False),
    ("the creator writes another's name as approver", update(SOMEONE, BY_SOMEONE, APPROVED_BY_OTHER), False),
    ("forging created-by: renaming the creator to approve oneself", update(SOMEONE, BY_SOMEONE, {CREATED: OTHER, APPROVED: SOMEONE}), False),
    ("changing created-by", update(OTHER, BY_SOMEONE, {CREATED: OTHER}), False),
    ("removing created-by", update(SOMEONE, BY_SOMEONE, {}), False),
    ("the operator labels an approved resource final (annotations kept)", update(OPERATOR, APPROVED_BY_OTHER, APPROVED_BY_OTHER, labels={FINAL: "true"}), True),
    ("another edit leaves the approval as it was", update(SOMEONE, APPROVED_BY_OTHER, {**APPROVED_BY_OTHER, "team": "it"}), True),
    ("withdrawing an approval", update(OTHER, APPROVED_BY_OTHER, BY_SOMEONE), True),
    ("stamping one's own name on a resource created without one", update(SOMEONE, None, BY_SOMEONE), True),
    ("stamping someone else's name on it", update(SOMEONE, None, {CREATED: OTHER}), False),
    ("approving a resource that names no creator", update(OTHER, None, {APPROVED: OTHER}), False),
    ("stamping and approving oneself at once", update(SOMEONE, None, {CREATED: SOMEONE, APPROVED: SOMEONE}), False),
]


BEFORE = node(labels={"kubernetes.io/os": "linux"}, annotations={"a": "1"})
# (policy suffix, description, request, allowed?)
SAMPLES = [
    ("node-finalizer-only", "the operator adds its finalizer",
     {"resource": "nodes", "operation": "UPDATE", "user": OPERATOR,
      "oldObject": BEFORE, "object": {**copy.deepcopy(BEFORE), "metadata": {**BEFORE["metadata"], "finalizers": ["defender.offboard.dev/offboard-device"]}}}, True),
    ("node-finalizer-only", "the operator removes its finalizer",
     {"resource": "nodes", "operation": "UPDATE", "user": OPERATOR,
      "oldObject": node(labels={"kubernetes.io/os": "linux"}, finalizers=["defender.offboard.dev/offboard-device"]),
      "object": node(labels={"kubernetes.io/os": "linux"}, finalizers=[])}, True),
    ("node-finalizer-only", "the operator taints a Node",
     {"resource": "nodes", "operation": "UPDATE", "user": OPERATOR,
      "oldObject": BEFORE, "object": node(labels={"kubernetes.io/os": "linux"}, annotations={"a": "1"}, taints=[{"key": "x", "effect": "NoSchedule"}])}, False),
    ("node-finalizer-only", "the operator relabels a Node",
     {"resource": "nodes", "operation": "UPDATE", "user": OPERATOR,
      "oldObject": BEFORE, "object": node(labels={"kubernetes.io/os": "linux", "pool": "evil"}, annotations={"a": "1"})}, False),
    ("node-finalizer-only", "the operator adds a label to a Node that had none",
     {"resource": "nodes", "operation": "UPDATE", "user": OPERATOR,
      "oldObject": node(), "object": node(labels={"x": "y"})}, False),
    ("node-finalizer-only", "the operator annotates a Node",
     {"resource": "nodes", "operation": "UPDATE", "user": OPERATOR,
      "oldObject": BEFORE, "object": node(labels={"kubernetes.io/os": "linux"}, annotations={"a": "2"})}, False),
    ("node-finalizer-only", "a cluster admin taints a Node (not the operator: not matched)",
     {"resource": "nodes", "operation": "UPDATE", "user": SOMEONE,
      "oldObject": BEFORE, "object": node(labels={"kubernetes.io/os": "linux"}, annotations={"a": "1"}, taints=[{"key": "x", "effect": "NoSchedule"}])}, True),
    ("final-label", "a person creates a DeviceOffboard",
     {"resource": "deviceoffboards", "operation": "CREATE", "user": SOMEONE, "oldObject": None, "object": offboard()}, True),
    ("final-label", "a person creates one carrying the final label",
     {"resource": "deviceoffboards", "operation": "CREATE", "user": SOMEONE, "oldObject": None, "object": offboard({FINAL: "true"})}, False),
    ("final-label", "a person adds the final label to a running one",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard({"team": "it"}), "object": offboard({"team": "it", FINAL: "true"})}, False),
    ("final-label", "a person edits another label of a final one (the final label kept)",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard({FINAL: "true"}), "object": offboard({FINAL: "true", "team": "it"})}, True),
    ("final-label", "a person removes the final label",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard({FINAL: "true"}), "object": offboard({})}, True),
    ("final-label", "the operator sets the final label",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": OPERATOR, "oldObject": offboard(), "object": offboard({FINAL: "true"})}, True),
    ("cancel-reason", "a person cancels with a reason",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard(), "object": offboard(annotations={CANCEL: "wrong device"})}, True),
    ("cancel-reason", "a person cancels with a reason of 900 characters (multi-byte)",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard(), "object": offboard(annotations={CANCEL: "é" * 900})}, True),
    ("cancel-reason", "a person cancels with a reason of 901 characters",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard(), "object": offboard(annotations={CANCEL: "x" * 901})}, False),
    ("cancel-reason", "a person creates one already cancelled with 256 KiB of reason",
     {"resource": "deviceoffboards", "operation": "CREATE", "user": SOMEONE, "oldObject": None, "object": offboard(annotations={CANCEL: "x" * 256 * 1024})}, False),
    ("cancel-reason", "the operator labels a resource whose long reason predates the policy",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": OPERATOR, "oldObject": offboard(annotations={CANCEL: "x" * 2000}), "object": offboard({FINAL: "true"}, annotations={CANCEL: "x" * 2000})}, True),
    ("cancel-reason", "a person lengthens a reason that predates the policy",
     {"resource": "deviceoffboards", "operation": "UPDATE", "user": SOMEONE, "oldObject": offboard(annotations={CANCEL: "x" * 2000}), "object": offboard(annotations={CANCEL: "x" * 2001})}, False),
    ("cancel-reason", "a long annotation that is not the cancel one",
     {"resource": "deviceoffboards", "operation": "CREATE", "user": SOMEONE, "oldObject": None, "object": offboard(annotations={"team/notes": "x" * 4096})}, True),
]


def main():
    objects = list(render({"clientId": "c", "tenantId": "t", "credentials": {"clientSecret": "s"},
                           "nodeOffboarding": {"enabled": True}}))
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"}
    bindings = {o["spec"]["policyName"] for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"}
    expected = ["defender-offboard-cancel-reason", "defender-offboard-final-label", "defender-offboard-node-finalizer-only"]
    if sorted(policies) != expected:
        fail(f"unexpected policies: {sorted(policies)}")
    if bindings != set(policies):
        fail(f"every policy needs its binding: {bindings} vs {set(policies)}")
    approval_objects = list(render({"clientId": "c", "tenantId": "t", "credentials": {"clientSecret": "s"},
                                    "nodeOffboarding": {"enabled": True}, "safety": {"requireApproval": True}}))
    approval_policies = {o["metadata"]["name"]: o for o in approval_objects if o["kind"] == "ValidatingAdmissionPolicy"}
    approval_bindings = {o["spec"]["policyName"] for o in approval_objects if o["kind"] == "ValidatingAdmissionPolicyBinding"}
    if sorted(approval_policies) != sorted(expected + ["defender-offboard-approvals"]):
        fail(f"safety.requireApproval=true: unexpected policies: {sorted(approval_policies)}")
    if approval_bindings != set(approval_policies):
        fail(f"safety.requireApproval=true: every policy needs its binding: {approval_bindings} vs {set(approval_policies)}")
    for name, policy in policies.items():
        if approval_policies[name] != policy:
            fail(f"safety.requireApproval=true changes the policy {name}")
    approval_policy = approval_policies["defender-offboard-approvals"]
    off = [o for o in render({"clientId": "c", "tenantId": "t", "credentials": {"clientSecret": "s"},
                              "admissionPolicies": {"enabled": False}}) if o["kind"].startswith("ValidatingAdmission")]
    if off:
        fail("admissionPolicies.enabled=false still renders policies")
    try:
        list(render({"clientId": "c", "tenantId": "t", "credentials": {"clientSecret": "s"},
                     "admissionPolicies": {"enabled": False}, "safety": {"requireApproval": True}}))
    except Exception as error:  # the Helm library raises on `fail`
        if "admissionPolicies.enabled" not in str(error):
            fail(f"requireApproval without admissionPolicies is refused without naming the value: {error}")
    else:
        fail("safety.requireApproval=true with admissionPolicies.enabled=false renders: approvals could be forged")
    wrong = 0
    for suffix, description, request, allowed in SAMPLES:
        policy = policies[f"defender-offboard-{suffix}"]
        outcome, why = admit(policy, request)
        verdict = "allowed" if outcome else "refused"
        mark = "ok" if outcome == allowed else "WRONG"
        print(f"admission-policy-check: {suffix}: {description}: {verdict} ({why}) {mark}")
        wrong += outcome != allowed
    for description, request, allowed in APPROVAL_SAMPLES:
        outcome, why = admit(approval_policy, request)
        verdict = "allowed" if outcome else "refused"
        mark = "ok" if outcome == allowed else "WRONG"
        print(f"admission-policy-check: approvals: {description}: {verdict} ({why}) {mark}")
        wrong += outcome != allowed
    if wrong:
        fail(f"{wrong} sample(s) decided differently than expected")
    print(f"admission-policy-check: {len(SAMPLES) + len(APPROVAL_SAMPLES)} samples decided as expected")


if __name__ == "__main__":
    main()
