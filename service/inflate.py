"""Inflating a gzip or deflate body no further than a limit: the service's requests and the client's answers
alike (this module imports nothing heavy: the client needs only httpx)."""

from __future__ import annotations

import zlib

CONTENT_CODINGS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}  # zlib's wbits for each
MAX_GZIP_MEMBERS = 64  # gzip data may be members end to end (RFC 1952); a body of many tiny ones is refused


class TooLarge(ValueError):
    """The body inflates past the limit."""


class Malformed(ValueError):
    """The body is not valid data of its coding."""


def inflate(raw: bytes, coding: bytes, limit: int) -> bytes:
    """The body under ``Content-Encoding: coding`` (one of ``CONTENT_CODINGS``), inflated to ``limit`` bytes at
    most: a bomb is refused (``TooLarge``) after ``limit + 1`` bytes, never inflated whole. Gzip data is every
    member of it; anything after the data (after a deflate stream, or not a gzip member) is ``Malformed``,
    never ignored."""
    wbits, parts, size, rest = CONTENT_CODINGS[coding], [], 0, raw
    for _ in range(MAX_GZIP_MEMBERS if wbits == 31 else 1):
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise Malformed(str(exc)) from None
        parts.append(part)
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise TooLarge(f"it inflates past {limit} bytes")
        if not inflater.eof:
            raise Malformed("truncated")
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
    raise Malformed(f"data after its end, or more than {MAX_GZIP_MEMBERS} gzip members")
