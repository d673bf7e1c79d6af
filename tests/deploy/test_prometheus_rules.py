"""Prometheus config, recording and alert rules: promtool checks them; their unit tests fire the alerts."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml


def _promtool(tool: Callable[[str], str], repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=repo, capture_output=True, text=True, timeout=60,
                          check=False)


def test_prometheus_config_and_the_rule_files_it_names_pass_promtool(
    tool: Callable[[str], str], repo: Path
) -> None:
    done = _promtool(tool, repo, "check", "config", "deploy/prometheus/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool resolves rule_files relative to the config, as Prometheus in the container does.
    assert "SUCCESS: 2 rule files found" in done.stdout + done.stderr


def test_rule_files_pass_promtool_check_rules(tool: Callable[[str], str], repo: Path) -> None:
    files = sorted(str(p.relative_to(repo)) for p in (repo / "deploy" / "prometheus" / "rules").glob("*.yml"))
    assert len(files) == 2
    done = _promtool(tool, repo, "check", "rules", *files)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_synthetic_series_and_stay_quiet_otherwise(
    tool: Callable[[str], str], repo: Path
) -> None:
    done = _promtool(tool, repo, "test", "rules", "deploy/prometheus/tests/alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def _alerts(rules: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules if "alert" in r}


def test_alerts_cover_latency_errors_evictions_and_down_replicas(rule_groups: list[dict[str, Any]]) -> None:
    alerts = _alerts(rule_groups)
    required = {
        "GruHighP99Latency", "GruHighErrorRate", "GruSessionCapacityEvictions", "GruApiDown", "GruApiAbsent"
    }
    assert required <= set(alerts)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), f"{name}: a `for:` keeps one bad scrape quiet"
    assert "histogram_quantile(0.99" in _recorded(rule_groups)[_single_rule_name(alerts["GruHighP99Latency"])]
    assert 'status=~"5.."' in _recorded(rule_groups)[_single_rule_name(alerts["GruHighErrorRate"])]
    assert 'reason="capacity"' in alerts["GruSessionCapacityEvictions"]["expr"]
    assert alerts["GruApiDown"]["expr"].replace(" ", "") == 'up{job="gru-api"}==0'


def _recorded(rules: list[dict[str, Any]]) -> dict[str, str]:
    return {r["record"]: r["expr"] for r in rules if "record" in r}


def _single_rule_name(alert: dict[str, Any]) -> str:
    (name,) = {n for n in re.findall(r"[A-Za-z_:][\w:]*", alert["expr"]) if ":" in n}
    return name


def test_every_recording_rule_the_alerts_and_dashboard_use_is_defined(
    rule_groups: list[dict[str, Any]], dashboard_exprs: list[str], promql: SimpleNamespace
) -> None:
    recorded = _recorded(rule_groups)
    used = set()
    for expr in [r["expr"] for r in rule_groups] + dashboard_exprs:
        used |= promql.recording_rules(expr)
    assert used - set(recorded) == set()


def test_recording_rule_names_follow_level_metric_operations(rule_groups: list[dict[str, Any]]) -> None:
    for name, expr in _recorded(rule_groups).items():
        level, metric, operations = name.split(":")
        assert metric.startswith("gru_") and operations, name
        # level lists the labels the aggregation keeps ("job_route" = by (job, route)).
        kept = re.search(r"by \(([^)]*)\)", expr)
        assert kept is not None, name
        labels = [label.strip() for label in kept.group(1).split(",") if label.strip() != "le"]
        assert level.split("_") == labels, name


def test_alerts_and_dashboard_select_the_job_prometheus_scrapes(
    rule_groups: list[dict[str, Any]], dashboard: dict[str, Any], repo: Path
) -> None:
    config = yaml.safe_load((repo / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    for rule in rule_groups:
        for job in re.findall(r'job="([^"$]+)"', rule["expr"]):
            assert job in jobs, rule.get("alert") or rule.get("record")
    job_variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "job")
    assert job_variable["current"]["value"] in jobs


@pytest.mark.parametrize("expr, names", [
    ('sum by (route, status) (rate(gru_requests_total{job="gru-api", route="/v1/x"}[5m]))',
     {"gru_requests_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(gru_forward_seconds_bucket{instance=~\"$instance\"}"
     "[$__rate_interval])))", {"gru_forward_seconds_bucket"}),
    ('job:gru_requests_5xx:ratio_rate5m > 0.01', set()),
    ('sum(rate(gru_batch_size_sum[5m])) / sum(rate(gru_batch_size_count[5m]))',
     {"gru_batch_size_sum", "gru_batch_size_count"}),
    ('up{job="gru-api", name="gru_not_a_metric"} == 0', set()),
    ("label_values(gru_active_sessions{job=\"$job\"}, instance)", {"gru_active_sessions"}),
])
def test_metric_names_are_read_from_promql_and_not_from_labels_or_rule_names(
    expr: str, names: set[str], promql: SimpleNamespace
) -> None:
    assert promql.gru_metrics(expr) == names
