"""Every metric the Grafana dashboard and the Prometheus rules query is exported by a running service.

A name that the service does not export (a typo, a renamed metric, a counter without `_total`) shows an
empty panel or an alert that can never fire, and nothing else would notice.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.metrics import Metrics
from service.sessions import build_store
from tests.conftest import start_server

# The sample names each metric type exposes: the parser strips `_total` and `_info` from family names.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def _exported(text: str) -> set[str]:
    """Sample names in a /metrics page, and the names a declared family will expose: a labelled metric
    has no sample until its first event (gru_store_errors_total before any store error), but its
    # TYPE line is there from the start."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def _queried(
    rule_groups: list[dict[str, Any]], dashboard_exprs: list[str], promql: SimpleNamespace
) -> set[str]:
    names: set[str] = set()
    for expr in [rule["expr"] for rule in rule_groups] + dashboard_exprs:
        names |= promql.gru_metrics(expr)
    return names


def test_every_metric_the_dashboard_and_rules_query_is_exported(
    server: Any, rule_groups: list[dict[str, Any]], dashboard_exprs: list[str], promql: SimpleNamespace
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # One chunk through the engine, so the request, batch and timing series have samples.
        answer = http.post("/v1/sessions/deploy-metrics-check/predict", json={"values": [0.1, 0.2, 0.3]})
        assert answer.status_code == 200, answer.text
        page = http.get("/metrics")
    assert page.status_code == 200
    exported = _exported(page.text)
    queried = _queried(rule_groups, dashboard_exprs, promql)
    assert len(queried) >= 10, f"too few names found in the queries: {sorted(queried)}"
    assert queried - exported == set(), f"queried but not exported; exported: {sorted(exported)}"


def test_request_metrics_carry_the_route_template_the_rules_group_by(server: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post("/v1/sessions/deploy-route-check/predict", json={"values": [0.5]})
        page = http.get("/metrics").text
    routes = {
        sample.labels.get("route")
        for family in text_string_to_metric_families(page)
        if family.name == "gru_requests"
        for sample in family.samples
    }
    assert "/v1/sessions/{session_id}/predict" in routes
    assert not any("deploy-route-check" in (route or "") for route in routes), "ids must not become labels"


def test_model_info_carries_the_labels_the_dashboard_shows(server: Any, dashboard: dict[str, Any]) -> None:
    page = httpx.get(server.url + "/metrics", timeout=30).text
    samples = [s for family in text_string_to_metric_families(page) for s in family.samples]
    (info,) = [s for s in samples if s.name == "gru_model_info"]
    model_panel = next(p for p in dashboard["panels"] if p["title"] == "Model")
    legend = model_panel["targets"][0]["legendFormat"]
    for label in ("name", "version", "device"):
        assert "{{" + label + "}}" in legend and label in info.labels


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_dashboard_variables_come_from_a_metric_every_store_exports(
    store: str, dashboard: dict[str, Any], promql: SimpleNamespace
) -> None:
    """The job and replica pickers feed every panel: a Redis replica does not export the session gauges
    (Redis counts and evicts the sessions), and a picker built on them left every panel empty there."""
    metrics = Metrics()
    build_store(Settings(store=store), 8, torch.device("cpu"), metrics)
    exported = _exported(generate_latest(metrics.registry).decode())
    for variable in dashboard["templating"]["list"]:
        names = promql.gru_metrics(variable["query"]["query"])
        assert names and names <= exported, (variable["name"], names)


def _counter(page: str, name: str) -> float:
    """The sum of a counter's samples on a /metrics page (``name`` with its ``_total``)."""
    return sum(sample.value for family in text_string_to_metric_families(page) for sample in family.samples
               if sample.name == name)


def test_the_surprise_share_the_alert_reads_is_the_share_of_the_values_scored(
    wide_model: Path, tmp_path: Path, rule_groups: list[dict[str, Any]]
) -> None:
    """job:gru_surprises:ratio_rate15m, which GruSurprisingValues holds at 5%, is the share of the arriving
    values that were surprising (README; about GRU_SURPRISE_P is expected). Divided by the time steps run, it
    counted each of a step's F values over one step: a model of 32 features at the expected rate read as 32
    times it, and the alert fired on every healthy multi-feature model."""
    (expr,) = [rule["expr"] for rule in rule_groups if rule.get("record") == "job:gru_surprises:ratio_rate15m"]
    numerator, denominator = re.findall(r"rate\((gru_\w+)\[", expr)
    server = start_server(wide_model, tmp_path, {"GRU_SURPRISE_P": "0.5"})
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            values = np.random.default_rng(0).normal(0.5, 0.3, (64, 32)).round(3).tolist()
            answer = http.post("/v1/sessions/surprise-share/predict",
                               json={"values": values, "offset": 0, "scores": True})
            assert answer.status_code == 200, answer.text
            page = http.get("/metrics").text
    finally:
        server.stop(signal.SIGKILL)
    scores = np.array(answer.json()["scores"], dtype=np.float64)  # null -> nan: not scored
    share = np.count_nonzero(scores < 0.5) / np.count_nonzero(~np.isnan(scores))
    assert 0 < share < 1
    assert _counter(page, numerator) / _counter(page, denominator) == pytest.approx(share)
