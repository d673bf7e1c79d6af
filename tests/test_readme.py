"""The README is the front door: its first lines are the two commands, and it documents every setting."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.common import DEFAULT_WEIGHTS
from harness.processes import ROOT
from service.config import CLIENT_VARIABLES, Settings
from tests.conftest import Server, start_server

README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_two_commands() -> None:
    commands = [line.split("#")[0].strip() for line in README.splitlines()[1:4] if line.strip()]
    assert commands == ["make serve", "make test"]


def test_every_setting_is_in_the_configuration_table() -> None:
    for name in Settings.model_fields:
        assert f"| `GRU_{name.upper()}` |" in README, f"GRU_{name.upper()} is missing from the README table"


def _table_default(cell: str, default: object) -> str:
    """A Settings default as the configuration table writes it: `5` for 5.0, `false`, a path from the root."""
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    if hasattr(default, "relative_to"):
        return f"`{default.relative_to(ROOT)}`"
    if default == "":
        return cell if cell in ("empty", "the only model") else "empty"
    return f"`{default}`"


def _table_defaults(readme: str) -> dict[str, str]:
    return {m[1]: m[2].strip() for m in re.finditer(r"(?m)^\| `(GRU_\w+)` \| ([^|]*) \|", readme)}


def _wrong_defaults(readme: str) -> dict[str, tuple[str, str]]:
    """Settings whose table cell does not start with their default: (the cell, what it should start with)."""
    table = _table_defaults(readme)
    wrong = {}
    for name, field in Settings.model_fields.items():
        cell = table[f"GRU_{name.upper()}"]
        expected = _table_default(cell, field.default)
        if not cell.startswith(expected):  # "unset (no bound)": the words after it explain
            wrong[f"GRU_{name.upper()}"] = (cell, expected)
    return wrong


def test_the_configuration_table_gives_each_setting_its_real_default() -> None:
    """A default in the table that is not the service's misleads whoever sizes a deployment from it."""
    assert _wrong_defaults(README) == {}


@pytest.mark.parametrize("row, stale", [
    ("| `GRU_MAX_QUEUE` | `1024` |", "| `GRU_MAX_QUEUE` | `512` |"),
    ("| `GRU_SNAPSHOT_PATH` | unset |", "| `GRU_SNAPSHOT_PATH` | `/data/sessions.snapshot` |"),
    ("| `GRU_METRICS_REQUIRE_KEY` | `false` |", "| `GRU_METRICS_REQUIRE_KEY` | `true` |"),
])
def test_the_default_check_catches_a_stale_default(row: str, stale: str) -> None:
    assert row in README
    name = row.split("`")[1]
    assert set(_wrong_defaults(README.replace(row, stale))) == {name}


# -- names and paths the docs cite ---------------------------------------------------------------------------------

DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/architecture.md", "docs/durability.md",
                                                      "docs/interop.md", "docs/security.md", "docs/deploy.md")}
# GRU_ names the docs write that are no setting on purpose: the misspelling the start-up check names, and the
# variables the kubelet derives from a Service named gru-api (docs/deploy.md).
NOT_SETTINGS = {"GRU_SNAPSHOT_PATHS", "GRU_API_SERVICE_HOST", "GRU_API_PORT"}
_CITED_PATH = re.compile(r"`((?:service|model|bench|harness|deploy|tests|docs|scripts)/[\w./-]*)`")


def _unknown_settings(text: str) -> set[str]:
    known = {f"GRU_{name.upper()}" for name in Settings.model_fields} | set(CLIENT_VARIABLES) | NOT_SETTINGS
    return set(re.findall(r"\bGRU_[A-Z0-9_]*[A-Z0-9]", text)) - known


def _missing_paths(text: str) -> set[str]:
    return {path for path in _CITED_PATH.findall(text) if not (ROOT / path).exists()}


@pytest.mark.parametrize("name", DOCS)
def test_every_gru_variable_the_docs_name_is_a_setting(name: str) -> None:
    assert _unknown_settings(DOCS[name]) == set()


@pytest.mark.parametrize("name", DOCS)
def test_every_file_the_docs_cite_exists(name: str) -> None:
    assert _missing_paths(DOCS[name]) == set()


def test_the_name_checks_catch_a_stale_name() -> None:
    assert _unknown_settings(README.replace("`GRU_MAX_QUEUE`", "`GRU_QUEUE_MAX`")) == {"GRU_QUEUE_MAX"}
    stale = DOCS["docs/architecture.md"].replace("`service/rules.py`", "`service/offsets.py`")
    assert _missing_paths(stale) == {"service/offsets.py"}


def test_ci_runs_the_readme_test_command() -> None:
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


# -- the README's examples, run against the shipped model ------------------------------------------------------

_CURL = re.compile(r"curl -s (?:-X (?P<method>\w+) )?localhost:8000(?P<path>\S+)(?P<rest>.*)")
_MEMBER = re.compile(r'"(\w+)":(\[\[[^]]*(?:\],\[[^]]*)*\]\]|"[^"]*"|-?[\d.]+|true|false)')


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(DEFAULT_WEIGHTS, tmp_path_factory.mktemp("readme"))
    yield running
    running.stop(signal.SIGKILL)


def _curl_section() -> list[tuple[str, str, bytes | None, str]]:
    """Each curl of "A session in curl": method, path, body, and the sample answer in the comment below it."""
    block = README.split("## A session in curl", 1)[1].split("\n## ", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    calls = []
    for index, line in enumerate(lines):
        found = _CURL.search(line)
        if found is None:
            continue
        body = re.search(r"-d '([^']*)'", found["rest"])
        method = found["method"] or ("POST" if body else "GET")
        sample = "".join(more.strip().lstrip("#") for more in lines[index + 1:index + 4]
                         if more.strip().startswith("# ") and ('"' in more))
        calls.append((method, found["path"], body[1].encode() if body else None, sample))
    return calls


def _rounded(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return [[None if x is None else round(x, 2) for x in row] for row in value]


def _members(answer: Any) -> list[tuple[str, Any]]:
    """Every member of the answer that is not an object, depth first in order: an interval's ``lower`` of
    level 80 comes before level 95's, as the README prints them."""
    found: list[tuple[str, Any]] = []
    for name, value in answer.items():
        found += _members(value) if isinstance(value, dict) else [(name, value)]
    return found


def test_the_curl_session_answers_what_the_readme_shows(shipped: Server) -> None:
    """Every member the README prints in full (not elided with ...) is what the shipped model answers,
    numbers to the two decimals shown."""
    calls = _curl_section()
    assert len(calls) == 9 and sum(bool(sample) for *_, sample in calls) == 3
    checked = 0
    with httpx.Client(base_url=shipped.url) as http:
        for method, path, body, sample in calls:
            answer = http.request(method, path, content=body)
            assert answer.status_code < 500, answer.text
            members = iter(_members(answer.json()) if sample else [])
            for name, shown in _MEMBER.findall(sample):
                actual = next(value for member, value in members if member == name)
                if "..." in shown or "…" in shown:
                    continue
                assert _rounded(actual) == json.loads(shown), (
                    f"{method} {path}: README shows {name}={shown}, the shipped model answers {actual}")
                checked += 1
    assert checked == 20  # eight members of the first answer, four of the 409, eight with intervals and scores


def test_the_python_example_runs_twice_and_prints_what_the_readme_shows(shipped: Server) -> None:
    block = README.split("from service.client import Client\n", 1)[1].split("\n\n", 1)[0]
    code = "from service.client import Client\n" + textwrap.dedent(block)
    shown = next(line.split("# ", 1)[1] for line in code.splitlines() if line.lstrip().startswith("# "))
    first, again = shown.split("run again, it goes on:")
    runs = [subprocess.run([sys.executable, "-c", code.replace("http://localhost:8000", shipped.url)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    assert [run.stdout.strip() for run in runs] == [first.strip(), again.strip()]


# -- the API table's routes and their per-model forms ------------------------------------------------------------

_PER_MODEL = "Every `/v1/predict` and `/v1/sessions` route above also exists per model"
_TABLE_ROW = re.compile(r"(?m)^\| `(GET|POST|PUT|DELETE) (/[^`]*)`((?:, `/[^`]*`)*)")


def _api_table_routes() -> list[tuple[str, str]]:
    """(method, path) of every row of the API (v1) table; a row of several paths gives each its method."""
    table = README.split("## API (v1)", 1)[1].split("\n\n| method, path |", 1)[1].split("\n\n", 1)[0]
    routes = []
    for method, path, more in _TABLE_ROW.findall(table):
        routes += [(method, p) for p in [path, *re.findall(r"`(/[^`]*)`", more)]]
    return routes


def test_the_per_model_routes_are_the_ones_the_readme_names(shipped: Server) -> None:
    """The README says which table routes also exist under /v1/models/{model}/: the predict and session
    ones do, and the others (the model cards, /metrics, the probes, /docs) answer there "no route"."""
    assert _PER_MODEL in README
    routes = _api_table_routes()
    assert len(routes) == 17, routes  # 13 rows, the last of four paths
    with httpx.Client(base_url=shipped.url) as http:
        default = http.get("/v1/model").json()["name"]
        for method, path in routes:
            concrete = path.replace("{id}", "readme-per-model").replace("{model}", default)
            answer = http.request(method, f"/v1/models/{default}{concrete.removeprefix('/v1')}")
            no_route = answer.status_code == 404 and answer.json()["type"].endswith("/not-found")
            per_model = path.startswith(("/v1/predict", "/v1/sessions"))
            assert no_route != per_model, f"{method} {path}: {answer.status_code} {answer.text[:200]}"
