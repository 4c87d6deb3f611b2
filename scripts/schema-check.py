#!/usr/bin/env python3
"""Every manifest the chart renders, in every CI mode (`ci/*-values.yaml`),
validated strictly (no unknown fields) against Kubernetes' own schemas for the
oldest and the newest supported minor version (`kubernetes-validate`, a PyPI
package that ships them), as a user's API server of that version would take it.

Kinds outside the core schemas are checked by their own rules where one can be
had offline (the project's CRDs against the OpenAPI schema they declare, by
`jsonschema`), and listed as unchecked otherwise (PrometheusRule,
ServiceMonitor: their CRDs are not shipped offline).
"""

import glob
import json
import os
import re
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..")
CHART = os.path.join(ROOT, "charts", "defender-offboard")


def fail(message):
    print(f"schema-check: {message}", file=sys.stderr)
    sys.exit(1)


def supported_range():
    """(oldest, newest) from the chart's kubeVersion, e.g. ">=1.30.0-0 <1.38.0-0"."""
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        kube_version = yaml.safe_load(f)["kubeVersion"]
    found = re.fullmatch(r">=\s*1\.(\d+)\.0-0\s+<\s*1\.(\d+)\.0-0", kube_version.strip())
    if not found:
        fail(f"Chart.yaml kubeVersion {kube_version!r} is not '>=1.A.0-0 <1.B.0-0'")
    oldest, below = int(found.group(1)), int(found.group(2))
    return f"1.{oldest}.0", f"1.{below - 1}.0"


def render(values):
    chart = helm.Chart.load(CHART)
    for path, text in chart.render(values, name="defender-offboard", namespace="ops").items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                yield path, document


def crd_schemas():
    """The project's CRDs: kind → OpenAPI v3 schema of their served version."""
    schemas = {}
    for path in glob.glob(os.path.join(CHART, "crds", "*.yaml")):
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd:
                    continue
                for version in crd["spec"]["versions"]:
                    group = crd["spec"]["group"]
                    schemas[(f"{group}/{version['name']}", crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def self_check(oldest, newest):
    """The check catches a field the oldest version lacks: a pod-level
    `resources` (PodSpec.resources, Kubernetes 1.32+) is refused for 1.30 and
    taken by the newest, so a template using a newer field fails CI."""
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"resources": {"limits": {"memory": "128Mi"}}, "containers": [{"name": "c", "image": "i"}]}}},
    }
    try:
        kubernetes_validate.validate(deployment, oldest, strict=True)
        fail(f"a field Kubernetes {oldest} lacks was not caught: the check is not strict")
    except kubernetes_validate.ValidationError:
        pass
    kubernetes_validate.validate(deployment, newest, strict=True)


def main():
    oldest, newest = supported_range()
    versions = [oldest, newest]
    self_check(oldest, newest)
    unchecked = set()
    modes = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    if not modes:
        fail("no ci/*-values.yaml")
    crds = crd_schemas()
    checked = 0
    for mode in modes:
        with open(mode) as f:
            values = yaml.safe_load(f) or {}
        documents = list(render(values))
        for version in versions:
            count = 0
            for path, document in documents:
                kind = document.get("kind")
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                    count += 1
                except kubernetes_validate.SchemaNotFoundError:
                    unchecked.add(f"{document.get('apiVersion')}/{kind}")
                except kubernetes_validate.ValidationError as error:
                    fail(f"{os.path.basename(mode)}: {path} ({kind} {document['metadata'].get('name')}) is invalid for Kubernetes {version}: {error.message} at {list(error.path)}")
            print(f"schema-check: {os.path.basename(mode)}: {count} manifests valid (strict) for Kubernetes {version}")
            checked += count
    # The CRDs themselves (crds/ is installed by Helm, not rendered).
    for path in sorted(glob.glob(os.path.join(CHART, "crds", "*.yaml"))):
        with open(path) as f:
            for document in yaml.safe_load_all(f):
                for version in versions:
                    try:
                        kubernetes_validate.validate(document, version, strict=True)
                    except kubernetes_validate.ValidationError as error:
                        fail(f"{path} is invalid for Kubernetes {version}: {error.message}")
    print(f"schema-check: crds/ valid (strict) for Kubernetes {oldest} and {newest}")
    # The project's own resources in the examples, against their CRDs.
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))):
        with open(path) as f:
            for document in yaml.safe_load_all(f):
                if not document:
                    continue
                schema = crds.get((document.get("apiVersion"), document.get("kind")))
                if schema is None:
                    continue
                try:
                    jsonschema.validate({k: v for k, v in document.items() if k in ("spec",)}, {"type": "object", "properties": {"spec": schema["properties"]["spec"]}})
                except jsonschema.ValidationError as error:
                    fail(f"{path}: {document['metadata']['name']}: {error.message}")
    print(f"schema-check: examples/ valid against the project's CRD schemas")
    if unchecked:
        print(f"schema-check: unchecked (no schema offline): {', '.join(sorted(unchecked))}")
    print(f"schema-check: {checked} manifest checks across {len(modes)} modes and Kubernetes {oldest} and {newest}")


if __name__ == "__main__":
    main()
