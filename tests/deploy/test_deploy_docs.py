"""docs/deploy.md: the files and overlays it sends readers to exist, and its numbers match the config."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def test_every_path_the_deploy_guide_names_exists(repo: Path) -> None:
    text = DOC.read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:deploy|docs|tests)/[\w./*-]*[\w*/])", text))
    paths -= set(re.findall(r"rollout status\s+(deploy/[\w-]+)", text))  # kubectl's deploy/<name>, not a path
    paths |= set(re.findall(r"(?<![\w/.-])(docker-compose(?:\.gpu)?\.yml|Dockerfile|\.dockerignore)", text))
    assert len(paths) > 10
    for path in sorted(paths):
        assert list(repo.glob(path.rstrip("/"))), f"docs/deploy.md names {path}, which does not exist"


def _shipped_sizes(repo: Path) -> tuple[int, int, int, int, int, int]:
    """(L, H, K, F, A, N) of the shipped model (A: its calibration's anchor levels, N: 1 when it normalises
    its scores), or of ForecasterConfig's defaults until the weights are there."""
    from model.conformal import ANCHORS, DEFAULT_SCALE_RATE
    from model.forecaster import ForecasterConfig

    config_file = repo / "model" / "weights" / "default" / "config.json"
    if config_file.is_file():
        meta = json.loads(config_file.read_text())
        config = ForecasterConfig.from_dict(meta["model"])
        anchors = len(meta.get("calibration", {}).get("anchors", ANCHORS))
        normalised = int(meta.get("calibration", {}).get("scale_rate", DEFAULT_SCALE_RATE) > 0)
    else:
        config, anchors, normalised = ForecasterConfig(features=("x",)), len(ANCHORS), 1
    return config.num_layers, config.hidden_size, config.lags, config.num_features, anchors, normalised


def test_redis_state_size_in_the_guide_is_the_shipped_models(repo: Path) -> None:
    layers, hidden, lags, features, anchors, normalised = _shipped_sizes(repo)
    per_feature = 1 + normalised  # the last prediction [and the running error level], besides the log-scales
    state_bytes = (layers * hidden + lags * features + 1 + 1 + features * (per_feature + anchors)) * 4
    text = DOC.read_text()
    assert (f"({layers}·{hidden} + {lags}·{features} + 1 + 1 + {features}·({per_feature} + {anchors}))·4"
            f" = {state_bytes}") in text


def test_redis_memory_cap_in_the_guide_is_the_one_compose_sets(repo: Path) -> None:
    compose = (repo / "docker-compose.yml").read_text()
    assert "`--maxmemory 512mb --maxmemory-policy volatile-lru`" in DOC.read_text()
    assert re.search(r"- --maxmemory\n\s+- 512mb\n\s+- --maxmemory-policy\n\s+- volatile-lru", compose)


def test_the_redis_command_in_the_durability_doc_is_compose_s(repo: Path) -> None:
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    lines = [line.strip() for line in (repo / "docs" / "durability.md").read_text().splitlines()
             if line.strip().startswith("redis-server --maxmemory") and "--appendonly" in line]
    assert [shlex.split(line) for line in lines] == [compose]


def test_the_guide_names_every_alert_the_rules_define_and_no_other(repo: Path) -> None:
    """The guide's list is where an operator learns what can page them: an alert missing from it is one they
    meet first when it fires, and one it names that the rules lack is protection they do not have."""
    defined = {rule["alert"] for group in yaml.safe_load((repo / "deploy" / "prometheus" / "rules" / "alerts.yml")
                                                        .read_text())["groups"]
               for rule in group["rules"] if "alert" in rule}
    named = set(re.findall(r"`(Gru[A-Za-z0-9]+)`", DOC.read_text()))
    assert len(defined) >= 5
    assert (sorted(defined - named), sorted(named - defined)) == ([], [])


def test_the_guide_names_every_overlay_that_needs_the_prometheus_operator(kustomize: Any) -> None:
    """An overlay that renders a ServiceMonitor fails `kubectl apply -k` on a cluster without the operator's CRDs:
    the guide's sentence saying which overlays need them must name each, and no other."""
    text = " ".join(DOC.read_text().split())
    (subject,) = re.findall(r"([^.]*) a ServiceMonitor, so the cluster needs", text)  # "The prod overlay includes"
    for overlay in ("dev", "prod", "gpu"):
        monitors = [r for r in kustomize(f"overlays/{overlay}") if r["kind"] == "ServiceMonitor"]
        assert (re.search(rf"\b{overlay}\b", subject) is not None) == bool(monitors), (overlay, subject)
