"""Run the service:  python -m service --host 0.0.0.0 [--port 8000]   (settings from GRU_* variables; GRU_PORT
is the port when --port is not given)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from model import CheckpointError
from service.api.stream import Streams
from service.app import create_app
from service.config import Settings, client_key_alone, unknown_variables
from service.head_deadline import head_deadline_protocol
from service.logs import configure
from service.models import Registry
from service.ws_flow import flow_controlled_websockets

_WRITE_POLL_SECONDS = 0.01  # when the drain is up, how often to look whether the writes under way returned
_ANSWER_SECONDS = 0.5  # then, how long their requests have to send their answers


def _configuration_errors(exc: ValidationError) -> str:
    """One line per problem, naming the environment variable (GRU_DEVICE), not the field (device)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = "GRU_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def _invalid(lines: list[str]) -> int:
    """Say what in the environment is wrong, one problem a line; the exit status of a bad configuration."""
    print("invalid configuration:\n" + "\n".join(f"  {line}" for line in lines), file=sys.stderr)
    return 2


def _raise_open_file_limit() -> None:
    """Every connection holds a file descriptor, idle ones included (until the head deadline closes them,
    service.head_deadline): the usual soft limit of 1,024 would let a thousand silent clients lock everyone
    out within that time, long before the hard limit would. Front the service with a proxy that times out
    slow clients sooner (deploy/nginx) where it faces the open internet."""
    try:
        import resource  # Unix only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is capped by the kernel (macOS: kern.maxfilesperproc): try high, then lower.
    ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for target in (ceiling, 65536, 10240):
        if soft < target <= ceiling:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return
            except (ValueError, OSError):
                continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: GRU_PORT (8000)")
    args = parser.parse_args(argv)
    unknown = unknown_variables()
    if unknown:
        return _invalid(unknown)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid configuration:\n{_configuration_errors(exc)}", file=sys.stderr)
        return 2
    misspelt = client_key_alone(settings)
    if misspelt:
        return _invalid(misspelt)
    configure(settings.log_level)
    _raise_open_file_limit()
    try:
        app = create_app(settings)
    except (CheckpointError, RuntimeError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    # One setting for the port: the image's healthcheck (service.healthcheck) reads GRU_PORT too.
    port = settings.port if args.port is None else args.port
    config = uvicorn.Config(
        app, host=args.host, port=port, log_config=None, access_log=False,
        http=head_deadline_protocol(settings.request_timeout_seconds, app.state.metrics),
        # streams: a frame over the body limit closes with 1009 before it is buffered; pings find dead peers;
        # no per-message compression (small JSON frames: it would cost more CPU than it saves bytes); pings
        # from a peer that does not read stop the reading, and shutdown cuts it off (service.ws_flow)
        ws=flow_controlled_websockets(app.state.metrics), ws_max_size=settings.max_body_bytes,
        ws_ping_interval=settings.stream_ping_seconds, ws_ping_timeout=settings.stream_ping_seconds,
        ws_per_message_deflate=False,
    )
    # SIGTERM's drain takes as long as a chunk may: the bound the deployment files' grace periods are set from.
    _DrainingServer(config, app.state.streams, app.state.registry, settings.request_timeout_seconds).run()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM first drains the WebSocket streams (every frame read is answered,
    then each closes with 1001): uvicorn's own shutdown would cut them off with 1012 at once.

    Meanwhile no HTTP connection takes a new request (one at work finishes), as uvicorn's shutdown has them
    do, and the drain and uvicorn's wait for the requests at work share one ``timeout_graceful_shutdown``
    (``GRU_REQUEST_TIMEOUT_SECONDS``): before, a request arriving on a keep-alive connection during a 30 s
    drain was served, and uvicorn then waited up to 30 s more for it, past Docker's 45 s grace.

    When that bound is up, uvicorn cancels what is still at work, and each request is answered 503 "retry
    with the same offset". A chunk whose batch is writing it to the store then is not cut off before the
    write returns (the queue's own timeout waits for it likewise): the write may apply it, and a run keeps
    only its last chunk's answer, so the retry of an earlier chunk of a run would be a 409 past it, its
    answer lost. That wait is as long as a store call may take (Redis's socket timeout; a memory store's write
    is never awaited)."""

    def __init__(self, config: uvicorn.Config, streams: Streams, registry: Registry, budget: float):
        super().__init__(config)
        self.streams = streams
        self.registry = registry
        self.budget = budget  # seconds, for the drain and uvicorn's wait together
        self._left = budget  # of it, for uvicorn's wait, once the streams are drained

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # no new connections meanwhile
            server.close()
        for connection in list(self.server_state.connections):
            if isinstance(connection, HttpToolsProtocol):  # not a stream: those are drained
                connection.shutdown()
        began = time.monotonic()
        await self._drain_unless_forced()
        left = self.budget - (time.monotonic() - began)
        # what is left, unrounded (asyncio.timeout takes a float): a whole second up, a drain overran its bound
        self._left = max(left, 0.0)
        self.config.timeout_graceful_shutdown = None  # the bound is kept by _wait_tasks_to_complete
        await super().shutdown(sockets)

    async def _wait_tasks_to_complete(self) -> None:
        """uvicorn's wait for the requests at work, up to what is left of the bound; then, before uvicorn
        cancels them (on the TimeoutError raised here), for the writes under way to return and their requests
        to be answered."""
        try:
            async with asyncio.timeout(self._left):
                await super()._wait_tasks_to_complete()
            return
        except TimeoutError:
            pass
        if self.registry.writing:
            while self.registry.writing and not self.force_exit:
                await asyncio.sleep(_WRITE_POLL_SECONDS)
            with contextlib.suppress(TimeoutError):  # the chunks written are answered and sent
                async with asyncio.timeout(_ANSWER_SECONDS):
                    await super()._wait_tasks_to_complete()
                return
        raise TimeoutError  # uvicorn cancels what is still at work: each request is answered 503

    async def _drain_unless_forced(self) -> None:
        """The streams' drain, cut short by a SIGINT during it (``force_exit``), which is to exit at once, as
        uvicorn's own wait does: before, a stream whose client read nothing held Ctrl-C to the whole bound."""
        drain = asyncio.ensure_future(self.streams.drain(self.budget))
        while not drain.done() and not self.force_exit:
            await asyncio.wait([drain], timeout=0.1)  # uvicorn's signal handler only sets the flag
        if not drain.done():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


if __name__ == "__main__":
    sys.exit(main())
