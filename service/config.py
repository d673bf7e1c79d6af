"""Settings: every knob is a ``GRU_`` environment variable, validated once at start-up."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.keys import load_api_keys

REDIS_SCHEMES = ("redis", "rediss", "unix")
# GRU_ variables that are not the service's settings, allowed beside them: python -m service.client's.
CLIENT_KEY = "GRU_API_KEY"
CLIENT_VARIABLES = ("GRU_URL", CLIENT_KEY)
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "model" / "weights" / "default"


def intra_op_threads(torch_threads: int) -> int:
    """GRU_TORCH_THREADS, else one per core but one: the event loop needs a core of its own; torch's default
    (every core) made the two fight, worst with a neighbour such as redis-server on the same cores
    (docs/bench.md, "Bottlenecks seen")."""
    return torch_threads or max(1, (os.cpu_count() or 2) - 1)


class Settings(BaseSettings):
    """The service's configuration; a bad value stops start-up with a message naming the variable."""

    # hide_input_in_errors: a start-up error must not print GRU_API_KEYS or a password in GRU_REDIS_URL
    # (pydantic otherwise echoes every input of a model-level error).
    model_config = SettingsConfigDict(env_prefix="GRU_", env_file=None, extra="ignore", frozen=True,
                                      hide_input_in_errors=True)

    port: int = Field(8000, ge=1, le=65535,
                      description="where python -m service listens (--port wins) and the image's healthcheck asks")
    model_path: Path = Field(DEFAULT_MODEL_PATH, description="checkpoint directory (config.json + model.safetensors)")
    model_repository: Path | None = Field(
        None, description="model repository DIR/<model>/<version>/; when set, GRU_MODEL_PATH is not used"
    )
    default_model: str = Field("", pattern=r"^([A-Za-z0-9._-]{1,64})?$",
                               description="the model behind the routes without /models/{model}")
    repository_poll_seconds: float = Field(5.0, ge=0, description="look for new versions this often; 0 = off")
    max_loaded_versions: int = Field(3, ge=1, description="loaded versions per model; beyond, the oldest goes")
    upgrade: Literal["pin", "replay"] = Field(
        "pin", description="pin: a session stays on its version; replay: moves to the newest on its next chunk"
    )
    admin_keys: str = Field("", repr=False, description="key:tenant pairs allowed the repository API")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    store: Literal["memory", "redis"] = Field("memory", description="where session states live")
    redis_url: str = Field("redis://localhost:6379/0", description="used when store=redis")
    snapshot_path: Path | None = Field(None, description="memory store: snapshot file written on SIGTERM")
    snapshot_interval_seconds: float = Field(0.0, ge=0, description="also snapshot this often; 0 = only on exit")
    # at most about 31 years: an expiry must stay a date (year <= 9999) and a Redis PEXPIRE an integer (inf: not)
    session_ttl_seconds: float = Field(3600.0, gt=0, le=1e9, description="idle sessions expire after this")
    max_sessions: int = Field(100_000, ge=1, description="memory store capacity; least recently used goes first")
    max_answer_bytes: int = Field(
        256 * 2**20, ge=65_536,
        description="memory store: bytes of the answers kept for exact retries; least recently used sessions go beyond",
    )
    tenant_max_sessions: int | None = Field(
        None, ge=1, description="memory store: sessions per tenant; at it, the tenant's own least recently used goes"
    )
    tenant_max_answer_bytes: int | None = Field(
        None, ge=65_536, description="memory store: bytes of kept answers per tenant; beyond, the tenant's own go"
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="chunks of distinct sessions run as one batch")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=1000, description="how long a batch waits to fill")
    max_run_steps: int = Field(
        64, ge=0, description="a session's queued chunks that continue each other run as one, up to this many steps;"
        " 0 = one chunk at a time"
    )
    max_queue: int = Field(1024, ge=1, description="chunks waiting for the engine; beyond this 429")
    queue_patience_seconds: float = Field(
        1.0, ge=0, description="a predict call finding the queue full waits this long for a place (unread); then 429"
    )
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="a chunk not computed by then gets 503; a body not received by then, 408; a request"
        " head not received by then closes the connection; SIGTERM's graceful drain takes at most this"
    )
    max_chunk_steps: int = Field(4096, ge=1, description="most steps in one chunk")
    max_horizon: int = Field(512, ge=0, description="longest forecast")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger bodies get 413 unread")
    stream_window: int = Field(
        64, ge=1, le=4096, description="chunks of one stream waiting for the engine; beyond, the socket is not read"
    )
    stream_ping_seconds: float = Field(
        20.0, gt=0, description="streams are pinged this often; a peer that does not answer within it is dropped"
    )
    max_batch_items: int = Field(256, ge=1, description="most items in one /v1/predict/batch call")
    # 2 Mi: a number in a body takes at least 2 bytes ("0,"), so no batch that fits 4 MiB (GRU_MAX_BODY_BYTES'
    # default) answers more than this without levels, scores or a horizon (README, "Configuration")
    max_batch_answer_values: int = Field(
        2 * 2**20, ge=1, description="most numbers in one /v1/predict/batch call's answer, every item's summed"
    )
    api_keys: str = Field("", repr=False,
                          description="comma-separated key:tenant pairs; empty = no auth, one tenant")
    api_keys_file: Path | None = Field(None, description="file with one 'key tenant' per line")
    metrics_require_key: bool = Field(False, description="put /metrics behind an API key")
    require_api_keys: bool = Field(
        False, description="refuse to start without keys (production: an empty key Secret must not open every route)"
    )
    torch_threads: int = Field(
        # at most 1024: 100000 made libgomp segfault at the first batch, 2**63 overflowed torch.set_num_threads
        0, ge=0, le=1024, description="intra-op threads for the model; 0 = cores - 1 (one for the event loop)"
    )
    surprise_p: float = Field(
        0.01, gt=0, lt=1, description="an arriving value whose p-value is below this counts in gru_surprises_total"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Tenant by key (GRU_ADMIN_KEYS' included) and the admin keys' alone, as _check_api_keys validated them.
    _keys: dict[str, str] = PrivateAttr(default_factory=dict)
    _admin_keys: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def key_tenants(self) -> tuple[dict[str, str], dict[str, str]]:
        """(tenant by key, every configured key; tenant by admin key), read once, at validation: the keys file
        read again later could say something else than what was checked (a secret rewritten in place while
        the model loads gave a key to a tenant no check had seen)."""
        return dict(self._keys), dict(self._admin_keys)

    @property
    def intra_op_threads(self) -> int:
        return intra_op_threads(self.torch_threads)

    @field_validator("model_repository", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        """GRU_MODEL_REPOSITORY= (empty, as compose passes an unset variable) means no repository."""
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_redis_url(self) -> Settings:
        problem = redis_url_problem(self.redis_url) if self.store == "redis" else None
        if problem is not None:  # the URL is not repeated: it may hold a password
            raise ValueError(f"GRU_REDIS_URL {problem}")
        return self

    @model_validator(mode="after")
    def _check_api_keys(self) -> Settings:
        keys = load_api_keys(self.api_keys, self.api_keys_file)  # errors name the entry, never the key
        admin = load_api_keys(self.admin_keys, None, "GRU_ADMIN_KEYS")
        if any(keys.get(key, tenant) != tenant for key, tenant in admin.items()):
            raise ValueError("GRU_ADMIN_KEYS gives a key of GRU_API_KEYS another tenant; a key names one tenant")
        keys |= admin
        if self.metrics_require_key and not keys:
            raise ValueError("GRU_METRICS_REQUIRE_KEY=true needs keys; set GRU_API_KEYS or GRU_API_KEYS_FILE")
        if self.require_api_keys and not keys:
            raise ValueError("GRU_REQUIRE_API_KEYS=true needs keys; GRU_API_KEYS, GRU_API_KEYS_FILE and"
                             " GRU_ADMIN_KEYS are empty or unset")
        self._keys, self._admin_keys = keys, admin
        return self

    @model_validator(mode="after")
    def _check_model_path(self) -> Settings:
        if self.model_repository is not None:
            if not self.model_repository.is_dir():
                raise ValueError(f"GRU_MODEL_REPOSITORY={self.model_repository} is not a directory")
            return self
        if not self.model_path.is_dir():
            raise ValueError(f"GRU_MODEL_PATH={self.model_path} is not a directory; point it at a checkpoint")
        return self


def redis_url_problem(url: str) -> str | None:
    """Why redis cannot use ``url``, in words that never repeat it (it may hold a password); None if it can.
    redis-py reads the URL only as the store is built (a bad port raised a traceback, its text the password
    where the host was forgotten), ignores a database path that is no number (database 0, whatever else is
    there), and takes an unknown option to fail every store call, so all is checked here, at start-up."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed "[" of an IPv6 address
        return "cannot be read as a URL"
    if parts.scheme not in REDIS_SCHEMES:
        return (f"must start with {', '.join(s + '://' for s in REDIS_SCHEMES)}; this one's scheme is"
                f" {parts.scheme or 'missing'!r}")
    if parts.scheme != "unix" and not re.fullmatch(r"[0-9]*", unquote(parts.path).replace("/", "")):
        return "must name its database by number (redis://host:6379/0); this one's path is no number"
    try:
        from redis.asyncio import BlockingConnectionPool
    except ImportError:
        return None  # service.sessions.build_store says the package is missing
    try:
        BlockingConnectionPool.from_url(url).make_connection()  # builds a connection, connects nothing
    except (ValueError, TypeError):
        return ("has a port or an option (?db=, ?socket_timeout=, ...) that redis cannot take: no number, a password"
                " without its host (read as the port), an option of another kind of connection")
    return None


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per ``GRU_`` variable that is no setting, naming the closest setting: a misspelt one would
    otherwise be ignored (GRU_SNAPSHOT_PATHS: no snapshot, every session lost at the next SIGTERM)."""
    known = [f"GRU_{name.upper()}" for name in Settings.model_fields]
    lines = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads the names case-insensitively
        if upper.startswith("GRU_") and upper not in known and upper not in CLIENT_VARIABLES:
            close = difflib.get_close_matches(upper, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see the configuration table in the README"
            lines.append(f"{name} is not a setting{hint}")
    return lines


def client_key_alone(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line when the client's GRU_API_KEY is set and the service has no key: GRU_API_KEYS less one letter,
    a misspelt setting that would otherwise start the service with every route open (it fails closed, as
    ``unknown_variables``' do). Beside keys of the service's own, the client's variable is no such slip."""
    given = any(name.upper() == CLIENT_KEY and value.strip() for name, value in environ.items())
    if not given or settings.key_tenants[0]:
        return []
    return [f"{CLIENT_KEY} is the client's variable; did you mean GRU_API_KEYS? Without keys every route is"
            f" open: unset {CLIENT_KEY} to run so"]
