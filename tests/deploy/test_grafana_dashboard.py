"""Grafana provisioning: the datasource the dashboard names, the provider compose mounts, the panels."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def test_datasource_is_provisioned_with_the_uid_every_panel_uses(dashboard: dict[str, Any]) -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in _panels(dashboard):
        refs = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        for ref in refs:
            assert ref is None or ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


def test_dashboard_provider_reads_the_directory_compose_mounts() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gru.yml").read_text())
    (provider,) = config["providers"]
    compose = yaml.safe_load((GRAFANA.parents[1] / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


@pytest.mark.parametrize("title_words, metric", [
    (("requests/s", "route", "status"), "gru_requests_total"),
    (("latency", "p50", "p99"), "gru_request_duration_seconds_bucket"),
    (("active sessions",), "gru_active_sessions"),
    (("evictions",), "gru_session_evictions_total"),
    (("batch size",), "gru_batch_size_bucket"),
    (("queue wait", "p50", "p99"), "gru_queue_wait_seconds_bucket"),
    (("forward time", "p50", "p99"), "gru_forward_seconds_bucket"),
    (("open streams",), "gru_streams_open"),
    (("stream frames",), "gru_stream_frames_total"),
    (("surprising", "share"), "gru_surprises_total"),
    (("loaded model versions",), "gru_model_versions"),
    (("sessions by model version",), "gru_model_version_sessions"),
    (("steps/s", "model", "version"), "gru_steps_total"),
])
def test_dashboard_has_a_panel_for(
    title_words: tuple[str, ...], metric: str, dashboard: dict[str, Any], promql: SimpleNamespace
) -> None:
    matching = [p for p in _panels(dashboard) if all(w in p["title"].lower() for w in title_words)]
    assert matching, f"no panel titled with {title_words}"
    metrics = {m for p in matching for t in p.get("targets", []) for m in promql.gru_metrics(t["expr"])}
    assert metric in metrics


def test_latency_panels_show_both_p50_and_p99(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if "p99" in panel["title"]:
            assert any("histogram_quantile(0.5," in e for e in exprs), panel["title"]
            assert any("histogram_quantile(0.99," in e for e in exprs), panel["title"]


def test_requests_panel_splits_by_route_and_status(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in _panels(dashboard) if p["title"] == "Requests/s by route and status")
    (target,) = panel["targets"]
    assert "sum by (route, status)" in target["expr"]
    assert "{{route}}" in target["legendFormat"] and "{{status}}" in target["legendFormat"]


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]


def test_dashboard_is_provisioned_read_only_with_a_stable_uid(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "gru-service"
    assert "id" not in dashboard or dashboard["id"] is None
    assert dashboard["editable"] is False


def test_model_selector_filters_the_per_model_panels(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "gru_model_versions" in variables["model"]["query"]["query"] and variables["model"]["includeAll"]
    per_model = [p for p in dashboard["panels"] if "version" in p["title"].lower() or "forward" in p["title"].lower()]
    assert len(per_model) == 4
    for panel in per_model:
        assert all('model=~"$model"' in target["expr"] for target in panel["targets"]), panel["title"]


def test_a_panel_in_a_per_second_unit_plots_rates(dashboard: dict[str, Any]) -> None:
    """A unit like reqps on a gauge (sessions, versions) would label a count as a rate."""
    for panel in _panels(dashboard):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if unit.endswith("ps"):
            for target in panel.get("targets", []):
                assert "rate(" in target["expr"], (panel["title"], unit, target["expr"])
