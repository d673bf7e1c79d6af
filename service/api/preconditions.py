"""The precondition headers of the routes that honour them (``If-Match``, ``If-None-Match``): their lists of
entity tags, as ``service.session_state.Precondition`` compares them (README, "Session state")."""

from __future__ import annotations

import re

from service.problems import Problem

# A list of entity tags (RFC 9110 section 8.8.3), each maybe weak, empty elements ignored (section 5.6.1.2),
# maybe none at all (the #list rule): an empty If-Match matches no session (412), not a malformed one (400);
# or "*". Each run of blanks and commas has one place in the pattern (what may follow it tells them apart):
# with two optional runs able to share one, a malformed header took time quadratic in its length to refuse,
# on the event loop (",", 40,000 spaces and "x": ~10 s).
_TAG_LIST = re.compile(r'\s*\*\s*|[\s,]*(?:(?:W/)?"[^"]*"(?:\s*,[\s,]*(?:W/)?"[^"]*")*[\s,]*)?')
_TAG = re.compile(r'(W/)?("[^"]*")')


def entity_tags(lines: list[str] | None, header: str, *, weak: bool) -> list[str] | None:
    """The entity tags of a precondition header (None: absent), over all its field lines, which are one
    comma-separated list (RFC 9110 section 5.3); ``weak``: W/ tags compare too (If-None-Match), else they
    never match (If-Match compares strongly). A malformed list is a 400 ``invalid-precondition``."""
    if not lines:
        return None
    value = ", ".join(lines)
    if not _TAG_LIST.fullmatch(value):
        raise Problem(400, "invalid-precondition", f"{header} is not '*' or a list of quoted entity tags")
    if value.strip() == "*":
        return ["*"]
    return [tag for prefix, tag in _TAG.findall(value) if weak or not prefix]


def header_parameter(name: str, description: str) -> dict[str, object]:
    """The OpenAPI entry of a precondition header, described as what it is on the wire: a string (a field
    line; several are one list). As FastAPI's array of every field line, the schema fuzzer sent an invalid
    array as an empty header, which is a valid empty list, and counted the answer to it a failure. The route
    reads every field line as ``Header(include_in_schema=False)``."""
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"},
            "description": description}
