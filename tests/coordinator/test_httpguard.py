"""Who may reach the HTTP API, and what a stranger can cost: the real
`HttpServer` on 127.0.0.1, spoken to over real sockets.

Host and Origin checks (DNS rebinding, web pages), the connection cap, the
deadlines on a request's head and body, the body size limit, TLS with the
client's CA, and that each refusal is counted in /metrics and logged once
per cause.  Tests assert what happened (status, closed connection,
counters), never how long it took; deadlines are short here only so that
the tests are quick, and every wait has a generous hang guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from shardline.client import CoordinatorClient
from shardline.coordinator import Coordinator, HttpAccess, HttpLimits, HttpServer, server_tls_context
from shardline.errors import ConfigurationError, RetryableStorageError

from polling import PATIENCE_S, eventually
from tlsca import make_ca

TOKEN = "guard-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: The head of an authenticated POST /jobs, but for Host and Content-Length.
POST_JOBS = ("POST /jobs HTTP/1.1", "Content-Type: application/json", f"Authorization: Bearer {TOKEN}")


@contextlib.asynccontextmanager
async def api(
    service: Coordinator,
    *,
    token: str | None = TOKEN,
    limits: HttpLimits = HttpLimits(),
    allowed_hosts: tuple[str, ...] = (),
    tls_dir: object = None,
) -> AsyncIterator[HttpServer]:
    tls = None
    if tls_dir is not None:
        ca = make_ca(tls_dir)  # type: ignore[arg-type]
        tls = server_tls_context(str(ca.server_cert), str(ca.server_key))
    access = HttpAccess(token=token, allowed_hosts=allowed_hosts)
    async with HttpServer(service, host="127.0.0.1", port=0, access=access, limits=limits, tls=tls) as server:
        yield server


def port_of(server: HttpServer) -> int:
    port = urlsplit(server.url).port
    assert port is not None
    return port


async def get(server: HttpServer, path: str, **headers: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(server.url + path, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def exchange(server: HttpServer, data: bytes) -> bytes:
    """Send `data` on a new connection and read the answer to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        writer.write(data)
        async with asyncio.timeout(PATIENCE_S):
            return await reader.read()
    finally:
        writer.close()


def head(server: HttpServer, request_line: str, *headers: str) -> bytes:
    """A complete request head for `server`, with its Host."""
    lines = [request_line, f"Host: 127.0.0.1:{port_of(server)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def trickle(server: HttpServer, data: bytes, *, first: bytes = b"") -> tuple[int, bytes]:
    """Send `first`, then `data` one byte at a time (each well within any
    per-read timeout) until the server answers; (bytes of `data` sent, answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    writer.write(first)
    sent, answer = 0, b""
    try:
        async with asyncio.timeout(PATIENCE_S):
            while sent < len(data) and not answer and not reader.at_eof():
                writer.write(data[sent : sent + 1])
                sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        answer = await reader.read(65536)  # whatever has come, not up to EOF
    finally:
        writer.close()
    return sent, answer


def refused(service: Coordinator, cause: str) -> int:
    return service.metrics.http_refused[cause]


# -- Host and Origin -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:{port}", True),
        ("localhost:{port}", True),
        ("LOCALHOST:{port}", True),
        ("[::1]:{port}", True),
        ("localhost:{other}", False),  # another port: another server
        ("localhost", False),  # port 80
        ("evil.example:{port}", False),  # a DNS-rebinding page sends its own name
        ("127.0.0.1.nip.io:{port}", False),
        ("evil.example@localhost:{port}", False),
        ("", False),
    ],
)
async def test_host_must_name_this_server(coordinator, host, allowed):
    async with api(coordinator) as server:
        port = port_of(server)
        status, body = await get(server, "/jobs", Host=host.format(port=port, other=port + 1), **AUTH)
    if allowed:
        assert status == 200, body
    else:
        assert status == 403 and "--allowed-host" in body["error"], body
        assert refused(coordinator, "bad_host") == 1


async def test_allowed_hosts_add_names_with_or_without_their_port(coordinator):
    async with api(coordinator, allowed_hosts=("coord.example.com", "proxy.example:443")) as server:
        assert (await get(server, "/jobs", Host="coord.example.com:8443", **AUTH))[0] == 200
        assert (await get(server, "/jobs", Host="coord.example.com", **AUTH))[0] == 200
        assert (await get(server, "/jobs", Host="proxy.example:443", **AUTH))[0] == 200
        assert (await get(server, "/jobs", Host="proxy.example", **AUTH))[0] == 403  # port 80
        assert (await get(server, "/jobs", Host="other.example.com", **AUTH))[0] == 403
        # A page of another server under an allowed name is still another origin.
        host = {"Host": "coord.example.com:8443"}
        assert (await get(server, "/jobs", **host, Origin="http://coord.example.com:3000", **AUTH))[0] == 403
        assert (await get(server, "/jobs", **host, Origin="http://coord.example.com:8443", **AUTH))[0] == 200


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Origin": "http://evil.example"}, False),
        ({"Origin": "null"}, False),  # sandboxed frames, file:// pages
        ({"Origin": "http://localhost:3000"}, False),  # another local web app
        ({"Origin": "https://127.0.0.1:{port}"}, False),  # not our scheme
        ({"Origin": "http://127.0.0.1:{port}"}, True),  # ourselves
        ({"Sec-Fetch-Site": "cross-site"}, False),  # a no-cors GET sends no Origin
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Sec-Fetch-Site": "same-origin"}, True),
        ({"Sec-Fetch-Site": "none"}, True),  # typed into the address bar
    ],
)
async def test_requests_from_web_pages_are_refused(coordinator, headers, allowed):
    async with api(coordinator) as server:
        sent = {name: value.format(port=port_of(server)) for name, value in headers.items()}
        status, body = await get(server, "/jobs", **sent, **AUTH)
    assert status == (200 if allowed else 403), body
    assert refused(coordinator, "bad_origin") == (0 if allowed else 1)


async def test_a_web_page_cannot_start_a_job_even_without_a_token(coordinator, tmp_path):
    """The reported attack: a page POSTs text/plain (no preflight) to the
    loopback port, from its own origin or through a rebound name."""
    source = tmp_path / "input.txt"
    source.write_bytes(b"one line\n")
    body = json.dumps({"source": str(source), "shards": 1, "command": "id"}).encode()
    async with api(coordinator, token=None) as server:
        port = port_of(server)
        for headers in (
            {"Origin": "http://evil.example", "Content-Type": "text/plain"},
            {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}", "Content-Type": "text/plain"},
            {"Content-Type": "text/plain"},
        ):
            async with (
                aiohttp.ClientSession() as session,
                session.post(server.url + "/jobs", data=body, headers=headers) as response,
            ):
                assert response.status in (403, 415), headers
    assert coordinator.views() == []


# -- the connection guard ----------------------------------------------------------------------


async def test_a_trickled_request_head_is_cut_off(coordinator):
    limits = HttpLimits(header_timeout_s=1.0)
    async with api(coordinator, limits=limits) as server:
        trickled = head(server, "GET /healthz HTTP/1.1", "X-Padding: " + "p" * 200)
        sent, answer = await trickle(server, trickled)
        assert sent < len(trickled), "the whole head got through"
        assert answer.startswith(b"HTTP/1.1 408 ")
        # A connection that says nothing at all is cut the same way.
        assert (await exchange(server, b"")).startswith(b"HTTP/1.1 408 ")
        assert refused(coordinator, "header_timeout") == 2
        # Complete heads still pass.
        assert (await get(server, "/healthz"))[0] == 200


async def test_the_head_deadline_applies_to_every_request_of_a_kept_alive_connection(coordinator):
    limits = HttpLimits(header_timeout_s=1.0)
    async with api(coordinator, limits=limits) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(head(server, "GET /healthz HTTP/1.1"))
        async with asyncio.timeout(PATIENCE_S):
            first = await reader.readuntil(b'"ok"}')
            assert first.startswith(b"HTTP/1.1 200 ")
            writer.write(b"GET /hea")  # the next request's head starts, and never ends
            rest = await reader.read()
        writer.close()
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert refused(coordinator, "header_timeout") == 1


async def test_connections_beyond_the_cap_are_answered_503(coordinator):
    limits = HttpLimits(max_connections=3, header_timeout_s=PATIENCE_S)
    async with api(coordinator, limits=limits) as server, contextlib.AsyncExitStack() as stack:
        held = []
        for _ in range(3):  # admitted (each has been answered once), then kept open
            session = await stack.enter_async_context(aiohttp.ClientSession())
            async with session.get(server.url + "/healthz") as response:
                assert response.status == 200
            held.append(session)
        answer = await exchange(server, b"")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
        assert refused(coordinator, "connection_limit") == 1
        async with CoordinatorClient(server.url, token=TOKEN) as client:
            with pytest.raises(RetryableStorageError, match="too many connections"):
                await client.jobs()
        await held.pop().close()

        # Once one has gone, a new client gets in.
        async def a_new_client_gets_in() -> bool:
            with contextlib.suppress(aiohttp.ClientError, RetryableStorageError):
                async with CoordinatorClient(server.url, token=TOKEN) as client:
                    assert await client.jobs() == []
                    return True
            return False

        await eventually(a_new_client_gets_in, "a new client gets in", interval_s=0.05)


async def test_a_trickled_body_is_cut_off(coordinator):
    limits = HttpLimits(body_timeout_s=1.0)
    async with api(coordinator, limits=limits) as server:
        first = head(server, *POST_JOBS, "Content-Length: 1000")
        sent, answer = await trickle(server, b" " * 1000, first=first)
    assert sent < 1000, "the whole body got through"
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert refused(coordinator, "body_timeout") == 1


async def test_a_large_body_is_refused_before_it_is_read(coordinator):
    async with api(coordinator) as server:
        announced = await exchange(
            server,
            head(server, *POST_JOBS, "Content-Length: 999999999"),
        )
        assert announced.startswith(b"HTTP/1.1 413 ")
        async with aiohttp.ClientSession(headers=AUTH) as session:

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
                for _ in range(100):
                    yield b" " * 1024

            async with session.post(
                server.url + "/jobs", data=chunks(), headers={"Content-Type": "application/json"}
            ) as response:
                assert response.status == 413
    assert refused(coordinator, "body_too_large") == 2


# -- counting and logging --------------------------------------------------------------------


async def test_refusals_are_counted_and_logged_once_per_cause(coordinator, caplog):
    caplog.set_level(logging.INFO)
    async with api(coordinator) as server:
        for _ in range(20):
            assert (await get(server, "/jobs", Authorization="Bearer wrong"))[0] == 401
            assert (await get(server, "/jobs", Host="evil.example", **AUTH))[0] == 403
        async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics", headers=AUTH) as response:
            metrics = await response.text()
    assert 'shardline_http_refused_total{cause="bad_token"} 20' in metrics
    assert 'shardline_http_refused_total{cause="bad_host"} 20' in metrics
    assert 'shardline_http_refused_total{cause="header_timeout"} 0' in metrics
    warnings = [r.getMessage() for r in caplog.records if r.name == "shardline.coordinator.http"]
    assert len([w for w in warnings if "(cause bad_token)" in w]) == 1, warnings
    assert len([w for w in warnings if "(cause bad_host)" in w]) == 1, warnings
    # Nor does the access log list them one by one.
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert access and not any('" 401 ' in line or '" 403 ' in line for line in access), access


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_with_the_clients_ca(coordinator, tmp_path):
    async with api(coordinator, tls_dir=tmp_path / "ca") as server:
        assert server.url.startswith("https://127.0.0.1:")
        async with CoordinatorClient(server.url, token=TOKEN, ca_file=str(tmp_path / "ca" / "ca.pem")) as client:
            assert await client.jobs() == []
        async with CoordinatorClient(server.url, token=TOKEN) as client:  # the system trust store
            with pytest.raises(ConfigurationError, match="certificate"):
                await client.jobs()
        # Plain HTTP on the TLS port gets no answer.
        assert not (await exchange(server, head(server, "GET /healthz HTTP/1.1"))).startswith(b"HTTP")
