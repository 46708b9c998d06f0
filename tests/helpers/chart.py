"""The Helm chart (k8s/charts/baton) rendered offline with Helm's own engine (helm-python-sdk,
Helm's Go SDK through ctypes): value sets, merged values, and the rendered objects by kind."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import helm_python as helm
import yaml

from tests.helpers.workers import REPO

CHART = REPO / "k8s" / "charts" / "baton"
VALUE_SETS = {"default": None, **{p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}}
"""The value sets every test renders: the defaults and each file in the chart's ci/."""
RELEASE, NAMESPACE = "demo", "serving"

helm.disable_logging()


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base` (what `-f a.yaml -f b.yaml` does for maps)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def values_of(value_set: str, override: Optional[dict] = None) -> dict:
    """The user values of a value set (the ci/ file, then `override`), as `helm install -f` passes them."""
    path = VALUE_SETS[value_set]
    values = yaml.safe_load(Path(path).read_text()) if path else {}
    return deep_merge(values or {}, override or {})


def render(values: dict, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (offline: no cluster, `lookup` returns nothing)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=name, namespace=namespace, is_install=True)


def objects(values: dict) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders (NOTES.txt excluded)."""
    found = []
    for path, text in render(values).items():
        if path.endswith(".txt"):
            continue
        found += [doc for doc in yaml.safe_load_all(text) if doc]
    return found


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    """name -> object, for the rendered objects of one kind."""
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def notes(values: dict) -> str:
    return next(text for path, text in render(values).items() if path.endswith("NOTES.txt"))
