"""A session's state as a document (README, "Session state"): export, import and fork against real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from safetensors.numpy import load, save

from harness.checkpoints import random_checkpoint
from harness.processes import RedisServer
from service.client import AsyncClient, Client, PreconditionFailed, SessionExists
from service.client.cli import main
from service.models import Registry, ServedModel
from service.refusals import Overloaded
from service.refusals import PreconditionFailed as PreconditionFailedRefusal
from service.session_state import MAX_ATTEMPTS, Precondition, SessionStates
from service.sessions.document import StateDocument, decode, encode
from tests.conftest import Server, ServerFactory, make_tiny_model
from tests.service.helpers import assert_problem, new_id, position, send, series, stateless
from tests.service.test_model_lifecycle import _in_process_registry

OCTET = {"Content-Type": "application/octet-stream"}
ALICE, BOB = "alice-0123456789abcdef", "bob-0123456789abcdef0"


def _state(http: httpx.Client, session_id: str, **headers: str) -> httpx.Response:
    return http.get(f"/v1/sessions/{session_id}/state", headers=headers)


def _put(http: httpx.Client, session_id: str, document: bytes, **headers: str) -> httpx.Response:
    return http.put(f"/v1/sessions/{session_id}/state", content=document, headers={**OCTET, **headers})


def _exported(http: httpx.Client, session_id: str) -> tuple[bytes, str]:
    response = _state(http, session_id)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    return response.content, response.headers["etag"]


def _fed(http: httpx.Client, session_id: str, values: np.ndarray, cuts: list[int]) -> list[httpx.Response]:
    """``values`` sent in chunks of ``cuts`` steps from offset 0; every answer."""
    answers, start = [], 0
    for size in cuts:
        answers.append(send(http, session_id, values[start : start + size], offset=start))
        assert answers[-1].status_code == 200, answers[-1].text
        start += size
    return answers


# -- export, import, continue ------------------------------------------------------------------------


def _on_store(request: pytest.FixtureRequest, server_factory: ServerFactory, **settings: str) -> Server:
    """A service process with ``settings`` and the store the test is parametrised by (``request.param``)."""
    if request.param == "memory":
        return server_factory(**settings)
    redis: RedisServer = request.getfixturevalue("redis_server")
    return server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis.url, **settings)


@pytest.fixture(params=["memory", "redis"])
def other_process(request: pytest.FixtureRequest, server_factory: ServerFactory) -> Server:
    """A second service process, with the store the test is parametrised by."""
    return _on_store(request, server_factory)


def test_a_state_imported_into_another_process_continues_exactly_and_replays_its_kept_answer(
    client: httpx.Client, other_process: Server
) -> None:
    values, session = series(30, seed=31), new_id("moved")
    first, second = _fed(client, session, values, [10, 8])
    document, _ = _exported(client, session)
    with httpx.Client(base_url=other_process.url, timeout=30) as there:
        imported = _put(there, session, document)
        assert imported.status_code == 201, imported.text
        assert imported.json()["session_id"] == session and imported.json()["position"] == 18
        assert imported.headers["location"].endswith(f"/v1/sessions/{session}")
        assert imported.headers["etag"] == _exported(there, session)[1]

        retry = send(there, session, values[10:18], offset=10)  # the exact retry of the last chunk
        assert retry.status_code == 200 and retry.content == second.content

        rest = send(there, session, values[18:], offset=18)
        assert rest.status_code == 200 and rest.json()["position"] == 30
    got = first.json()["predictions"] + second.json()["predictions"] + rest.json()["predictions"]
    np.testing.assert_allclose(got, stateless(client, values)["predictions"], atol=1e-5)


def test_an_import_replaces_a_session_and_answers_200(client: httpx.Client) -> None:
    values, session, other = series(20, seed=32), new_id("replaced"), new_id("other")
    _fed(client, session, values, [6])
    document, _ = _exported(client, session)
    _fed(client, session, values, [6, 9])
    _fed(client, other, series(5, seed=33), [5])
    replaced = _put(client, session, document)
    assert replaced.status_code == 200 and replaced.json()["position"] == 6
    under_another_id = _put(client, other, document)  # a copy: the kept answer now names the new id
    assert under_another_id.status_code == 200 and under_another_id.json()["session_id"] == other
    retry = send(client, other, values[:6], offset=0)
    assert retry.json()["session_id"] == other and retry.json()["position"] == 6
    np.testing.assert_allclose(send(client, session, values[6:], offset=6).json()["predictions"],
                               stateless(client, values)["predictions"][6:], atol=1e-5)


def test_the_document_holds_what_the_session_needs_to_go_on(client: httpx.Client, server: Server) -> None:
    session = new_id("doc")
    *_, last = _fed(client, session, series(9, seed=34), [4, 5])
    raw, _ = _exported(client, session)
    document = decode(raw, state_size=load(raw)["state"].size)
    model = client.get("/v1/model").json()
    assert (document.session_id, document.model_name, document.model_version) == (session, model["name"],
                                                                                   model["version"])
    assert (document.position, document.last_offset, document.answer) == (9, 4, last.content)
    assert len(document.fingerprint) == 16 and np.isfinite(document.state).all()
    assert document.updated_at >= document.created_at > 1.7e9


# -- fork --------------------------------------------------------------------------------------------


def test_a_fork_answers_like_its_parent_then_diverges_on_its_own(client: httpx.Client) -> None:
    values, other = series(24, seed=35), series(24, seed=36)
    parent, child = new_id("parent"), new_id("child")
    _, last = _fed(client, parent, values, [8, 4])
    forked = client.post(f"/v1/sessions/{parent}/fork", json={"to": child})
    assert forked.status_code == 201, forked.text
    assert (forked.json()["session_id"], forked.json()["position"]) == (child, 12)
    assert forked.headers["location"].endswith(f"/v1/sessions/{child}")
    assert forked.headers["etag"] == _exported(client, child)[1] != _exported(client, parent)[1]

    retry = send(client, child, values[8:12], offset=8)  # the parent's kept answer, as the child's own
    assert retry.content == last.content.replace(parent.encode(), child.encode())

    same = [send(client, s, values[12:16], offset=12).json() for s in (parent, child)]
    np.testing.assert_allclose(same[0]["predictions"], same[1]["predictions"], atol=1e-6)
    child_rest = send(client, child, other[16:], offset=16).json()
    parent_rest = send(client, parent, values[16:], offset=16).json()
    assert (position(client, parent), position(client, child)) == (24, 24)
    np.testing.assert_allclose(parent_rest["predictions"], stateless(client, values)["predictions"][16:],
                               atol=1e-5)
    branch = np.concatenate([values[:16], other[16:]])
    np.testing.assert_allclose(child_rest["predictions"], stateless(client, branch)["predictions"][16:],
                               atol=1e-5)


def test_a_fork_onto_an_existing_session_is_409_and_changes_neither(client: httpx.Client) -> None:
    parent, taken = new_id("parent"), new_id("taken")
    _fed(client, parent, series(6, seed=37), [6])
    _fed(client, taken, series(3, seed=38), [3])
    before = [_exported(client, s) for s in (parent, taken)]
    assert assert_problem(client.post(f"/v1/sessions/{parent}/fork", json={"to": taken}), 409)["type"].endswith(
        "/session-exists")
    assert_problem(client.post(f"/v1/sessions/{parent}/fork", json={"to": parent}), 409)
    assert [_exported(client, s) for s in (parent, taken)] == before


@pytest.mark.parametrize(("body", "status"), [
    (b'{"to": "a b"}', 422), (b'{"to": "x", "also": 1}', 422), (b"{}", 422), (b"", 400), (b"to=x", 400),
])
def test_a_bad_fork_body_is_refused_and_creates_nothing(client: httpx.Client, body: bytes, status: int) -> None:
    parent = new_id("parent")
    _fed(client, parent, series(3, seed=39), [3])
    assert_problem(client.post(f"/v1/sessions/{parent}/fork", content=body), status)
    assert_problem(_state(client, "x"), 404)


def test_a_fork_of_an_unknown_session_is_404(client: httpx.Client) -> None:
    target = new_id("orphan")
    assert_problem(client.post(f"/v1/sessions/{new_id('nobody')}/fork", json={"to": target}), 404)
    assert_problem(_state(client, target), 404)


# -- damaged documents ---------------------------------------------------------------------------------


def _rebuilt(raw: bytes, tensors: dict[str, np.ndarray] | None = None, **metadata: str) -> bytes:
    """``raw`` with some tensors or metadata replaced."""
    length = int.from_bytes(raw[:8], "little")
    meta = orjson.loads(raw[8 : 8 + length])["__metadata__"]
    return save({**load(raw), **(tensors or {})}, metadata={**meta, **metadata})


def _state_of(raw: bytes) -> np.ndarray:
    return load(raw)["state"]


def _without(raw: bytes, name: str) -> bytes:
    """``raw`` with the metadata ``name`` left out."""
    length = int.from_bytes(raw[:8], "little")
    meta = orjson.loads(raw[8 : 8 + length])["__metadata__"]
    return save(load(raw), metadata={k: v for k, v in meta.items() if k != name})


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda raw: b"",
    "truncated": lambda raw: raw[:-7],
    "only-the-length": lambda raw: raw[:8],
    "not-safetensors": lambda raw: b'{"values": [1, 2, 3]}',
    "huge-header": lambda raw: (2**40).to_bytes(8, "little") + raw[8:],
    "header-not-json": lambda raw: (8).to_bytes(8, "little") + b"{{{{{{{{" + raw[16:],
    "state-too-long": lambda raw: _rebuilt(raw, {"state": np.append(_state_of(raw), np.float32(0))}),
    "state-too-short": lambda raw: _rebuilt(raw, {"state": _state_of(raw)[:-1]}),
    "state-2d": lambda raw: _rebuilt(raw, {"state": _state_of(raw)[None]}),
    "nan-state": lambda raw: _rebuilt(raw, {"state": np.where(np.arange(_state_of(raw).size) == 3, np.nan,
                                                              _state_of(raw)).astype(np.float32)}),
    "infinite-state": lambda raw: _rebuilt(raw, {"state": np.full_like(_state_of(raw), np.inf)}),
    "float64-state": lambda raw: _rebuilt(raw, {"state": _state_of(raw).astype(np.float64)}),
    "float32-answer": lambda raw: _rebuilt(raw, {"answer": np.zeros(4, np.float32)}),
    "missing-state": lambda raw: save({k: v for k, v in load(raw).items() if k != "state"},
                                      metadata={"format": "gru-session-state", "format_version": "1"}),
    "unknown-tensor": lambda raw: _rebuilt(raw, {"adaptation": np.zeros(3, np.float32)}),
    "newer-format-version": lambda raw: _rebuilt(raw, format_version="2"),
    "unknown-format": lambda raw: _rebuilt(raw, format="gru-session-snapshot"),
    "no-metadata": lambda raw: save(load(raw)),
    "position-not-a-number": lambda raw: _rebuilt(raw, position="1e3"),
    "negative-position": lambda raw: _rebuilt(raw, position="-1"),
    "last-offset-past-position": lambda raw: _rebuilt(raw, last_offset="9"),
    "nan-timestamp": lambda raw: _rebuilt(raw, updated_at="nan"),
    "bad-session-id": lambda raw: _rebuilt(raw, session_id="a/b"),
    "no-model-version": lambda raw: _without(raw, "model_version"),
    "empty-model-version": lambda raw: _rebuilt(raw, model_version=""),
    "short-fingerprint": lambda raw: _rebuilt(raw, {"fingerprint": np.zeros(3, np.uint8)}),
    "answer-of-another-session": lambda raw: _rebuilt(raw, session_id="someone-else"),
    "answer-not-json": lambda raw: _rebuilt(raw, {"answer": np.frombuffer(
        bytes(load(raw)["answer"])[:-2], np.uint8)}),
}


@pytest.fixture(scope="module")
def victim(server: Server) -> tuple[str, bytes]:
    """A session of the shared server and its document, which the damage tests must leave as it is."""
    session = new_id("victim")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        _fed(http, session, series(9, seed=40), [5, 4])
        return session, _exported(http, session)[0]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_damaged_import_is_a_422_and_changes_nothing(client: httpx.Client, victim: tuple[str, bytes],
                                                          damage: str) -> None:
    session, document = victim
    before = _exported(client, session)
    damaged = DAMAGES[damage](document)
    assert damaged != document
    problem = assert_problem(_put(client, session, damaged), 422)
    assert problem["type"].endswith("/invalid-state") and "nothing was changed" in problem["detail"]
    assert _exported(client, session) == before
    absent = new_id("absent")
    assert_problem(_put(client, absent, damaged), 422)
    assert_problem(_state(client, absent), 404)


def test_the_damage_cases_start_from_a_document_that_imports(client: httpx.Client, victim: tuple[str, bytes]
                                                             ) -> None:
    imported = _put(client, new_id("whole"), victim[1])
    assert imported.status_code == 201, imported.text


# The calibrated tiny model's state: 2 layers of 16 hidden values, 4 lags of 1 feature, then the `seen` flag,
# the count of values seen (up to K + 1 = 5), the last prediction and 5 log-scales.
HIDDEN, SEEN, COUNT = 32, 36, 37


def _with(raw: bytes, at: int | slice, value: float, **metadata: str) -> bytes:
    """``raw`` with its state's values ``at`` set to ``value``, and some metadata replaced."""
    state = _state_of(raw).copy()
    state[at] = value
    return _rebuilt(raw, {"state": state}, **metadata)


def test_an_imported_state_no_history_reaches_is_a_422_and_changes_nothing(server_factory: ServerFactory,
                                                                           tmp_path: Path) -> None:
    """A finite state can still be one the model never writes: GRU hidden values past ±1 (imported at 1e30,
    the next chunk answered predictions of 5e28 in intervals of width 0), a `seen` flag or a count of values
    seen that the position contradicts, or at position 0 anything but the initial state (the next chunk from
    offset 0 went on from another history's values, as no session at 0 does). Each is damaged: 422, nothing
    changed. States that chunks and a reset write, at 0, below K and past it, still import."""
    calibrated = server_factory(model_path=make_tiny_model(tmp_path / "calibrated", error_scale=1.0))
    with httpx.Client(base_url=calibrated.url, timeout=30) as http:
        session, short, fresh = new_id("source"), new_id("short"), new_id("fresh")
        _fed(http, session, series(9, seed=61), [2, 7])
        raw, tag = _exported(http, session)
        assert (_state_of(raw)[SEEN], _state_of(raw)[COUNT]) == (1, 5)
        none_to_retry = {"position": "3", "last_offset": "-1"}
        at_zero = _with(_with(raw, SEEN, 0), COUNT, 0, position="0", last_offset="-1")
        cases = {
            "hidden past 1": _with(raw, slice(0, HIDDEN), 1e30),
            "one hidden value just past 1": _with(raw, 5, 1.0001),
            "seen 0 at position 9": _with(raw, SEEN, 0),
            "seen 0.5": _with(raw, SEEN, 0.5),
            "count 2.5": _with(raw, COUNT, 2.5),
            "count negative": _with(raw, COUNT, -1e30),
            "count past K + 1": _with(raw, COUNT, 6),
            "count 5 at position 3": _rebuilt(raw, {"fingerprint": np.zeros(0, np.uint8),
                                                    "answer": np.zeros(0, np.uint8)}, **none_to_retry),
            "position 0 with hidden values": _rebuilt(at_zero, {"fingerprint": np.zeros(0, np.uint8),
                                                                "answer": np.zeros(0, np.uint8)}),
        }
        for name, damaged in cases.items():
            problem = assert_problem(_put(http, session, damaged), 422)
            assert problem["type"].endswith("/invalid-state"), name
            assert_problem(_put(http, new_id("absent"), damaged), 422)
        assert _exported(http, session) == (raw, tag)

        _fed(http, short, series(2, seed=62), [2])
        assert http.post(f"/v1/sessions/{fresh}/reset").status_code in (200, 201)
        for reachable in (session, short, fresh):
            copy = _put(http, new_id("copy"), _exported(http, reachable)[0])
            assert copy.status_code == 201, copy.text


def test_an_imported_window_not_filled_with_its_first_value_below_k_steps_is_a_422(client: httpx.Client) -> None:
    """Below K steps the window holds, before the first value seen, that value again: a new series' window is
    filled with it (its first difference is 0), and later chunks only shift it. Imported with another value
    there, such a state was accepted (201), and its next chunk went on from a difference no series has: 422,
    nothing changed. At K steps every value in the window was seen, and any values import."""
    session, full, values = new_id("below-k"), new_id("at-k"), series(4, seed=64)
    _fed(client, session, values, [1, 1])
    raw, tag = _exported(client, session)
    window = _state_of(raw)[HIDDEN:SEEN]  # K = 4 at position 2: the first value three times, then the second
    np.testing.assert_array_equal(window, values[[0, 0, 0, 1], 0])
    for at, value in ((HIDDEN, window[2] + 0.25), (HIDDEN + 1, 0.0), (slice(HIDDEN, HIDDEN + 2), -1.0)):
        damaged = _with(raw, at, value)
        problem = assert_problem(_put(client, session, damaged), 422)
        assert problem["type"].endswith("/invalid-state") and "first value" in problem["detail"], problem
        assert_problem(_put(client, new_id("absent"), damaged), 422)
    assert _exported(client, session) == (raw, tag)

    _fed(client, full, values, [4])
    assert _put(client, new_id("copy"), _with(_exported(client, full)[0], HIDDEN, 9.0)).status_code == 201


def test_a_document_of_another_model_version_is_409_model_changed(
    client: httpx.Client, server_factory: ServerFactory, tmp_path: Path
) -> None:
    session = new_id("stale")
    _fed(client, session, series(4, seed=41), [4])
    other_model = server_factory(model_path=make_tiny_model(tmp_path / "other", seed=1))
    with httpx.Client(base_url=other_model.url, timeout=30) as there:
        problem = assert_problem(_put(there, session, _exported(client, session)[0]), 409)
        assert problem["type"].endswith("/model-changed")
        assert problem["model_version"] == there.get("/v1/model").json()["version"]
        assert_problem(_state(there, session), 404)


def test_a_session_another_model_wrote_in_another_size_is_409_to_export_and_fork_and_can_be_replaced(
    server_factory: ServerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two models sharing one Redis, as in a rolling update: the wider model cannot read the narrower one's
    state, so it exports and forks nothing (409, not 500), and an import replaces the session all the same."""
    shared = {"GRU_STORE": "redis", "GRU_REDIS_URL": redis_server.url}
    narrow = server_factory(**shared)
    wide = server_factory(model_path=random_checkpoint(tmp_path / "wide", hidden=24, layers=2, lags=4, seed=3,
                                                       name="tiny"), **shared)
    session, fresh, branch = new_id("rolling"), new_id("fresh"), new_id("branch")
    with httpx.Client(base_url=narrow.url, timeout=30) as old, httpx.Client(base_url=wide.url, timeout=30) as new:
        _fed(old, session, series(6, seed=51), [6])
        old_tag = _exported(old, session)[1]
        for refused in (_state(new, session), new.post(f"/v1/sessions/{session}/fork", json={"to": branch})):
            problem = assert_problem(refused, 409)
            assert problem["type"].endswith("/model-changed") and problem["position"] == 6
        assert_problem(_state(new, branch), 404)

        _fed(new, fresh, series(4, seed=52), [4])
        document = _exported(new, fresh)[0]
        assert_problem(_put(new, session, document, **{"If-Match": old_tag}), 412)
        assert _exported(old, session)[1] == old_tag
        replaced = _put(new, session, document, **{"If-Match": "*"})
        assert replaced.status_code == 200 and replaced.json()["position"] == 4
        assert replaced.headers["etag"] == _exported(new, session)[1]


def test_a_document_over_the_body_limit_is_413_unread(server_factory: ServerFactory) -> None:
    small = server_factory(GRU_MAX_BODY_BYTES="1024")
    session = new_id("big")
    with httpx.Client(base_url=small.url, timeout=30) as http:
        assert send(http, session, series(5, seed=42), horizon=80).status_code == 200  # a long kept answer
        document, tag = _exported(http, session)
        assert len(document) > 1024
        assert_problem(_put(http, session, document), 413)
        assert _exported(http, session) == (document, tag)


# -- preconditions and entity tags -------------------------------------------------------------------


def test_import_with_a_stale_if_match_is_412_and_changes_nothing(client: httpx.Client) -> None:
    values, session = series(12, seed=43), new_id("cas")
    _fed(client, session, values, [5])
    old, old_tag = _exported(client, session)
    send(client, session, values[5:], offset=5)
    now, tag = _exported(client, session)
    assert tag != old_tag

    problem = assert_problem(_put(client, session, old, **{"If-Match": old_tag}), 412)
    assert problem["type"].endswith("/precondition-failed")
    assert _exported(client, session) == (now, tag)
    assert_problem(_put(client, session, old, **{"If-None-Match": "*"}), 412)
    assert_problem(_put(client, session, old, **{"If-Match": f"W/{tag}"}), 412)  # If-Match compares strongly
    assert_problem(_put(client, session, old, **{"If-Match": "not-a-tag"}), 400)
    assert _exported(client, session) == (now, tag)

    replaced = _put(client, session, old, **{"If-Match": f'"elsewhere", {tag}'})
    assert replaced.status_code == 200 and replaced.json()["position"] == 5
    assert replaced.headers["etag"] == _exported(client, session)[1] not in (tag, old_tag)

    absent = new_id("absent")
    assert_problem(_put(client, absent, old, **{"If-Match": "*"}), 412)
    assert _put(client, absent, old, **{"If-None-Match": "*"}).status_code == 201


def test_a_precondition_over_several_field_lines_or_with_empty_elements_is_one_list(client: httpx.Client) -> None:
    """RFC 9110: field lines of one name are one comma-separated list, whose empty elements are ignored."""
    session = new_id("lines")
    _fed(client, session, series(8, seed=53), [5])
    document, tag = _exported(client, session)

    def put(*fields: tuple[str, str]) -> httpx.Response:
        return client.put(f"/v1/sessions/{session}/state", content=document, headers=[*OCTET.items(), *fields])

    assert_problem(put(("If-None-Match", '"elsewhere"'), ("If-None-Match", tag)), 412)
    assert _exported(client, session) == (document, tag)
    replaced = put(("If-Match", '"elsewhere"'), ("If-Match", tag))
    assert replaced.status_code == 200, replaced.text
    tag = replaced.headers["etag"]
    assert put(("If-Match", f'"elsewhere", , {tag},'),).status_code == 200
    assert_problem(put(("If-Match", '"elsewhere"'), ("If-Match", "not-a-tag")), 400)


def test_an_empty_if_match_lists_no_tag_so_no_session_matches_it(client: httpx.Client) -> None:
    """RFC 9110: If-Match is "*" or a list (#entity-tag) that may be empty; an empty list matches no
    representation, so the import is 412, not a 400. An empty If-None-Match excludes none: no condition."""
    session, absent = new_id("empty"), new_id("absent")
    _fed(client, session, series(8, seed=54), [5])
    document, tag = _exported(client, session)
    for empty in ("", ",", ", ,"):
        for target in (session, absent):
            problem = assert_problem(_put(client, target, document, **{"If-Match": empty}), 412)
            assert problem["type"].endswith("/precondition-failed"), problem
    assert _exported(client, session) == (document, tag)
    assert_problem(_state(client, absent), 404)
    assert _state(client, session, **{"If-None-Match": ""}).content == document
    assert _put(client, absent, document, **{"If-None-Match": ""}).status_code == 201


def test_a_precondition_with_a_long_run_of_blanks_is_refused_at_once(client: httpx.Client) -> None:
    """The tag-list pattern runs on the event loop. Once it allowed an empty list, a blank run after a comma
    could be split between its two optional runs of blanks in as many ways as it is long, so a malformed
    header ("," then 40,000 spaces, then "x": one request of 40 KB) took the pattern ~10 s to refuse, and
    the service answered no one meanwhile. It must be the 400 it is, at once, on every route that reads one."""
    session = new_id("blanks")
    _fed(client, session, series(8, seed=55), [5])
    document, tag = _exported(client, session)
    for hostile in ("," + " " * 40_000 + "x", '"a"' + " ," * 20_000 + "x", '"' + "a" * 40_000):
        for name, header in (("export", "If-None-Match"), ("import", "If-None-Match"), ("import", "If-Match")):
            started = time.monotonic()
            given = {header: hostile}
            assert_problem(_state(client, session, **given) if name == "export"
                           else _put(client, session, document, **given), 400)
            assert time.monotonic() - started < 2, f"{name} {hostile[:6]!r}: {time.monotonic() - started:.1f} s"
    assert _exported(client, session) == (document, tag)
    spaced = _state(client, session, **{"If-None-Match": ",  ,\t" + " " * 30_000 + tag + "\t,,"})  # valid, long
    assert (spaced.status_code, spaced.content) == (304, b"")


def test_the_etag_differs_after_delete_and_recreate_to_the_same_numbers(client: httpx.Client) -> None:
    values, session = series(6, seed=44), new_id("again")
    _fed(client, session, values, [6])
    document, tag = _exported(client, session)
    assert client.delete(f"/v1/sessions/{session}").status_code == 204
    _fed(client, session, values, [6])
    again, new_tag = _exported(client, session)
    assert load(again)["state"].tobytes() == load(document)["state"].tobytes()
    assert new_tag != tag
    assert_problem(_put(client, session, document, **{"If-Match": tag}), 412)


def test_the_etag_is_the_same_while_the_session_is_unchanged(client: httpx.Client) -> None:
    session = new_id("still")
    _fed(client, session, series(4, seed=45), [4])
    assert _exported(client, session) == _exported(client, session)


def test_an_export_with_if_none_match_is_304_while_the_session_is_at_a_listed_tag(client: httpx.Client) -> None:
    """A conditional export (RFC 9110 13.1.2): 304 with the ETag and no document while the session is at a
    listed tag (weak comparison; `*`: at any), the document once it moved; a malformed list is a 400."""
    session = new_id("cond")
    values = series(8, seed=46)
    _fed(client, session, values[:5], [5])
    document, tag = _exported(client, session)
    for unless in (tag, f"W/{tag}", f'"elsewhere", {tag}', "*"):
        same = _state(client, session, **{"If-None-Match": unless})
        assert (same.status_code, same.headers["etag"], same.content) == (304, tag, b""), unless
    assert _state(client, session, **{"If-None-Match": '"elsewhere"'}).content == document
    assert send(client, session, values[5:], offset=5).status_code == 200
    moved = _state(client, session, **{"If-None-Match": tag})
    assert moved.status_code == 200 and moved.headers["etag"] != tag
    assert moved.content != document and moved.headers["content-type"] == "application/octet-stream"
    assert_problem(_state(client, session, **{"If-None-Match": "not-a-tag"}), 400)
    assert_problem(_state(client, new_id("none"), **{"If-None-Match": "*"}), 404)


# -- a conditional delete --------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def each_store(request: pytest.FixtureRequest, server_factory: ServerFactory) -> Server:
    """A service process with the store the test is parametrised by."""
    return _on_store(request, server_factory)


def _delete(http: httpx.Client, path: str, *fields: tuple[str, str]) -> httpx.Response:
    return http.delete(path, headers=list(fields))


def test_a_delete_with_a_stale_if_match_is_412_and_keeps_the_session(each_store: Server) -> None:
    """RFC 9110 13.1.1: If-Match is evaluated before the DELETE. A client that exported a session, then deletes
    it with that ETag after another client's chunk moved it on, deleted it anyway (204): now 412, and the
    session stays where the chunk left it. The same on the per-model route."""
    values = series(11, seed=56)
    with httpx.Client(base_url=each_store.url, timeout=30) as http:
        model = http.get("/v1/model").json()["name"]
        for path in ("/v1/sessions/{}", f"/v1/models/{model}/sessions/{{}}"):
            session = new_id("stale-del")
            _fed(http, session, values, [8])
            _, tag = _exported(http, session)
            assert send(http, session, values[8:], offset=8).status_code == 200
            now = _exported(http, session)

            problem = assert_problem(_delete(http, path.format(session), ("If-Match", tag)), 412)
            assert problem["type"].endswith("/precondition-failed") and "nothing was changed" in problem["detail"]
            assert now[1] in problem["detail"] and problem["session_id"] == session
            assert_problem(_delete(http, path.format(session), ("If-Match", f"W/{now[1]}")), 412)  # strongly
            assert position(http, session) == 11 and _exported(http, session) == now

            assert _delete(http, path.format(session), ("If-Match", now[1])).status_code == 204
            assert_problem(http.get(f"/v1/sessions/{session}"), 404)


def test_a_delete_with_a_listed_tag_or_star_deletes_and_any_if_match_of_an_absent_session_is_412(
    client: httpx.Client,
) -> None:
    """If-Match on a DELETE reads as on an import: one list over several field lines, empty elements ignored,
    `*` for any existing session; a session that does not exist matches none of it (412, not 404)."""
    listed, starred, absent = new_id("listed"), new_id("starred"), new_id("absent")
    for session in (listed, starred):
        _fed(client, session, series(5, seed=57), [5])
    _, tag = _exported(client, listed)
    path = "/v1/sessions/{}".format
    assert _delete(client, path(listed), ("If-Match", '"elsewhere", ,'), ("If-Match", tag)).status_code == 204
    assert_problem(_state(client, listed), 404)
    assert _delete(client, path(starred), ("If-Match", "*")).status_code == 204
    assert_problem(_state(client, starred), 404)
    for condition in ("*", tag, "", ","):
        problem = assert_problem(_delete(client, path(absent), ("If-Match", condition)), 412)
        assert "absent" in problem["detail"], problem
    assert_problem(_delete(client, path(absent), ("If-Match", '"elsewhere"'), ("If-Match", tag)), 412)
    assert_problem(_delete(client, path(listed)), 404)  # without one, as before


def test_a_delete_with_a_malformed_if_match_or_if_none_match_is_400_and_keeps_the_session(
    client: httpx.Client,
) -> None:
    session = new_id("malformed-del")
    _fed(client, session, series(5, seed=58), [5])
    before = _exported(client, session)
    for header in ("If-Match", "If-None-Match"):
        for malformed in ("not-a-tag", '"a" "b"', '*, "a"', "," + " " * 40_000 + "x"):
            problem = assert_problem(_delete(client, f"/v1/sessions/{session}", (header, malformed)), 400)
            assert problem["type"].endswith("/invalid-precondition") and header in problem["detail"]
    assert _exported(client, session) == before


def test_a_delete_with_if_none_match_is_412_while_the_session_is_at_a_listed_tag(each_store: Server) -> None:
    """RFC 9110 13.1.2: for a DELETE, If-None-Match is false (412, nothing changed) while the session exists
    and it lists `*` or the session's tag (compared weakly); DELETE ignored it and deleted the session (204).
    It is evaluated after If-Match (13.2.2). A tag the session has left holds; with no session a delete has
    nothing to delete (404), unless an If-Match fails first (412). The same on the per-model route."""
    values = series(11, seed=63)
    with httpx.Client(base_url=each_store.url, timeout=30) as http:
        model = http.get("/v1/model").json()["name"]
        for path in ("/v1/sessions/{}", f"/v1/models/{model}/sessions/{{}}"):
            session = new_id("unless-del")
            url = path.format(session)
            _fed(http, session, values, [8])
            _, left = _exported(http, session)
            assert send(http, session, values[8:], offset=8).status_code == 200
            now = _exported(http, session)

            for condition in ("*", now[1], f"W/{now[1]}", f'"elsewhere", {left}, {now[1]}'):
                problem = assert_problem(_delete(http, url, ("If-None-Match", condition)), 412)
                assert problem["type"].endswith("/precondition-failed") and problem["session_id"] == session
                assert now[1] in problem["detail"] and "If-None-Match" in problem["detail"], problem
            assert_problem(_delete(http, url, ("If-Match", now[1]), ("If-None-Match", now[1])), 412)
            assert position(http, session) == 11 and _exported(http, session) == now

            assert _delete(http, url, ("If-Match", now[1]), ("If-None-Match", left)).status_code == 204
            assert_problem(http.get(f"/v1/sessions/{session}"), 404)
            assert_problem(_delete(http, url, ("If-None-Match", "*")), 404)
            problem = assert_problem(_delete(http, url, ("If-Match", "*"), ("If-None-Match", "*")), 412)
            assert "absent" in problem["detail"]


def test_a_delete_without_if_match_answers_as_before(client: httpx.Client) -> None:
    session = new_id("plain-del")
    _fed(client, session, series(5, seed=59), [5])
    assert client.delete(f"/v1/sessions/{session}").status_code == 204
    assert_problem(client.delete(f"/v1/sessions/{session}"), 404)
    assert_problem(client.delete(f"/v1/sessions/{new_id('never')}", headers={"If-None-Match": "*"}), 404)


@pytest.fixture(params=["memory", "redis"])
def in_process(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    """A registry in this process (not started) with model ``m``, on the store the test is parametrised by."""
    if request.param == "memory":
        return _in_process_registry(tmp_path)
    redis: RedisServer = request.getfixturevalue("redis_server")
    return _in_process_registry(tmp_path, store="redis", redis_url=redis.url)


def test_a_conditional_delete_racing_a_chunk_never_deletes_another_revision(in_process: Registry) -> None:
    """The tag is compared on a read and the delete is a second step, which a chunk can come between (another
    replica's, on Redis). The delete happens only at the revision compared; else the precondition is judged
    again against the session as it is now: a tag it left is a 412 and the session stays at the chunk's
    position; `*`, which holds while the session exists, deletes the session the chunk left; an If-None-Match
    of the tag the chunk moves it to, which held at the read, is a 412 and the session stays."""
    registry, chunks = in_process, series(8, seed=60).reshape(2, 4, 1)

    async def racing(model: ServedModel, key: str, condition: Callable[[str, list[str]], Precondition]) -> Any:
        """A conditional delete of ``key`` that a chunk overtakes: what it left. ``condition`` is built from the
        tag compared and the list the chunk adds its tag to."""
        states, store = SessionStates(model), model.store
        delete, tags = store.delete, []
        await model.engine.predict(key, chunks[0], 0, 0)
        compared = (await states.export(key)).tag()

        async def a_chunk_first(key: str, revision: Any = None) -> bool:
            if not tags:  # the tag was compared; a chunk commits before the delete reaches the store
                await model.engine.predict(key, chunks[1], 4, 0)
                tags.append((await states.export(key)).tag())
            return await delete(key, revision)

        store.delete = a_chunk_first  # type: ignore[method-assign]
        try:
            await states.delete(key, condition(compared, tags))
        except PreconditionFailedRefusal as refused:
            assert tags[0] in refused.detail and "nothing was changed" in refused.detail
            return "412", (await store.get(key)).position  # type: ignore[union-attr]
        finally:
            store.delete = delete  # type: ignore[method-assign]
        return "deleted", await store.get(key)

    async def scenario() -> list[Any]:
        await registry.start()
        try:
            model = registry.models["m"]
            return [await racing(model, "t/stale", lambda compared, _: Precondition(if_match=[compared])),
                    await racing(model, "t/star", lambda *_: Precondition(if_match=["*"])),
                    await racing(model, "t/unless", lambda _, moved: Precondition(if_none_match=moved))]
        finally:
            await registry.stop()

    assert asyncio.run(scenario()) == [("412", 8), ("deleted", None), ("412", 8)]


def test_a_conditional_delete_of_a_session_that_never_stops_moving_is_refused_429(in_process: Registry) -> None:
    """Bounded as an import is: a session that changed before each of MAX_ATTEMPTS deletes is left as it is."""
    registry, chunks = in_process, series(40, seed=61).reshape(10, 4, 1)

    async def scenario() -> Any:
        await registry.start()
        model = registry.models["m"]
        store, fed = model.store, [1]
        delete = store.delete
        await model.engine.predict("t/busy", chunks[0], 0, 0)

        async def a_chunk_first(key: str, revision: Any = None) -> bool:
            await model.engine.predict(key, chunks[fed[0]], 4 * fed[0], 0)
            fed[0] += 1
            return await delete(key, revision)

        store.delete = a_chunk_first  # type: ignore[method-assign]
        try:
            with pytest.raises(Overloaded):
                await SessionStates(model).delete("t/busy", Precondition(if_match=["*"]))
            return fed[0], (await store.get("t/busy")).position  # type: ignore[union-attr]
        finally:
            store.delete = delete  # type: ignore[method-assign]
            await registry.stop()

    assert asyncio.run(scenario()) == (1 + MAX_ATTEMPTS, 4 * (1 + MAX_ATTEMPTS))


# -- reads are no use ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def short_lived(request: pytest.FixtureRequest, server_factory: ServerFactory) -> Server:
    """A service process whose sessions expire after 1 s idle, with the store the test is parametrised by."""
    return _on_store(request, server_factory, GRU_SESSION_TTL_SECONDS="1")


LIVE = [200, 304, 201, 412]  # what _read_without_a_chunk's reads answer while the session lives


def _read_without_a_chunk(http: httpx.Client, session: str, document: bytes, tag: str) -> list[int]:
    """The statuses of every way the state API reads a session without writing it: an export, a conditional
    one (304), a fork's read of its parent (into a new session), an import its precondition refuses (412)."""
    return [response.status_code for response in (
        _state(http, session), _state(http, session, **{"If-None-Match": tag}),
        http.post(f"/v1/sessions/{session}/fork", json={"to": new_id("fork")}),
        _put(http, session, document, **{"If-Match": '"elsewhere"'}),
    )]


def test_a_session_polled_by_exports_forks_and_refused_imports_still_expires(short_lived: Server) -> None:
    """Idle means no chunk reached it (README): a backup job polling exports must not keep a session alive."""
    session = new_id("polled")
    with httpx.Client(base_url=short_lived.url, timeout=30) as http:
        _fed(http, session, series(4, seed=47), [4])
        document, tag = _exported(http, session)
        deadline = time.monotonic() + 2.5  # 2.5 TTLs, read every ~0.2 s
        while time.monotonic() < deadline:
            statuses = _read_without_a_chunk(http, session, document, tag)
            assert all(status in (live, 404) for status, live in zip(statuses, LIVE, strict=True)), statuses
            time.sleep(0.2)
        assert_problem(http.get(f"/v1/sessions/{session}"), 404)
        assert_problem(_state(http, session), 404)


def test_an_exported_or_forked_session_is_still_the_least_recently_used(server_factory: ServerFactory) -> None:
    """In the memory store a read of the state API leaves the eviction order as the chunks made it."""
    server = server_factory(GRU_MAX_SESSIONS="3")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name in ("old", "new"):
            _fed(http, name, series(2, seed=48), [2])
        document, tag = _exported(http, "old")
        assert _read_without_a_chunk(http, "old", document, tag) == LIVE  # its fork fills the store
        _fed(http, "newest", series(2, seed=49), [2])  # evicts the least recently used
        assert_problem(http.get("/v1/sessions/old"), 404)
        assert position(http, "new") == 2


# -- tenants -------------------------------------------------------------------------------------------


def test_tenants_cannot_export_overwrite_or_fork_each_others_sessions(server_factory: ServerFactory) -> None:
    keyed = server_factory(GRU_API_KEYS=f"{ALICE}:alice,{BOB}:bob")
    alice, bob = {"X-API-Key": ALICE}, {"X-API-Key": BOB}
    chunk = {"values": series(5, seed=46).tolist()}
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        assert_problem(_state(http, "pump-7"), 401)
        assert_problem(_put(http, "pump-7", b"\0" * 8), 401)
        assert_problem(http.post("/v1/sessions/pump-7/fork", json={"to": "mine"}), 401)
        assert http.post("/v1/sessions/pump-7/predict", json=chunk, headers=alice).status_code == 200
        exported = _state(http, "pump-7", **alice)
        document, tag = exported.content, exported.headers["etag"]

        assert_problem(_state(http, "pump-7", **bob), 404)
        assert_problem(http.post("/v1/sessions/pump-7/fork", json={"to": "mine"}, headers=bob), 404)
        assert_problem(_put(http, "pump-7", document, **bob, **{"If-Match": tag}), 412)  # bob has no pump-7
        assert _put(http, "pump-7", document, **bob).status_code == 201  # bob's own pump-7, a copy
        assert http.post("/v1/sessions/pump-7/predict", json=chunk, headers=bob).json()["position"] == 10

        mine = _state(http, "pump-7", **alice)
        assert (mine.content, mine.headers["etag"]) == (document, tag)
        assert http.post("/v1/sessions/pump-7/fork", json={"to": "branch"}, headers=alice).status_code == 201
        assert_problem(_state(http, "branch", **bob), 404)
        assert http.get("/v1/sessions/pump-7", headers=alice).json()["position"] == 5


# -- OpenAPI, client, command line ---------------------------------------------------------------------


def test_openapi_describes_the_binary_bodies(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    binary = {"schema": {"type": "string", "format": "binary"}}
    state = paths["/v1/sessions/{session_id}/state"]
    assert state["get"]["responses"]["200"]["content"] == {"application/octet-stream": binary}
    assert "ETag" in state["get"]["responses"]["200"]["headers"]
    assert {"404", "409", "422", "503"} <= set(state["get"]["responses"])  # 409: another model's state
    assert state["put"]["requestBody"]["content"] == {"application/octet-stream": binary}
    assert {p["name"] for p in state["put"]["parameters"]} >= {"session_id", "if-match", "if-none-match"}
    assert {"201", "409", "412", "413", "422"} <= set(state["put"]["responses"])
    fork = paths["/v1/sessions/{session_id}/fork"]["post"]
    assert fork["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ForkRequest"}


def test_openapi_documents_if_match_if_none_match_and_412_on_a_delete(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/sessions/{session_id}", "/v1/models/{model}/sessions/{session_id}"):
        delete = paths[path]["delete"]
        headers = {p["name"] for p in delete["parameters"] if p["in"] == "header"}
        assert {"if-match", "if-none-match"} <= headers, path
        assert {"204", "400", "404", "412", "429"} <= set(delete["responses"]), path


def test_client_exports_imports_and_forks(server: Server, client: httpx.Client) -> None:
    values = series(20, seed=48)
    with Client(server.url) as api:
        session = api.session(new_id("api"))
        list(session.stream(values[:8], chunk=4))
        state = session.export_state()
        assert state.etag == _exported(client, session.id)[1]
        copy = api.session(new_id("api-copy"))
        assert copy.import_state(state)["position"] == 8 and copy.position == 8
        with pytest.raises(PreconditionFailed):
            copy.import_state(state, if_match=state.etag)  # the copy's tag is its own
        branch = session.fork(new_id("api-branch"))
        assert branch.position == 8
        with pytest.raises(SessionExists):
            session.fork(copy.id)
        answers = [s.predict(values[8:]).predictions for s in (copy, branch)]
        assert session.export_state(unless=state) is state  # unchanged: a 304, the copy in hand stays current
        moved = copy.export_state(unless=copy.export_state())
        assert copy.export_state(unless=state) is not state and moved.document != state.document
    expected = stateless(client, values)["predictions"][8:]
    for got in answers:
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_async_client_exports_imports_and_forks(server: Server, client: httpx.Client) -> None:
    values = series(10, seed=49)

    async def scenario() -> list[Any]:
        async with AsyncClient(server.url) as api:
            session = await api.session(new_id("async"))
            await session.predict(values[:6])
            copy = await api.session(new_id("async-copy"))
            state = await session.export_state()
            await copy.import_state(state)
            assert await session.export_state(unless=state) is state
            branch = await session.fork(new_id("async-branch"))
            return [(await s.predict(values[6:])).predictions for s in (copy, branch)]

    for got in asyncio.run(scenario()):
        np.testing.assert_allclose(got, stateless(client, values)["predictions"][6:], atol=1e-5)


def test_cli_exports_imports_and_forks(server: Server, client: httpx.Client, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    session, copy, branch = new_id("cli"), new_id("cli-copy"), new_id("cli-branch")
    _fed(client, session, series(7, seed=50), [7])
    out = tmp_path / "saved.state"
    url = ["--url", server.url]
    assert main(["export", *url, "--session", session, "--out", str(out)]) == 0
    assert out.read_bytes() == _exported(client, session)[0]
    assert _exported(client, session)[1] in capsys.readouterr().err
    assert main(["import", *url, "--session", copy, "--file", str(out)]) == 0
    assert position(client, copy) == 7
    assert main(["import", *url, "--session", copy, "--file", str(out), "--if-match", '"stale"']) == 1
    assert "412" in capsys.readouterr().err
    assert main(["fork", *url, "--session", session, "--to", branch]) == 0
    assert position(client, branch) == 7
    assert main(["fork", *url, "--session", session, "--to", branch]) == 1
    assert f"session {branch!r} exists" in capsys.readouterr().err


def test_document_round_trip_and_tag() -> None:
    document = StateDocument("s", "tiny", "v1", 3, 0, b"f" * 16, b'{"session_id":"s","position":3}', 1.0, 2.0,
                             np.arange(5, dtype=np.float32))
    again = decode(encode(document), 5)
    assert again.tag() == document.tag() and again.answer == document.answer
    renamed = again.renamed("t")
    assert renamed.answer == b'{"session_id":"t","position":3}' and renamed.tag() != document.tag()


def test_an_if_match_star_import_racing_chunks_is_never_412(server_factory: ServerFactory,
                                                             redis_server: RedisServer) -> None:
    """``If-Match: *`` holds while the session exists, which chunks do not change: an import that loses its
    compare-and-set to a chunk reads the session again and retries, as one without a precondition does (a
    412 said the precondition failed, and it had not). On Redis, where the import's read and write are two
    round trips a chunk can come between."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    values, session = series(400, seed=47), new_id("race")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        _fed(http, session, values, [1])
        document, _ = _exported(http, session)
        stop = asyncio.Event()

        async def feed() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as feeder:
                while not stop.is_set():
                    await feeder.post(f"/v1/sessions/{session}/predict", json={"values": [[0.5]]})

        async def imports() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as importer:
                statuses = []
                for _ in range(40):
                    answer = await importer.put(f"/v1/sessions/{session}/state", content=document,
                                                headers={**OCTET, "If-Match": "*"})
                    statuses.append(answer.status_code)
                stop.set()
                return statuses

        async def race() -> list[int]:
            feeders = [asyncio.create_task(feed()) for _ in range(4)]
            statuses = await imports()
            await asyncio.gather(*feeders)
            return statuses

        statuses = asyncio.run(race())
    assert 412 not in statuses and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 30, statuses
