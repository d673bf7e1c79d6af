"""The nginx config of the scale profile: `nginx -t` accepts it, and it proxies to a real service.

The shipped file names the compose replicas' alias (gru-api-redis), which resolves only through Docker's DNS
server (127.0.0.11); the tests use a copy with that name pointed at loopback and the resolver at a stand-in
(a DNS server the test runs), wrapped in a minimal main config (the image's nginx.conf includes ours inside
http {}) with every path under the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer
from websockets.sync.client import connect

from harness.processes import free_port

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "gru-api.conf"


def _test_copy(directory: Path, listen: int, *, replicas: str, resolver: str = "127.0.0.1:53") -> Path:
    """Our server block with `replicas` (host:port) in place of the compose alias and `resolver` in place of
    Docker's DNS server, inside a main config that writes only to `directory`."""
    conf = SHIPPED.read_text()
    conf, count = re.subn(r"(?m)^(\s*set\s+\$gru_replicas\s+)gru-api-redis:8000;", rf"\g<1>{replicas};", conf)
    assert count == 1, "expected the replicas' alias in one `set`"
    conf, count = re.subn(r"(?m)^(\s*resolver\s+)127\.0\.0\.11 ", rf"\g<1>{resolver} ", conf)
    assert count == 1, "expected Docker's DNS server as the resolver"
    conf, count = re.subn(r"listen 8080;", f"listen 127.0.0.1:{listen};", conf)
    assert count == 1
    conf, count = re.subn(r"access_log /var/log/nginx/access\.log ", f"access_log {directory}/access.log ", conf)
    assert count == 1, "expected the server's access log in the image's place"
    (directory / "gru-api.conf").write_text(conf)
    main = directory / "nginx.conf"
    # Started as root, nginx runs its workers as nobody, who cannot write a large body's temporary file
    # under pytest's private (0700) directory: they keep root's user here (as in the nginx image, whose
    # workers can write theirs).
    user = "user root;" if os.geteuid() == 0 else ""
    main.write_text(f"""
{user}
worker_processes 1;
pid {directory}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    access_log off;
    include {directory}/gru-api.conf;
}}
""")
    return main


def test_nginx_accepts_the_config(tmp_path: Path, tool: Callable[[str], str]) -> None:
    main = _test_copy(tmp_path, free_port(), replicas="gru-api-redis:8000")
    done = subprocess.run(
        [tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


@pytest.fixture
def proxy(server: Any, tmp_path: Path, tool: Callable[[str], str]) -> Iterator[str]:
    """nginx in front of the shared test server (the replicas' name replaced by its address)."""
    port = free_port()
    main = _test_copy(tmp_path, port, replicas=server.url.removeprefix("http://"))
    process = subprocess.Popen(
        [tool("nginx"), "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log"),
         "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (tmp_path / "error.log").read_text()
            try:
                httpx.get(url + "/nginx-health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_nginx_proxies_sessions_to_the_api_and_keeps_request_ids(proxy: str, server: Any, tmp_path: Path) -> None:
    session = f"/v1/sessions/deploy-nginx-{uuid.uuid4().hex[:12]}/predict"  # the server is shared
    with httpx.Client(base_url=proxy, timeout=30) as http:
        assert http.get("/nginx-health").text == "ok\n"
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.headers["x-upstream"] == server.url.removeprefix("http://")

        first = http.post(session, json={"values": [0.1, 0.2], "offset": 0},
                          headers={"X-Request-ID": "client-chosen-1"})
        assert first.status_code == 200, first.text
        assert first.headers["x-request-id"] == "client-chosen-1"
        second = http.post(session, json={"values": [0.3], "offset": 2})
        assert second.status_code == 200, second.text
        assert second.json()["position"] == 3
        # Without one from the client, nginx makes the id the api logs and echoes.
        assert re.fullmatch(r"[0-9a-f]{32}", second.headers["x-request-id"])
    # Each request is followed from nginx's log line to the api's by its id. nginx writes a request's line after
    # its answer has gone out, so the last one may come a moment after the client has read it.
    ids = [f"request_id={answer.headers['x-request-id']}" for answer in (first, second)]
    deadline = time.monotonic() + 10
    while not all(i in (logged := (tmp_path / "access.log").read_text()) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for logged_id in ids:
        assert logged_id in logged, logged  # the proxy fixture's directory


@pytest.mark.parametrize("prefix", ["/v1", "/v1/models/tiny"])
def test_a_link_the_api_answers_through_nginx_names_nginx_s_address(proxy: str, prefix: str) -> None:
    """A created session's Location is built from the Host the api is sent: nginx must pass the client's, port
    included. With `Host $host` (the name alone) a fork through compose's nginx on :8080 pointed at port 80,
    where nothing answers."""
    source = f"deploy-nginx-link-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=proxy, timeout=30) as http:
        made = http.post(f"{prefix}/sessions/{source}/predict", json={"values": [0.1, 0.2], "offset": 0})
        assert made.status_code == 200, made.text
        fork = http.post(f"{prefix}/sessions/{source}/fork", json={"to": f"{source}-copy"})
        assert fork.status_code == 201, fork.text
        assert fork.headers["location"] == f"{proxy}{prefix}/sessions/{source}-copy"
        assert http.get(fork.headers["location"]).json()["position"] == 2


def test_an_import_and_a_delete_reach_the_api_through_nginx_with_their_bodies(proxy: str, server: Any) -> None:
    """PUT and DELETE take their own way through nginx (one try, location @once): body, headers and the
    upstream's address as on every other route."""
    source = f"deploy-nginx-import-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=proxy, timeout=30) as http:
        assert http.post(f"/v1/sessions/{source}/predict", json={"values": [0.1, 0.2], "offset": 0}).status_code == 200
        state = http.get(f"/v1/sessions/{source}/state")
        assert state.status_code == 200, state.text
        made = http.put(f"/v1/sessions/{source}-copy/state", content=state.content,
                        headers={"Content-Type": "application/octet-stream", "If-None-Match": "*",
                                 "X-Request-ID": "client-chosen-put"})
        assert made.status_code == 201, made.text
        assert made.json()["position"] == 2
        assert made.headers["x-request-id"] == "client-chosen-put"
        assert made.headers["x-upstream"] == server.url.removeprefix("http://")
        assert http.delete(f"/v1/sessions/{source}-copy").status_code == 204
        assert http.get(f"/v1/sessions/{source}-copy").status_code == 404


@pytest.mark.parametrize("prefix", ["/v1", "/v1/models/tiny"])
def test_nginx_passes_a_session_stream_through(proxy: str, prefix: str) -> None:
    """The default model's stream and a named model's (the shared server's model is "tiny")."""
    url = proxy.replace("http://", "ws://") + f"{prefix}/sessions/deploy-nginx-stream-{prefix.count('/')}/stream"
    with connect(url, open_timeout=30) as ws:
        for offset, values in ((0, [0.1, 0.2]), (2, [0.3])):
            ws.send(json.dumps({"values": values, "offset": offset}))
        answers = [json.loads(ws.recv(timeout=30)) for _ in range(2)]
    assert [a["position"] for a in answers] == [2, 3]


@pytest.mark.parametrize(("method", "path"), [("POST", "predict"), ("PUT", "state")])
@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("excess", [1, 2**16, 2**19, 2**20 - 2**16])
def test_nginx_answers_a_body_over_the_api_limit_with_a_413_problem(
    proxy: str, excess: int, sized: bool, method: str, path: str
) -> None:
    """A body over GRU_MAX_BODY_BYTES (the default, 4 MiB, as compose and the manifests set it) gets 413 with
    the api's problem body, whatever its size: the api answers 413 unread and closes, so a body nginx passes
    on (client_max_body_size above the api's limit) failed nginx's write upstream and came back 502. The same
    for an import (PUT, which takes its own location) and for a body sent in chunks, with no length ahead."""
    from service.config import Settings

    limit = Settings.model_fields["max_body_bytes"].default
    body = b"0" * (limit + excess)
    with httpx.Client(base_url=proxy, timeout=30) as http:
        for _ in range(3):  # the write fails or not by a race with the api's close: a few tries
            answer = http.request(method, f"/v1/sessions/deploy-nginx-large/{path}",
                                  content=body if sized else iter([body]),
                                  headers={"Content-Type": "application/json"})
            assert answer.status_code == 413, (answer.status_code, answer.text[:200])
            assert answer.headers["content-type"] == "application/problem+json"
            problem = answer.json()
            assert problem["status"] == 413 and problem["type"].endswith("/body-too-large"), problem


# --- request-time resolution -------------------------------------------------------------------------


class _Names(BaseResolver):  # type: ignore[misc]
    """A DNS server's answers, changed by the test as Docker's change when a container is re-created."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[str]] = {}

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if request.q.qtype == QTYPE.A:
            for address in self.addresses.get(name, []):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        if name not in self.addresses:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class _Whoami(http.server.BaseHTTPRequestHandler):
    """A replica stand-in that answers every GET with its own address."""

    def do_GET(self) -> None:
        body = self.server.server_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Vanishing(http.server.BaseHTTPRequestHandler):
    """A replica stand-in that reads a request whole, as a replica applying it does, and dies before it
    answers (an OOM kill, a crash): the connection closes with no answer. It records what reached it."""

    received: ClassVar[list[str]] = []

    def _read_and_vanish(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(self.command)
        self.close_connection = True

    do_PUT = do_DELETE = do_POST = _read_and_vanish

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _replica(address: str, port: int,
             handler: type[http.server.BaseHTTPRequestHandler] = _Whoami) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer((address, port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _nginx_over_dns(tmp_path: Path, tool: Callable[[str], str], addresses: list[str]
                    ) -> tuple[_Names, DNSServer, subprocess.Popen[bytes], str, int]:
    """nginx with the shipped config, the replicas' alias resolved by a DNS server the test runs (to
    `addresses`, answers valid 1 s): the names, that server, nginx, its URL and the replicas' port."""
    names = _Names()
    names.addresses["gru-api-redis"] = addresses
    dns_port, port, listen = free_port(), free_port(), free_port()
    dns = DNSServer(names, address="127.0.0.1", port=dns_port)
    dns.start_thread()
    main = _test_copy(tmp_path, listen, replicas=f"gru-api-redis:{port}", resolver=f"127.0.0.1:{dns_port}")
    conf = tmp_path / "gru-api.conf"
    conf.write_text(re.sub(r"valid=\d+s", "valid=1s", conf.read_text()))
    nginx = subprocess.Popen([tool("nginx"), "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log"),
                              "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return names, dns, nginx, f"http://127.0.0.1:{listen}/", port


def test_nginx_finds_a_recreated_replica_at_its_new_address_without_a_reload(
    tmp_path: Path, tool: Callable[[str], str]
) -> None:
    """The replicas' alias answers with whatever addresses the DNS server has now: nginx asks again once its
    answer is `valid` old (1 s here), so a replica re-created elsewhere is reached by the same nginx process,
    and two replicas behind the alias both get requests."""
    names, dns, nginx, url, port = _nginx_over_dns(tmp_path, tool, ["127.0.0.2"])

    def answered_by(address: str) -> None:
        deadline = time.monotonic() + 15
        while True:
            assert nginx.poll() is None, (tmp_path / "error.log").read_text()
            try:
                answer = httpx.get(url, timeout=2)
                if answer.status_code == 200 and answer.text == address:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"nginx never reached {address}"
            time.sleep(0.1)

    try:
        with _replica("127.0.0.2", port):
            answered_by("127.0.0.2")
        names.addresses["gru-api-redis"] = ["127.0.0.3"]  # the replica is gone, re-created at another address
        with _replica("127.0.0.3", port):
            answered_by("127.0.0.3")
            with _replica("127.0.0.4", port):  # a second replica behind the same alias
                names.addresses["gru-api-redis"] = ["127.0.0.3", "127.0.0.4"]
                answered_by("127.0.0.4")
                # nginx's resolver starts each use of the answer at a random address (ngx_resolver_export's
                # rotate): six requests all went to one of two 3% of the time; forty, one in 2^39
                seen = {httpx.get(url, timeout=2).text for _ in range(40)}
                assert seen == {"127.0.0.3", "127.0.0.4"}, "round robin over every address of the alias"
    finally:
        nginx.terminate()
        nginx.wait(10)
        dns.stop()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
def test_a_request_that_reached_a_replica_is_never_sent_to_another(
    method: str, tmp_path: Path, tool: Callable[[str], str]
) -> None:
    """A replica that dies after reading a request may have applied it. nginx re-sent a PUT or a DELETE to the
    next replica (only POST is "non-idempotent" to it): an import or delete under If-Match / If-None-Match,
    applied by the first, then answered 412 by the second, or an unconditional import put a session back over
    chunks answered 200 in between. Such a request gets nginx's 502 instead; the client decides."""
    _Vanishing.received = []
    _, dns, nginx, url, port = _nginx_over_dns(tmp_path, tool, ["127.0.0.2", "127.0.0.3"])
    try:
        with _replica("127.0.0.2", port, _Vanishing), _replica("127.0.0.3", port, _Vanishing):
            deadline = time.monotonic() + 15
            while True:  # nginx listening
                assert nginx.poll() is None, (tmp_path / "error.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    httpx.get(url + "nginx-health", timeout=2)
                    break
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.05)
            answer = httpx.request(method, url + "v1/sessions/pump-7/state", content=b"state",
                                   headers={"If-None-Match": "*"}, timeout=10)
        assert answer.status_code == 502
        assert _Vanishing.received == [method], "sent to one replica, once"
    finally:
        nginx.terminate()
        nginx.wait(10)
        dns.stop()
