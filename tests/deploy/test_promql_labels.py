"""Every label the alerts, recording rules and dashboard read is one the metrics they select carry, and every
value they match on is one the service writes.

test_dashboard_metrics_exported checks the metric names; a wrong label fails as quietly: `by (reasons)`
sums every series into one, `{reason="quota"}` or `route!~"/livez"` selects nothing or too much, a legend's
`{{model}}` on a metric without it prints an empty string, and an alert on a filtered series never fires.
The labels come from the app's own registry (service.metrics, with the model info the app sets) and the
values from the constants the service writes them from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from service.api import stream
from service.app import create_app
from service.metrics import EVICTION_REASONS, REJECT_REASONS
from service.middleware.observability import _METHODS
from service.models import DRAINING, SERVING

TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_info")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\([^,]*,\s*(\w+)\s*\)")
_AGGREGATION = re.compile(
    r"\b(?:sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile)\s*(?:by\s*\([^)]*\)\s*)?\("
)
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")


@cache
def _service() -> SimpleNamespace:
    """The label names of every family in a real app's registry, and the values the closed labels take."""
    app = create_app()
    registry = app.state.metrics.registry
    labels: dict[str, set[str]] = {}
    for collector, names in registry._collector_to_names.items():
        declared = set(getattr(collector, "_labelnames", ()))
        for family in collector.collect():  # adds what only samples show: gru_model_info's, the frames'
            declared |= {label for sample in family.samples for label in sample.labels}
        for name in names:
            labels[name] = declared | ({"le"} if name.endswith("_bucket") else set())
    routes = {*app.openapi()["paths"], *(route.path for route in stream.ROUTES)}
    http = ("gru_requests_total", "gru_request_duration_seconds_bucket")
    values = {
        "reason": {"gru_session_evictions_total": set(EVICTION_REASONS), "gru_rejected_total": set(REJECT_REASONS)},
        "state": {"gru_model_versions": {SERVING, DRAINING}},
        "direction": {"gru_stream_frames_total": {"in", "out"}},
        "status": {"gru_requests_total": {str(code) for code in range(100, 600)}},
        "method": {name: {*_METHODS, "other"} for name in http},
        "route": {name: routes for name in http},
    }
    return SimpleNamespace(labels=labels, values=values, routes=routes)


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def _labels_read(expr: str, extra: str = "") -> set[str]:
    """Label names an expression reads: matchers, grouping clauses, label_values, and `{{x}}` / `$labels.x`
    in the legend or annotations given as `extra`."""
    names = {name for name, _, _ in _MATCHER.findall(expr)}
    for group in _GROUPING.findall(_strip_strings(expr)):
        names |= {label.strip() for label in group.split(",") if label.strip()}
    names |= set(_LABEL_VALUES.findall(expr))
    names |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", extra)) | set(re.findall(r"\$labels\.(\w+)", extra))
    return names


def _recorded_labels(rules: list[dict[str, Any]]) -> dict[str, set[str]]:
    """What each recording rule's series carry: its outer `by (...)`, less `le` (histogram_quantile drops it)."""
    out = {}
    for rule in rules:
        if "record" in rule:
            kept = re.search(r"by \(([^)]*)\)", rule["expr"])
            assert kept is not None, f"{rule['record']}: no `by`, so its labels cannot be told"
            out[rule["record"]] = {label.strip() for label in kept.group(1).split(",")} - {"le"}
    return out


def _queries(rules: list[dict[str, Any]], dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expression, legend or annotations) for every rule, panel target and template variable."""
    for rule in rules:
        annotations = " ".join(str(v) for v in rule.get("annotations", {}).values())
        yield rule.get("alert") or rule["record"], rule["expr"], annotations
    for panel in [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")
    for variable in dashboard["templating"]["list"]:
        yield f"${variable['name']}", variable["query"]["query"], ""


def _allowed(expr: str, promql: SimpleNamespace, service: SimpleNamespace,
             recorded: dict[str, set[str]]) -> set[str] | None:
    """The labels every series the expression selects carries (None: it selects none of ours)."""
    sets = [service.labels.get(name, set()) | TARGET_LABELS for name in promql.gru_metrics(expr)]
    sets += [recorded.get(name, set()) for name in promql.recording_rules(expr)]
    return set.intersection(*sets) if sets else None


def _problems(rules: list[dict[str, Any]], dashboard: dict[str, Any], promql: SimpleNamespace) -> list[str]:
    service = _service()
    recorded = _recorded_labels(rules)
    problems = []
    for where, expr, extra in _queries(rules, dashboard):
        for name in promql.gru_metrics(expr) - set(service.labels):
            problems.append(f"{where}: {name} is not exported")
        allowed = _allowed(expr, promql, service, recorded)
        if allowed is not None:
            problems += [f"{where}: no series it selects carries {label!r} ({sorted(allowed)})"
                         for label in sorted(_labels_read(expr, extra) - allowed)]
            shown = _labels_read("", extra)
            if _AGGREGATION.search(_strip_strings(expr)):  # a legend or annotation sees only what `by` keeps
                kept = {label.strip() for group in _BY.findall(_strip_strings(expr)) for label in group.split(",")}
                problems += [f"{where}: shows {label!r}, which its aggregation drops (keeps {sorted(kept)})"
                             for label in sorted(shown - kept)]
        for metric, matchers in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(matchers):
                known = service.values.get(label, {}).get(metric)
                if known is None or "$" in value:
                    continue
                if op in ("=", "!="):
                    hit = value in known
                else:  # a regex: each alternative must match a value (a stale one in a list would not show)
                    hit = all(any(re.fullmatch(alternative, v) for v in known) for alternative in value.split("|"))
                if not hit:
                    problems.append(f"{where}: {metric}{{{label}{op}{value!r}}} matches no value the service"
                                    f" writes")
    return problems


def test_every_label_and_value_the_rules_and_dashboard_read_is_one_the_service_writes(
    rule_groups: list[dict[str, Any]], dashboard: dict[str, Any], promql: SimpleNamespace
) -> None:
    assert _problems(rule_groups, dashboard, promql) == []


def test_the_alert_unit_tests_feed_series_with_the_labels_the_service_writes(
    repo: Path, rule_groups: list[dict[str, Any]], promql: SimpleNamespace
) -> None:
    """A synthetic series labelled as the service never labels its series makes an alert's unit test pass
    for an alert that cannot fire on real data."""
    tests = yaml.safe_load((repo / "deploy" / "prometheus" / "tests" / "alerts_test.yml").read_text())
    series = [{"alert": f"alerts_test.yml: {s['series']}", "expr": s["series"]}
              for case in tests["tests"] for s in case["input_series"]]
    checked = [s for s in series if promql.gru_metrics(s["expr"])]
    assert len(checked) >= 10
    assert _problems(checked, {"panels": [], "templating": {"list": []}}, promql) == []


@pytest.mark.parametrize("expr, extra, problem", [
    ('sum by (job, reasons) (rate(gru_session_evictions_total[5m]))', "", "carries 'reasons'"),
    ('rate(gru_session_evictions_total{reason="quota"}[5m])', "", "matches no value"),
    ('rate(gru_rejected_total{reason="capacity"}[5m])', "", "matches no value"),
    ('rate(gru_requests_total{route!~"/metrics|/livez"}[5m])', "", "matches no value"),
    ('rate(gru_requests_total{status=~"6.."}[5m])', "", "matches no value"),
    ('gru_model_versions{state="active"}', "", "matches no value"),
    ('sum by (job) (rate(gru_steps_total[5m]))', "{{ $labels.model }}", "which its aggregation drops"),
    ('sum(rate(gru_rejected_total[5m])) by (model)', "", "carries 'model'"),
    ('histogram_quantile(0.9, sum by (le) (rate(gru_queue_wait_seconds_bucket[5m])))', "{{model}}",
     "carries 'model'"),
    ('sum by (job) (rate(gru_surprise_total[15m]))', "", "is not exported"),
])
def test_a_label_or_value_the_service_does_not_write_is_caught(
    expr: str, extra: str, problem: str, promql: SimpleNamespace
) -> None:
    """The check itself, on injected mistakes (each next to what the shipped files do right)."""
    rule = {"alert": "Injected", "expr": expr, "annotations": {"summary": extra}}
    found = _problems([rule], {"panels": [], "templating": {"list": []}}, promql)
    assert any(problem in line for line in found), found
