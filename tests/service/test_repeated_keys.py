"""The repeat screen: its decisions against Python's parser with a hook per object."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.repeated_keys import may_repeat, repeated_key

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
