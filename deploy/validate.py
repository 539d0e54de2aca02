"""Validate deploy/kubernetes/*.yaml offline (`make lint`; tests/unit/test_deploy.py too).

Built-in kinds go through kubernetes-validate's schemas for KUBERNETES_VERSION in strict
mode (an unknown field is an error). The three custom resources (ServiceMonitor,
PrometheusRule, ScaledObject) have no schema there: kubernetes-validate only warns
about them. They are checked against deploy/kubernetes/schemas/, the subsets of their CRDs'
schemas these manifests use (any other field fails). Any other kind is an error.

    python deploy/validate.py [DIRECTORY]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33"
MANIFESTS = Path(__file__).resolve().parent / "kubernetes"
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
}


def resources(directory: Path = MANIFESTS) -> list[tuple[Path, dict[str, Any]]]:
    """Every resource of every manifest, with its file."""
    found = []
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path, document))
    return found


def problems(directory: Path = MANIFESTS) -> list[str]:
    """One line per invalid resource (empty when all are valid)."""
    found = []
    for path, resource in resources(directory):
        kind, api = resource.get("kind", "?"), resource.get("apiVersion", "?")
        name = f"{path.name}: {kind}/{resource.get('metadata', {}).get('name', '?')}"
        schema_file = CUSTOM.get((api, kind))
        try:
            if schema_file is not None:
                schema = json.loads((directory / "schemas" / schema_file).read_text())
                jsonschema.Draft202012Validator(schema).validate(resource)
            else:
                kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except jsonschema.ValidationError as error:
            where = ".".join(str(p) for p in error.absolute_path)
            found.append(f"{name}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            found.append(f"{name}: no schema for {api} {kind} (add one to deploy/validate.py)")
    return found


def main() -> int:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else MANIFESTS
    found = problems(directory)
    for line in found:
        print(line, file=sys.stderr)
    count = len(resources(directory))
    print(f"{count} resources in {directory}: {len(found) or 'no'} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
