"""Every GRU_ variable a deployment file sets is a setting, and its value is one the setting accepts.

The service stops at start on an unknown GRU_ variable (service.config.unknown_variables), but only once
deployed: a misspelt name in the KServe runtime's `env`, in the GPU compose override or in a guide's
command would be found by the pod crash-looping, or, read by a test through `Settings(**kwargs)` (whose
extra="ignore" drops unknown keys), not at all. One list of every place, each read the way its tool reads it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings, unknown_variables

Render = Callable[[str], list[dict[str, Any]]]
OVERLAYS = ("overlays/dev", "overlays/prod", "overlays/gpu")
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
GUIDES = ("README.md", "docs/deploy.md", "docs/durability.md")
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
# `GRU_X=value` in prose or a command; a value in capitals (DIR) is a placeholder, not a value.
_ASSIGNMENT = re.compile(r"\b(GRU_[A-Z0-9_]+)=([^\s`'\"|,)]*)")


def _compose_env(repo: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Each compose service's environment, as written (YAML merge keys resolved; `${X:-d}` as its default)."""
    for name in COMPOSE_FILES:
        for service, spec in yaml.safe_load((repo / name).read_text())["services"].items():
            env = spec.get("environment", {})
            if isinstance(env, list):
                env = dict(item.split("=", 1) for item in env)
            yield f"{name}: {service}", {k: _INTERPOLATION.sub(lambda m: m.group(2) or "", str(v))
                                         for k, v in env.items()}


def _container_env(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "key:tenant")  # valueFrom: a Secret (the API keys)
    return env


def _kubernetes_env(kustomize: Render) -> Iterator[tuple[str, dict[str, str]]]:
    """Each container's environment in every overlay and in the KServe runtime: its ConfigMaps and `env`."""
    for overlay in (*OVERLAYS, "kserve"):
        resources = kustomize(overlay)
        config_maps = {r["metadata"]["name"]: r.get("data", {}) for r in resources if r["kind"] == "ConfigMap"}
        for r in resources:
            spec = r.get("spec", {})
            pod = spec.get("template", {}).get("spec", spec)  # a ServingRuntime holds its containers itself
            for container in pod.get("containers", []):
                yield f"{overlay}: {r['kind']}/{r['metadata']['name']}/{container['name']}", _container_env(
                    container, config_maps)


def _problems(where: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Unknown names, then the values, through Settings reading them from the environment as the service does.
    Paths that exist only in the container (the model repository) are not checked here."""
    gru = {k: v for k, v in env.items() if k.upper().startswith("GRU_")}
    problems = [f"{where}: {line}" for line in unknown_variables(gru)]
    if problems:
        return problems
    with monkeypatch.context() as patch:
        for name in [k for k in os.environ if k.upper().startswith("GRU_")]:
            patch.delenv(name)
        for name, value in gru.items():
            patch.setenv(name, value)
        patch.delenv("GRU_MODEL_REPOSITORY", raising=False)
        patch.delenv("GRU_API_KEYS_FILE", raising=False)
        patch.setenv("GRU_MODEL_PATH", str(tmp_path))
        try:
            Settings()
        except ValueError as error:  # pydantic's ValidationError names the variable
            problems.append(f"{where}: {error}")
    return problems


def test_every_gru_variable_a_deployment_sets_is_a_setting_with_a_valid_value(
    repo: Path, kustomize: Render, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    places = [*_compose_env(repo), *_kubernetes_env(kustomize)]
    assert {where.split(":")[0] for where, env in places if any(k.startswith("GRU_") for k in env)} >= {
        *COMPOSE_FILES, *OVERLAYS, "kserve"}, "a place that sets GRU_ variables was not read"
    problems = [p for where, env in places for p in _problems(where, env, monkeypatch, tmp_path)]
    assert problems == []


def test_every_gru_variable_a_guide_sets_is_a_setting(repo: Path) -> None:
    problems = []
    for guide in GUIDES:
        for number, line in enumerate((repo / guide).read_text().splitlines(), 1):
            for name, _ in _ASSIGNMENT.findall(line):
                problems += [f"{guide}:{number}: {p}" for p in unknown_variables({name: ""})]
    assert problems == []


@pytest.mark.parametrize("env, problem", [
    ({"GRU_MAX_ANSWERS_BYTES": "134217728"}, "did you mean GRU_MAX_ANSWER_BYTES"),
    ({"GRU_DEVICE": "gpu"}, "device"),
    ({"GRU_TORCH_THREADS": "1.5"}, "torch_threads"),
    ({"GRU_STORE": "redis", "GRU_REDIS_URL": "gru-redis:6379"}, "GRU_REDIS_URL"),
    ({"GRU_MAX_BODY_BYTES": "4m"}, "max_body_bytes"),
])
def test_a_misspelt_name_or_a_refused_value_is_caught(
    env: dict[str, str], problem: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    found = _problems("injected", {"GRU_STORE": "memory", **env}, monkeypatch, tmp_path)
    assert any(problem in line for line in found), found
