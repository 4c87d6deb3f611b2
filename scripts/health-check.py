#!/usr/bin/env python3
"""The Argo CD health script and kstatus's rules on every status shape the
operator writes.

The shapes are the objects `tests/it/status_shapes.rs` collected from real
runs of the controller (run `cargo test --test it status_shapes` first); they
are read from `$CARGO_TARGET_DIR/status-shapes` or `target/status-shapes`.

- Argo CD: `integrations/argocd/health.lua` runs in a real Lua 5.1
  (`lupa.lua51`; Argo CD embeds gopher-lua, a Lua 5.1) with `obj` set to the
  object as Lua tables, as Argo CD sets it.
- Flux: kstatus's `Compute` for a custom resource, rule by rule as
  sigs.k8s.io/cli-utils pkg/kstatus/status does it (generic.go, status.go).

Each result is compared with EXPECTED; every shape must also keep the
invariants (not final: never Healthy; Failed: the message names its reason).
A self-check renames `status.phase` (and `status.conditions`) and shows that
the results change, so a renamed status field cannot pass unnoticed.
Exits 1 on any mismatch, a missing shape, or no shapes at all.
"""

import json
import os
import sys
from pathlib import Path

try:
    import lupa.lua51 as lua51
except ImportError as error:  # the wheel lacks the Lua 5.1 build
    sys.exit(f"error: lupa.lua51 is not available ({error}): install lupa==2.8")

ROOT = Path(__file__).resolve().parent.parent
HEALTH_SCRIPT = ROOT / "integrations" / "argocd" / "health.lua"
DOCS = ROOT / "docs" / "operations.md"
FINAL_PHASES = ("Succeeded", "Failed")

# shape -> (Argo CD status, a substring of its message, kstatus status)
EXPECTED = {
    "no-status": ("Progressing", "Waiting for the operator", "Current"),
    "pending-connection-not-found": ("Progressing", "Pending (ConnectionNotFound)", "InProgress"),
    "pending-connection-not-ready": ("Progressing", "Pending (ConnectionNotReady)", "InProgress"),
    # Throttled by MDE's 429, or WaitingForBudget once the budget learned it.
    "pending-throttled": ("Progressing", "Pending (", "InProgress"),
    "pending-permission-denied": ("Progressing", "Pending (PermissionDenied)", "InProgress"),
    "submitting-outcome-unknown": ("Progressing", "Submitting (OutcomeUnknown)", "InProgress"),
    "in-progress-mde-pending": ("Progressing", "InProgress: MDE offboard action", "InProgress"),
    "in-progress": ("Progressing", "InProgress: MDE offboard action", "InProgress"),
    "in-progress-adopted": ("Progressing", "InProgress: MDE offboard action", "InProgress"),
    "in-progress-cancel-too-late": ("Progressing", "is InProgress", "InProgress"),
    "succeeded": ("Healthy", "Offboarded: MDE offboard action", "Current"),
    "failed-action-failed": ("Degraded", "Failed: MDE offboard action", "Failed"),
    "failed-action-timed-out": ("Degraded", "ended TimeOut", "Failed"),
    "failed-device-not-found": ("Degraded", "DeviceNotFound: MDE has no machine", "Failed"),
    "failed-device-not-found-by-name": ("Degraded", "DeviceNotFound: no MDE machine", "Failed"),
    "failed-device-ambiguous": ("Degraded", "DeviceAmbiguous:", "Failed"),
    "failed-platform-not-supported": ("Degraded", "PlatformNotSupported:", "Failed"),
    "failed-invalid-spec": ("Degraded", "InvalidSpec: spec names no device", "Failed"),
    # A person stopped it on purpose: Suspended, not an alert.
    "failed-cancelled": ("Suspended", "Cancelled: MDE offboard action", "Failed"),
    "failed-cancelled-before-send": ("Suspended", "Cancelled: cancelled before", "Failed"),
    "failed-device-protected": ("Degraded", "DeviceProtected:", "Failed"),
    "pending-breaker-open": ("Progressing", "Pending (BreakerOpen)", "InProgress"),
    "pending-awaiting-approval": ("Progressing", "Pending (AwaitingApproval)", "InProgress"),
    # Derived (see DERIVED): states real runs show only for a moment.
    "succeeded+generation-ahead": ("Progressing", "see generation 2", "InProgress"),
    "in-progress+deleting": ("Progressing", "Being deleted", "Terminating"),
}


def generation_ahead(obj):
    """A spec change the operator has not seen yet (the spec is immutable,
    so only an older CRD or a forced replace gets there)."""
    obj["metadata"]["generation"] = obj["metadata"]["generation"] + 1
    return obj


def deleting(obj):
    """Deleted while a finalizer (someone else's) holds it."""
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return obj


# derived shape -> (collected shape it starts from, the change)
DERIVED = {
    "succeeded+generation-ahead": ("succeeded", generation_ahead),
    "in-progress+deleting": ("in-progress", deleting),
}


def shapes_dir():
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    return target / "status-shapes"


def load_shapes(directory, problems):
    """Every collected shape by name, with the derived ones added."""
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        problems.append(
            f"no status shapes in {directory}: run `cargo test --test it status_shapes` first"
        )
        return {}
    shapes = {f.stem: json.loads(f.read_text()) for f in files}
    for name, (source, change) in DERIVED.items():
        if source in shapes:
            shapes[name] = change(json.loads(json.dumps(shapes[source])))
    for name in sorted(set(EXPECTED) - set(shapes)):
        problems.append(f"{name}: no shape file {directory / (name + '.json')}")
    for name in sorted(set(shapes) - set(EXPECTED)):
        problems.append(f"{name}: collected, but EXPECTED has no entry for it: add one")
    return {n: s for n, s in shapes.items() if n in EXPECTED}


def to_lua(lua, value):
    """JSON as Argo CD hands it to Lua: objects and arrays as tables
    (arrays from index 1), null as nil."""
    if isinstance(value, dict):
        table = lua.table()
        for key, item in value.items():
            if item is not None:
                table[key] = to_lua(lua, item)
        return table
    if isinstance(value, list):
        table = lua.table()
        for index, item in enumerate(value, start=1):
            if item is not None:
                table[index] = to_lua(lua, item)
        return table
    return value


def argocd_health(script, obj):
    """(status, message) as the health script returns them, in a fresh Lua 5.1."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    if lua.eval("_VERSION") != "Lua 5.1":
        sys.exit(f"error: lupa.lua51 runs {lua.eval('_VERSION')}, not Lua 5.1")
    lua.globals().obj = to_lua(lua, obj)
    try:
        result = lua.execute(script)
    except lua51.LuaError as error:  # a typo or a nil index: Argo CD shows Unknown
        return ("<error>", f"the script failed: {error}")
    if result is None:
        return ("<nil>", "the script returned nothing")
    return (result["status"], result["message"] or "")


def kstatus(obj):
    """(status, message) by kstatus's Compute for a kind it has no rules of."""
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if metadata.get("deletionTimestamp"):
        return ("Terminating", "Resource scheduled for deletion")
    generation = metadata.get("generation")
    if generation is not None and "observedGeneration" in status:
        if status["observedGeneration"] != generation:
            return (
                "InProgress",
                f"generation is {generation}, but latest observed generation is "
                f"{status['observedGeneration']}",
            )
    conditions = status.get("conditions") or []
    # The first of Reconciling=True or Stalled=True in list order decides.
    for condition in conditions:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Reconciling":
            return ("InProgress", condition.get("message", ""))
        if condition.get("type") == "Stalled":
            return ("Failed", condition.get("message", ""))
    for condition in conditions:
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return ("Current", "Resource is Ready")
            if condition.get("status") in ("False", "Unknown"):
                return ("InProgress", condition.get("message", ""))
    return ("Current", "Resource is current")


def ready_reason(obj):
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("reason")
    return None


def invariant_problems(name, obj, argo):
    """What must hold whatever EXPECTED says."""
    problems = []
    phase = (obj.get("status") or {}).get("phase")
    if phase not in FINAL_PHASES and argo[0] == "Healthy":
        problems.append(f"{name}: not final (phase {phase}) but Argo CD shows Healthy")
    if phase == "Failed":
        reason = ready_reason(obj) or "Failed"
        if reason not in argo[1]:
            problems.append(f"{name}: Failed, but the message does not name {reason}: {argo[1]}")
    return problems


def renamed(obj, field, to):
    """`obj` with `status.<field>` renamed to `status.<to>`."""
    copy = json.loads(json.dumps(obj))
    status = copy.get("status")
    if isinstance(status, dict) and field in status:
        status[to] = status.pop(field)
    return copy


def self_check(script, shapes, problems):
    """Renaming a field the checks read must change their results: at least
    every final shape's, so a rename can never pass the check."""
    changed = 0
    for name, obj in shapes.items():
        want_status, want_message, _ = EXPECTED[name]
        status, message = argocd_health(script, renamed(obj, "phase", "phaze"))
        differs = status != want_status or want_message not in message
        changed += differs
        if obj.get("status", {}).get("phase") in FINAL_PHASES and not differs:
            problems.append(f"self-check: {name} gives its expected result without status.phase")
    print(f"self-check: renamed status.phase changes {changed} of {len(shapes)} results")
    changed = 0
    for name, obj in shapes.items():
        result = kstatus(renamed(obj, "conditions", "condition"))[0]
        differs = result != EXPECTED[name][2]
        changed += differs
        if obj.get("status", {}).get("phase") == "Failed" and not differs:
            problems.append(f"self-check: {name} keeps kstatus {result} without status.conditions")
    print(f"self-check: renamed status.conditions changes {changed} of {len(shapes)} kstatus results")
    if changed == 0:
        problems.append("self-check: kstatus results do not depend on status.conditions")


def docs_problems(script):
    """The docs point at the script and hold no copy of it that could drift."""
    docs = DOCS.read_text()
    problems = []
    if "integrations/argocd/health.lua" not in docs:
        problems.append(f"{DOCS.relative_to(ROOT)} does not name integrations/argocd/health.lua")
    body = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("--")]
    copied = [line for line in body if len(line) > 24 and line in docs]
    if len(copied) > 2:
        problems.append(
            f"{DOCS.relative_to(ROOT)} holds a copy of the health script ({copied[0]!r}, ...): "
            "point at integrations/argocd/health.lua instead"
        )
    return problems


def shorten(text, width=78):
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main():
    problems = []
    directory = shapes_dir()
    shapes = load_shapes(directory, problems)
    script = HEALTH_SCRIPT.read_text()
    problems.extend(docs_problems(script))
    rows = []
    for name in sorted(shapes):
        obj = shapes[name]
        want_status, want_message, want_kstatus = EXPECTED[name]
        argo = argocd_health(script, obj)
        flux = kstatus(obj)
        if argo[0] != want_status:
            problems.append(f"{name}: Argo CD {argo[0]}, expected {want_status} ({argo[1]})")
        if want_message not in argo[1]:
            problems.append(f"{name}: Argo CD message {argo[1]!r} lacks {want_message!r}")
        if flux[0] != want_kstatus:
            problems.append(f"{name}: kstatus {flux[0]}, expected {want_kstatus} ({flux[1]})")
        problems.extend(invariant_problems(name, obj, argo))
        rows.append((name, argo[0], shorten(argo[1]), flux[0]))
    if rows:
        widths = [max(len(r[i]) for r in rows + [("shape", "Argo CD", "message", "kstatus")]) for i in range(4)]
        header = ("shape", "Argo CD", "message", "kstatus")
        print(f"health of {len(rows)} status shapes from {directory} (Lua: {HEALTH_SCRIPT.relative_to(ROOT)})")
        for row in [header] + rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        self_check(script, shapes, problems)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"health check: {len(rows)} shapes as expected (Argo CD and kstatus)")


if __name__ == "__main__":
    main()
