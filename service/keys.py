"""API keys and their tenants, read from GRU_API_KEYS and GRU_API_KEYS_FILE: plain parsing, no HTTP (the
settings validate with it at start-up; ``service.auth`` checks requests against what it returns). Errors
name the entry's position, never the key."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# Tenants become part of every session key ("tenant/session"): no "/" and nothing a store could misread.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Visible ASCII: what survives an HTTP header unmangled (no spaces, no control characters).
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,512}$")


def _pairs_from_env(text: str, variable: str) -> Iterable[tuple[str, str, str]]:
    """(key, tenant, where) from ``key:tenant,key:tenant``; tenants cannot hold ":", keys may."""
    for number, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue  # a trailing comma
        key, colon, tenant = entry.rpartition(":")
        where = f"{variable} entry {number}"
        if not colon or not key:
            raise ValueError(f"{where} is not KEY:TENANT; list keys as key:tenant,key:tenant")
        yield key.strip(), tenant.strip(), where


def _pairs_from_file(path: Path) -> Iterable[tuple[str, str, str]]:
    """(key, tenant, where) from a file of ``KEY TENANT`` lines; blank lines and ``#`` comments skipped. A
    leading byte order mark (Windows editors write one) is not part of the first line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"GRU_API_KEYS_FILE={path} cannot be read ({type(exc).__name__}); point it at a"
                         " readable UTF-8 file of 'KEY TENANT' lines") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"GRU_API_KEYS_FILE line {number}"
        if len(parts) != 2:
            raise ValueError(f"{where} has {len(parts)} fields; write one 'KEY TENANT' pair a line")
        yield parts[0], parts[1], where


def load_api_keys(keys: str, keys_file: Path | None, variable: str = "GRU_API_KEYS") -> dict[str, str]:
    """Tenant by key from both sources; ValueError on anything malformed (naming where, never the key).
    ``variable`` names the source of ``keys`` in errors (GRU_ADMIN_KEYS has the same format)."""
    tenants: dict[str, str] = {}
    from_env = list(_pairs_from_env(keys, variable))
    from_file = list(_pairs_from_file(keys_file)) if keys_file is not None else []
    # Set, yet naming no key (separators only; a file of comments): without keys nothing is checked, so this
    # would open every route. Only an empty variable (or no file) means "no keys".
    if keys.strip() and not from_env:
        raise ValueError(f"{variable} lists no key; list keys as key:tenant,key:tenant, or leave it empty")
    if keys_file is not None and not from_file:
        raise ValueError(f"GRU_API_KEYS_FILE={keys_file} holds no key; write one 'KEY TENANT' pair a line,"
                         " or unset GRU_API_KEYS_FILE")
    pairs = [*from_env, *from_file]
    for key, tenant, where in pairs:
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"{where}: the key must be 1-512 visible ASCII characters (no spaces or commas)")
        if not TENANT_PATTERN.fullmatch(tenant):
            raise ValueError(f"{where}: the tenant must match {TENANT_PATTERN.pattern}")
        if tenants.setdefault(key, tenant) != tenant:
            raise ValueError(f"{where}: this key is already given to another tenant; a key names one tenant")
    return tenants
