"""Keys given twice in one JSON object, found cheaply: a screen on the raw text, and a parse that names one.

A parser that keeps one value of each key (orjson, pydantic-core) leaves a repeat no trace but its text: each
key and each string is two delimiting quotes, so a text with more delimiters than the parsed document written
out again named some key twice. The count leaves escaped quotes out (a quote inside a string): counting them
sent an accepted 4 MB v2 request full of them to the parse below, 1.6 s of the event loop. Only a text that
fails the screen is parsed again, by Python's parser with a hook per object, to name the key; callers bound
the size they name it for.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import orjson

# The backslashes before a quote: an odd run escapes it (a quote inside a string), an even one does not.
_BEFORE_QUOTE = re.compile(rb'\\+(?=")')


def delimiters(text: bytes) -> int:
    """The quotes that open or close a string in the JSON ``text``: two a string, keys included."""
    quotes = text.count(b'"')
    if b"\\" not in text:  # the usual case: no escape at all
        return quotes
    return quotes - sum(len(run) % 2 for run in _BEFORE_QUOTE.findall(text))


def written_delimiters(document: Any) -> int:
    """The string delimiters of ``document`` written as JSON: orjson's own, which writes 254 levels of nesting
    at most; a deeper one (orjson reads 1,024) has its strings counted one by one, without recursion."""
    try:
        return delimiters(orjson.dumps(document))
    except orjson.JSONEncodeError:
        pass
    count, pending = 0, [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            count += len(item)
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        else:
            count += isinstance(item, str)
    return 2 * count


def may_repeat(text: bytes, document: Any) -> bool:
    """Whether the JSON ``text`` may name a key twice in one object, ``document`` being what a parse that
    keeps one of each made of it (or less: a part left out only sends the text to the exact check)."""
    return delimiters(text) > written_delimiters(document)


class _RepeatedKey(Exception):
    """A JSON object names ``args[0]`` more than once."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    (key, count), = Counter(key for key, _ in pairs).most_common(1) or [("", 1)]
    if count > 1:
        raise _RepeatedKey(key)
    return dict(pairs)


def repeated_key(text: bytes) -> str | None:
    """A key the JSON ``text`` names twice in one object, or None. Python's parser, with a hook per object:
    slow (about 0.4 µs a byte of small objects), so only for a text the screen sent here. RecursionError
    where the text nests deeper than Python's parser goes (orjson reads 1,024 levels)."""
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKey as repeated:
        return str(repeated.args[0])
    return None
