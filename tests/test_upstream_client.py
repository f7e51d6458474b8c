"""The way to the upstream (tcproxy/http1.py): TLS, kept-alive connections, framing, back-pressure.

The emulator covers the usual answers; the shapes a well-behaved server rarely sends (a body
that ends with the connection, an interim 100, a reply in one-byte pieces, an idle connection
closed under us) come from a scripted upstream on a real socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trustme
from multidict import CIMultiDict

from tcproxy import http1
from tcproxy.emulator import Emulator, EmulatorSettings
from tcproxy.server import listen
from tests.conftest import UPSTREAM_TOKEN, proxy_config
from tests.faults.checks import expect_error

COMPLETION = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "gpt-4",
        "choices": [{"text": "hi", "index": 0, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()

Reply = Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]


@dataclasses.dataclass
class Scripted:
    """An upstream on a real socket that answers each request with ``reply``.

    ``reply`` writes the answer and says whether to keep the connection open for another.
    """

    reply: Reply
    connections: int = 0  # opened so far
    open: int = 0  # open now
    requests: list[bytes] = dataclasses.field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.reply(writer, head):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


def fixed(answer: bytes, keep: bool = True) -> Reply:
    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(answer)
        await writer.drain()
        return keep

    return reply


def ok(body: bytes = COMPLETION, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.fixture
async def scripted() -> Any:
    made: list[Scripted] = []

    async def make(reply: Reply) -> Scripted:
        upstream = await Scripted(reply).start()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.close()


async def test_connections_are_kept_alive_and_reused(stack, scripted):
    upstream = await scripted(fixed(ok()))
    s = await stack(upstream_url=upstream.url)
    for _ in range(20):
        response = await s.complete()
        assert response.status == 200
        assert (await response.json())["usage"]["total_tokens"] == 4
    assert upstream.connections == 1
    assert len(upstream.requests) == 20


async def test_the_request_goes_up_as_one_well_formed_message(stack, scripted):
    upstream = await scripted(fixed(ok()))
    s = await stack(upstream_url=upstream.url + "/prefix")
    response = await s.post("/v1/completions?x=1", json={"model": "gpt-4", "prompt": "é"})
    assert response.status == 200
    head, _, body = upstream.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /prefix/v1/completions?x=1 HTTP/1.1"
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert fields["host"] == upstream.url.removeprefix("http://")
    assert fields["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert int(fields["content-length"]) == len(body)
    assert json.loads(body) == {"model": "gpt-4", "prompt": "é"}


async def test_a_connection_the_upstream_closes_is_not_reused(stack, scripted):
    upstream = await scripted(fixed(ok(extra="Connection: close\r\n"), keep=False))
    s = await stack(upstream_url=upstream.url)
    for _ in range(3):
        assert (await s.complete()).status == 200
    assert upstream.connections == 3


async def test_an_idle_connection_closed_by_the_upstream_costs_no_request(stack, scripted):
    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(ok())
        await writer.drain()
        return False  # closes right after answering, without saying so

    upstream = await scripted(reply)
    s = await stack(upstream_url=upstream.url)
    for _ in range(3):
        assert (await s.complete()).status == 200
        await asyncio.sleep(0.05)  # the close reaches the proxy before the next request
    assert upstream.connections == 3


async def test_a_connection_idle_too_long_is_replaced(stack, scripted, monkeypatch):
    monkeypatch.setattr(http1, "_IDLE_EXPIRY", 0.1)
    upstream = await scripted(fixed(ok()))
    s = await stack(upstream_url=upstream.url)
    assert (await s.complete()).status == 200
    await asyncio.sleep(0.3)
    assert (await s.complete()).status == 200
    assert upstream.connections == 2


async def test_a_body_that_ends_with_the_connection_is_relayed_whole(stack, scripted):
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + COMPLETION
    upstream = await scripted(fixed(answer, keep=False))
    s = await stack(upstream_url=upstream.url)
    response = await s.complete()
    assert response.status == 200
    assert await response.read() == COMPLETION
    assert (await s.complete()).status == 200  # on a new connection


async def test_an_interim_100_is_skipped(stack, scripted):
    upstream = await scripted(fixed(b"HTTP/1.1 100 Continue\r\n\r\n" + ok()))
    s = await stack(upstream_url=upstream.url)
    response = await s.complete()
    assert response.status == 200
    assert await response.read() == COMPLETION


async def test_a_reply_in_one_byte_pieces_is_parsed(stack, scripted):
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"X-Extra: one\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (COMPLETION[:10], COMPLETION[10:]))
        + b"0\r\n\r\n"
    )

    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        for i in range(len(chunked)):
            writer.write(chunked[i : i + 1])
            await writer.drain()
            if i % 50 == 0:
                await asyncio.sleep(0)
        return True

    upstream = await scripted(reply)
    s = await stack(upstream_url=upstream.url)
    for _ in range(2):
        response = await s.complete()
        assert response.status == 200
        assert response.headers["X-Extra"] == "one"
        assert await response.read() == COMPLETION
    assert upstream.connections == 1


async def test_head_answers_end_at_their_headers(stack, scripted):
    upstream = await scripted(fixed(ok(b"").replace(b"Length: 0", b"Length: 999")))
    s = await stack(upstream_url=upstream.url)
    async with asyncio.timeout(5):
        for _ in range(2):  # the second waits for the first relay to end
            response = await s.session.head(s.url + "/v1/models")
            assert response.status == 200
            assert response.headers["Content-Length"] == "999"


async def test_two_different_lengths_are_refused_as_bad_http(stack, scripted):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    upstream = await scripted(fixed(answer))
    s = await stack(upstream_url=upstream.url)
    await expect_error(await s.complete(), 502, "upstream_bad_response")


async def test_a_slow_client_holds_back_the_upstream_instead_of_filling_memory(stack, scripted):
    """A streamed answer larger than every buffer on the way: the upstream waits for the client."""
    total = 64 * 1024 * 1024
    sent = 0

    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        nonlocal sent
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        event = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
        while sent < total:
            writer.write(event)
            sent += len(event)
            await writer.drain()
        return True

    upstream = await scripted(reply)
    s = await stack(upstream_url=upstream.url)
    response = await s.complete(stream=True)
    assert response.status == 200
    await response.content.readexactly(1024)
    await asyncio.sleep(0.5)  # the client reads nothing meanwhile
    held_back = sent
    received = 1024 + len(await response.read())
    assert held_back < total // 2, f"{held_back} bytes sent to a client that read 1 KiB"
    assert received == total


async def test_a_tls_upstream_is_verified(stack, tmp_path, monkeypatch):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    settings = dataclasses.replace(EmulatorSettings(), token=UPSTREAM_TOKEN)
    upstream = await listen(Emulator(settings).app, "127.0.0.1", 0, ssl_context=server_context)
    url = f"https://localhost:{upstream.port}"
    try:
        # Not trusted: the proxy refuses to send the token there.
        s = await stack(upstream_url=url)
        body = await expect_error(await s.complete(), 502, "upstream_unreachable")
        assert "certificate" in body["error"]["message"]
        # Trusted through the system's CA file setting (as a host with its own CA would).
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        s = await stack(upstream_url=url)
        response = await s.complete()
        assert response.status == 200
        assert (await response.json())["usage"]["total_tokens"] > 0
        response = await s.complete(stream=True)
        assert response.status == 200
        assert (await response.read()).rstrip().endswith(b"data: [DONE]")
    finally:
        await upstream.close()


async def test_a_reloaded_base_url_takes_the_next_request_and_drops_the_old_connections(
    stack, scripted
):
    old = await scripted(fixed(ok(b'{"from": "old"}')))
    new = await scripted(fixed(ok(b'{"from": "new"}')))
    s = await stack(upstream_url=old.url)
    assert await (await s.complete()).json() == {"from": "old"}
    config = proxy_config(new.url)
    s.state.apply(config, s.state.token)
    assert await (await s.complete()).json() == {"from": "new"}
    for _ in range(20):  # the old upstream sees its idle connection closed
        if old.open == 0:
            break
        await asyncio.sleep(0.05)
    assert old.open == 0
    assert new.open == 1


async def test_a_second_answer_to_one_request_is_dropped_with_its_connection(stack, scripted):
    extra = b"HTTP/1.1 404 Nope\r\nContent-Length: 3\r\n\r\nbye"
    upstream = await scripted(fixed(ok() + extra))
    s = await stack(upstream_url=upstream.url)
    for _ in range(2):
        response = await s.complete()
        assert response.status == 200
        assert await response.read() == COMPLETION
    assert upstream.connections == 2


async def test_a_body_framed_by_another_transfer_coding_runs_to_the_close(stack, scripted):
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip\r\n\r\nbytes"
    upstream = await scripted(fixed(answer, keep=False))
    s = await stack(upstream_url=upstream.url)
    response = await s.complete()
    assert response.status == 200
    assert await response.read() == b"bytes"


async def test_a_stale_connection_is_retried_for_get_and_not_for_post(stack, scripted):
    served: set[int] = set()

    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        if id(writer) in served:
            return False  # closes as a second request arrives, answering nothing
        served.add(id(writer))
        writer.write(ok())
        await writer.drain()
        return True

    upstream = await scripted(reply)
    s = await stack(upstream_url=upstream.url)
    assert (await s.session.get(s.url + "/v1/models")).status == 200
    # The kept-alive connection fails as the request goes out: a GET gets a fresh one...
    assert (await s.session.get(s.url + "/v1/models")).status == 200
    assert upstream.connections == 2
    # ...a POST (a completion that may have been billed) is not sent twice.
    await expect_error(await s.complete(), 502, "upstream_reset")
    assert upstream.connections == 2


async def test_a_burst_s_extra_connections_close_once_idle_under_steady_traffic(
    stack, scripted, monkeypatch
):
    monkeypatch.setattr(http1, "_IDLE_EXPIRY", 0.2)

    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        await asyncio.sleep(0.05)  # long enough for a burst to need a connection each
        writer.write(ok())
        await writer.drain()
        return True

    upstream = await scripted(reply)
    s = await stack(upstream_url=upstream.url)
    responses = await asyncio.gather(*(s.complete() for _ in range(4)))
    assert [r.status for r in responses] == [200] * 4
    assert upstream.open == 4
    for _ in range(12):  # steady traffic, always on the newest idle connection
        assert (await s.complete()).status == 200
    await asyncio.sleep(0.05)
    assert upstream.open == 1


async def test_a_body_cut_by_silence_is_never_taken_for_whole(scripted):
    async def reply(writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart")  # no length: it runs to the close
        await writer.drain()
        for _ in range(100):  # then silence, until the proxy gives up on it
            if writer.is_closing():
                break
            await asyncio.sleep(0.02)
        return False

    upstream = await scripted(reply)
    pool = http1.Pool(http1.Origin(upstream.url))
    try:
        response = await pool.request("POST", "/v1/completions", CIMultiDict(), b"{}", 1.0, 0.2)
        await asyncio.sleep(0.5)  # the silence passes while nobody is reading
        assert await response.read() == b"part"
        with pytest.raises(http1.UpstreamTimeout):
            await response.read()
    finally:
        pool.close()


class Names:
    """Fake answers for names under ``.test``: the one thing here with no real server to ask."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.addresses: dict[str, list[str]] = {}
        self.unknown: dict[str, float] = {}  # names that fail to resolve, after these seconds
        self.lookups = 0
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host in self.unknown:
                time.sleep(self.unknown[host])  # runs on the loop's executor, as the real one does
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            if host not in self.addresses:
                return real(host, port, *args, **kwargs)
            self.lookups += 1
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
                for address in self.addresses[host]
            ]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Names:
    return Names(monkeypatch)


async def test_an_address_that_never_answers_does_not_hold_up_the_next_one(scripted, names):
    # The upstream's name resolves to two addresses; the first drops every connection attempt
    # (as an unreachable IPv6 route does), the second answers. Like a browser or aiohttp, the
    # proxy starts on the second a quarter second later instead of waiting out the first.
    upstream = await scripted(fixed(ok()))
    port = int(upstream.url.rsplit(":", 1)[1])
    silent = socket.socket()
    silent.bind(("127.0.0.2", port))
    silent.listen(0)
    fillers = []
    for _ in range(2):  # fill the accept queue: Linux then drops further attempts unanswered
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.2", port))
        fillers.append(filler)
    names.addresses["upstream.test"] = ["127.0.0.2", "127.0.0.1"]
    pool = http1.Pool(http1.Origin(f"http://upstream.test:{port}"))
    try:
        started = asyncio.get_running_loop().time()
        response = await pool.request("POST", "/v1/completions", CIMultiDict(), b"{}", 3.0, 3.0)
        assert json.loads(await response.read())["usage"]["total_tokens"] == 4
        assert asyncio.get_running_loop().time() - started < 1.5
    finally:
        pool.close()
        for sock in (silent, *fillers):
            sock.close()


async def test_the_upstream_s_name_is_looked_up_once_per_burst_and_again_when_stale(
    scripted, names, monkeypatch
):
    # Every request needs a new connection.
    upstream = await scripted(fixed(ok(extra="Connection: close\r\n"), keep=False))
    port = int(upstream.url.rsplit(":", 1)[1])
    names.addresses["upstream.test"] = ["127.0.0.1"]
    pool = http1.Pool(http1.Origin(f"http://upstream.test:{port}"))

    async def send() -> None:
        response = await pool.request("POST", "/v1/completions", CIMultiDict(), b"{}", 3.0, 3.0)
        assert json.loads(await response.read())["usage"]["total_tokens"] == 4
        response.release()

    try:
        await asyncio.gather(*(send() for _ in range(8)))
        await send()
        assert (names.lookups, upstream.connections) == (1, 9)
        monkeypatch.setattr(http1, "_DNS_TTL", 0.0)  # as if the addresses' time to live had passed
        await send()
        assert (names.lookups, upstream.connections) == (2, 10)
    finally:
        pool.close()


async def test_a_name_that_does_not_resolve_is_a_clear_502_even_after_the_caller_gave_up(
    stack, names
):
    names.unknown["nowhere.test"] = 0.0
    s = await stack(upstream_url="http://nowhere.test:9")
    body = await expect_error(await s.complete(), 502, "upstream_unreachable")
    assert "Name or service not known" in body["error"]["message"]
    # A lookup slower than the connect timeout fails after its caller left: nothing may be
    # left unretrieved for asyncio to complain about.
    names.unknown["slow.test"] = 0.3
    pool = http1.Pool(http1.Origin("http://slow.test:9"))
    loop = asyncio.get_running_loop()
    complaints: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: complaints.append(context))
    try:
        with pytest.raises(http1.ConnectTimeout):
            await pool.request("GET", "/v1/models", CIMultiDict(), b"", 0.05, 1.0)
        await asyncio.sleep(0.5)
        gc.collect()
        await asyncio.sleep(0)
        assert complaints == []
    finally:
        loop.set_exception_handler(None)
        pool.close()


async def test_an_empty_lookup_or_a_pool_closed_mid_lookup_fails_as_an_upstream_error(names):
    names.addresses["empty.test"] = []
    pool = http1.Pool(http1.Origin("http://empty.test:9"))
    with pytest.raises(http1.ConnectFailed, match=r"no address found for empty\.test"):
        await pool.request("GET", "/v1/models", CIMultiDict(), b"", 1.0, 1.0)
    pool.close()
    # Shutting down while a request waits for the name: an upstream error, not a cancellation
    # of a request nobody cancelled.
    names.unknown["slow.test"] = 0.3
    pool = http1.Pool(http1.Origin("http://slow.test:9"))
    waiting = asyncio.ensure_future(pool.request("GET", "/v1/models", CIMultiDict(), b"", 1.0, 1.0))
    await asyncio.sleep(0.05)
    pool.close()
    with pytest.raises(http1.ConnectFailed, match="shutting down"):
        await waiting


async def test_a_header_that_would_break_the_framing_is_never_sent(scripted):
    upstream = await scripted(fixed(ok()))
    pool = http1.Pool(http1.Origin(upstream.url))
    try:
        headers = CIMultiDict({"X-Note": "a\r\nX-Smuggled: 1"})
        with pytest.raises(http1.UnsafeHeader):
            await pool.request("POST", "/v1/completions", headers, b"{}", 1.0, 1.0)
        assert upstream.connections == 0
    finally:
        pool.close()
