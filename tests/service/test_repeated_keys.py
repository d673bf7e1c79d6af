"""The repeat screen v1 and v2 share: its decisions against Python's parser with a hook per object, and the
exact key pass it spares a valid v1 body or batch (counted, not timed)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api import bodies
from service.api.repeated_keys import may_repeat, repeated_key
from service.problems import Problem
from service.schemas import BatchEnvelope, BatchItem, ChunkRequest

# Keys and strings full of what the count must not be fooled by: escaped quotes, runs of backslashes, unicode
# escapes (a key written two ways is one key), a few names so that repeats are common.
_TEXT = st.sampled_from(['a', 'b', '\\"', '\\\\', '\\\\\\"', '\\u0061', 'é', '\\n', '"', '\\'])
_KEY = st.lists(_TEXT, max_size=3).map("".join).filter(lambda key: _decodes(key))


def _decodes(text: str) -> bool:
    try:
        json.loads(f'"{text}"')
    except json.JSONDecodeError:
        return False
    return True


def _json(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(_KEY, children), max_size=4)
    return st.one_of(
        st.lists(children, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        pairs.map(lambda kv: "{" + ", ".join(f'"{k}": {v}' for k, v in kv) + "}"),
    )


_LEAF = st.one_of(st.just("1"), st.just("null"), _KEY.map(lambda text: f'"{text}"'))
_DOCUMENT = st.recursive(_LEAF, _json, max_leaves=12)


def _reference(text: bytes) -> bool:
    """Whether some object of ``text`` names a key twice: every object's pairs, as Python's parser sees them."""
    found = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        found.append(any(count > 1 for count in Counter(key for key, _ in items).values()))
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return any(found)


@settings(max_examples=3000, deadline=None)
@given(_DOCUMENT)
def test_the_screen_and_the_naming_parse_decide_as_a_hook_on_every_object(document: str) -> None:
    """A text the screen passes repeats no key; one it doubts is named exactly when it repeats one."""
    text = document.encode()
    repeats = _reference(text)
    doubted = may_repeat(text, orjson.loads(text))
    assert (doubted and repeated_key(text) is not None) == repeats, text


class _Counted:
    """A callable or validator of the key pass, run as it is, its calls counted."""

    def __init__(self, real: Any):
        self.real, self.calls = real, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.real(*args)

    def validate_json(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real.validate_json(*args, **kwargs)


def _large_chunk(extra: bytes = b"") -> bytes:
    return b'{"values": [' + b", ".join([b"0.5"] * 4096) + b'], "offset": 4, "horizon": 2' + extra + b"}"


def _batch(extra: bytes = b"") -> tuple[bytes, BatchEnvelope]:
    items = b", ".join(b'{"session_id": "s-%d", "values": [0.5, 0.25], "offset": 0%s}' % (i, extra)
                       for i in range(200))
    raw = b'{"items": [' + items + b"]}"
    return raw, bodies.parse(raw, BatchEnvelope)


def test_a_valid_large_chunk_or_batch_is_not_parsed_again_for_its_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact key pass (a parse with a call per key) is spared a valid body of any size, and a valid batch's
    items; a repeat in either still takes it, and is named."""
    (batch, envelope), (repeating, its_envelope) = _batch(), _batch(b', "offset": 1')  # the envelope's own pass
    first, items = _Counted(bodies._first_wrong_key), _Counted(bodies._ITEM_KEYS)
    monkeypatch.setattr(bodies, "_first_wrong_key", first)
    monkeypatch.setattr(bodies, "_ITEM_KEYS", items)
    assert bodies.parse(_large_chunk(), ChunkRequest).offset == 4
    assert bodies.wrong_item_keys(batch, envelope.items, BatchItem) == {}
    assert (first.calls, items.calls) == (0, 0)
    with pytest.raises(Problem) as refused:
        bodies.parse(_large_chunk(b', "offset": 0'), ChunkRequest)
    assert refused.value.extra["errors"] == [
        {"loc": ["body", "offset"], "msg": "the field is given more than once", "type": "duplicate_key"}]
    assert bodies.wrong_item_keys(repeating, its_envelope.items, BatchItem) == dict.fromkeys(
        range(200), ("offset", "duplicate_key"))
    assert (first.calls, items.calls) == (1, 1)
