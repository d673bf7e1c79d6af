"""Logging as one JSON object per line, for log shippers; access lines carry their fields at top level."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Where a stream leaves, in its ASGI scope, what its access line adds (frames, close code) as it ends.
STREAM_SUMMARY = "gru.stream"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class _ClientFaults(logging.Filter):
    """uvicorn logs a WebSocket text frame of invalid UTF-8 as an error with a traceback, though it answers it
    as RFC 6455 says (close 1007): the client's fault, so a warning without the traceback here. A request
    httptools cannot parse it logs as a warning, and ``service.head_deadline`` already says it (a head's 400
    problem has its access line, a chunked body's its own warning, with the request id): that warning is
    dropped, as a scanner's junk would otherwise fill the warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Invalid UTF-8 sequence received from client.":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return record.msg != "Invalid HTTP request received."


class _NoQueryStrings(logging.Filter):
    """uvicorn logs each WebSocket upgrade with its path and query string, and a query string is where a
    browser, which cannot set headers on a WebSocket, puts an API key (``?api_key=...``): keys are never
    logged, so these lines keep the path alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if str(record.msg).startswith('%s - "WebSocket %s"') and isinstance(args, tuple) and len(args) > 1:
            record.args = (args[0], str(args[1]).partition("?")[0], *args[2:])
        return True


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces it
    logging.getLogger("uvicorn.error").addFilter(_ClientFaults())
    logging.getLogger("uvicorn.error").addFilter(_NoQueryStrings())
