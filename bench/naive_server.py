"""The baseline servers the load bench compares the service with; each runs as its own process.

    python -m bench.naive_server --port 8001                  # the naive GRU server (the baseline)
    python -m bench.naive_server --port 8001 --mode echo      # FastAPI answering the body (or frame) it got
    python -m bench.naive_server --port 8001 --mode pydantic  # FastAPI + pydantic models, no model
    python -m bench.naive_server --port 8001 --mode raw       # asyncio, a fixed answer: the client's ceiling

``naive`` is what an afternoon gives: FastAPI with pydantic request and response models, a plain (sync)
route that FastAPI runs in its thread pool, ``torch.nn.GRU`` + a linear head, and the sessions' hidden
states in a dict behind a lock, one request at a time through the model. It serves the same path and body
as the service (``POST /v1/sessions/{id}/predict`` with ``values`` and ``offset``), checks offsets (409) and
answers the one-step predictions. Nothing in it is slowed on purpose: uvicorn's defaults (uvloop, httptools,
its access log on, as an afternoon leaves it), torch's default threads.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import torch
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from torch import nn


class ChunkIn(BaseModel):
    values: list[list[float]] | list[float]
    offset: int | None = None
    horizon: int = 0


class ChunkOut(BaseModel):
    session_id: str
    position: int
    predictions: list[list[float]]
    forecast: list[list[float]] | None = None


def naive_app(hidden: int, layers: int) -> FastAPI:
    app = FastAPI()
    gru = nn.GRU(1, hidden, layers, batch_first=True).eval()
    head = nn.Linear(hidden, 1).eval()
    sessions: dict[str, tuple[torch.Tensor, int]] = {}  # id -> (h (L, 1, H), position)
    lock = threading.Lock()

    @app.post("/v1/sessions/{session_id}/predict", response_model=ChunkOut)
    def predict(session_id: str, chunk: ChunkIn) -> ChunkOut | JSONResponse:
        x = torch.tensor(chunk.values, dtype=torch.float32).reshape(1, -1, 1)  # (1, T, 1)
        with lock:
            h, position = sessions.get(session_id, (torch.zeros(layers, 1, hidden), 0))
            if chunk.offset is not None and chunk.offset != position:
                # the position in the body, as the service gives it, so a client that lost an answer resyncs
                return JSONResponse({"detail": f"offset {chunk.offset} but session is at {position}",
                                     "position": position}, status_code=409)
            with torch.no_grad():
                out, h = gru(x, h)
                y = head(out)  # (1, T, 1)
                forecast = None
                if chunk.horizon:
                    steps, last, h_f = [], y[:, -1:], h
                    for _ in range(chunk.horizon):
                        steps.append(last)
                        o, h_f = gru(last, h_f)
                        last = head(o)
                    forecast = torch.cat(steps, 1)[0].tolist()
            sessions[session_id] = (h, position + x.shape[1])
        return ChunkOut(session_id=session_id, position=position + x.shape[1], predictions=y[0].tolist(),
                        forecast=forecast)

    return app


def echo_app() -> FastAPI:
    """Each body, and each text frame of a session's stream, answered with itself: what the framework and
    the server's protocol cost a chunk, HTTP or WebSocket, before any of the service's work."""
    app = FastAPI()

    @app.post("/v1/sessions/{session_id}/predict")
    async def echo(session_id: str, request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def echo_stream(session_id: str, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    return app


def pydantic_app() -> FastAPI:
    """The request model in and a response model out, no computation: what FastAPI's typing costs."""
    app = FastAPI()

    @app.post("/v1/sessions/{session_id}/predict", response_model=ChunkOut)
    async def parse_only(session_id: str, chunk: ChunkIn) -> ChunkOut:
        values = [v if isinstance(v, list) else [v] for v in chunk.values]
        return ChunkOut(session_id=session_id, position=(chunk.offset or 0) + len(values), predictions=values)

    return app


class _RawHTTP(asyncio.Protocol):
    """Keep-alive HTTP/1.1 that reads Content-Length bodies and answers a fixed 200; no framework at all."""

    # No "position": the load generator would count a fixed one as the answer to another chunk.
    ANSWER = b'{"predictions":[[0.0]]}'
    RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(self.RESPONSE)


def serve_raw(host: str, port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_RawHTTP, host, port)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--mode", choices=("naive", "echo", "pydantic", "raw"), default="naive")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.mode == "raw":
        serve_raw(args.host, args.port)
        return 0
    app = {"naive": lambda: naive_app(args.hidden, args.layers), "echo": echo_app, "pydantic": pydantic_app}
    uvicorn.run(app[args.mode](), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
