"""Faults of the upstream: each test is named after what the upstream does.

Injected with the emulator's fault knobs, or with sockets that misbehave on purpose. Every case
ends with the status the contract names, the tcproxy error shape where tcproxy answers, a log
line, and — checked by the ``stack`` fixture — no secret in anything written.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket

import aiohttp
import pytest

from tcproxy.emulator import EmulatorSettings
from tests.faults.checks import expect_error


async def test_upstream_refusing_connections_is_502(stack, logs):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = await stack(upstream_url=f"http://127.0.0.1:{port}")
    response = await s.complete()
    body = await expect_error(response, 502, "upstream_unreachable")
    assert f"127.0.0.1:{port}" in body["error"]["message"]


async def test_upstream_hanging_past_read_timeout_is_504(stack):
    s = await stack("upstream:\n  read_timeout: 0.3\n")
    response = await s.complete(headers={"X-Emulator-Fault": "hang"})
    await expect_error(response, 504, "upstream_timeout")


async def test_upstream_closing_before_headers_is_502(stack):
    s = await stack()
    response = await s.complete(headers={"X-Emulator-Fault": "close"})
    await expect_error(response, 502, "upstream_reset")


async def test_upstream_reset_mid_stream_ends_with_an_sse_error_event(stack, logs):
    s = await stack()
    response = await s.complete(
        max_tokens=10, stream=True, headers={"X-Emulator-Fault": "reset-mid-stream=3"}
    )
    assert response.status == 200
    text = (await response.read()).decode()
    assert text.count("data: {") == 4  # three tokens, then our error event
    assert "event: error" in text and "upstream_reset" in text
    assert "[DONE]" not in text
    line = (await logs.wait_requests(1))[-1]
    assert line["error"] == "upstream_reset"


async def test_upstream_reset_mid_body_truncates_the_client_response(stack):
    s = await stack()
    response = await s.complete(headers={"X-Emulator-Fault": "reset-mid-stream"})
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_long_stream_is_never_cut_by_a_total_timeout(stack):
    # No total timeout, only a per-read one: a stream that runs far longer than read_timeout,
    # with every gap shorter than it, arrives whole.
    s = await stack(
        "upstream:\n  read_timeout: 0.5\n", emulator=EmulatorSettings(stream_delay=0.15)
    )
    started = asyncio.get_running_loop().time()
    response = await s.complete(max_tokens=12, stream=True)
    text = (await response.read()).decode()
    assert asyncio.get_running_loop().time() - started > 1.5
    assert text.count("data: {") == 12 and text.endswith("data: [DONE]\n\n")


async def test_stall_between_events_past_read_timeout_ends_the_stream_with_an_error(stack):
    s = await stack("upstream:\n  read_timeout: 0.3\n")
    response = await s.complete(max_tokens=3, stream=True, headers={"X-Emulator-Fault": "stall=1"})
    text = (await response.read()).decode()
    assert "upstream_timeout" in text and "[DONE]" not in text


async def test_upstream_statuses_and_bodies_pass_through(stack):
    s = await stack()
    for fault, status in (("payment", 402), ("status=503", 503), ("status=500", 500)):
        response = await s.complete(headers={"X-Emulator-Fault": fault})
        assert response.status == status
        assert "X-TCProxy-Error" not in response.headers  # it is the upstream's answer
        assert "error" in await response.json()


async def test_upstream_garbage_body_is_relayed_unchanged(stack):
    s = await stack()
    response = await s.complete(headers={"X-Emulator-Fault": "garbage"})
    assert response.status == 200
    assert await response.read() == b"<html>not json at all"


async def test_gzip_response_relayed_as_sent_and_usage_still_counted(stack, logs):
    s = await stack()
    response = await s.session.post(
        f"{s.url}/v1/completions",
        json={"model": "gpt-4", "prompt": "hi", "max_tokens": 9},
        headers={"X-Emulator-Fault": "gzip", "Accept-Encoding": "gzip, br"},
        auto_decompress=False,
    )
    raw = await response.read()
    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(raw)
    assert json.loads(gzip.decompress(raw))["usage"]["completion_tokens"] == 9
    assert s.emulator.seen[-1]["Accept-Encoding"] == "gzip"  # br dropped: we could not read it
    assert (await logs.wait_requests(1))[-1]["completion_tokens"] == 9


async def test_upstream_redirect_is_never_followed(stack):
    s = await stack()
    response = await s.complete(headers={"X-Emulator-Fault": "redirect"})
    assert response.status == 502
    assert response.headers["X-TCProxy-Error"] == "upstream_redirect"
    assert "Location" not in response.headers
    assert s.emulator.requests == 1


async def test_upstream_401_becomes_502_upstream_auth_failed(stack, logs):
    s = await stack()
    response = await s.complete(headers={"X-Emulator-Fault": "unauthorized"})
    assert response.status == 502
    body = await response.json()
    assert body["error"]["code"] == "upstream_auth_failed"
    assert "tcproxy host" in body["error"]["message"]
    assert response.headers["X-TCProxy-Error"] == "upstream_auth_failed"


async def test_upstream_never_completing_the_connect_is_504(stack):
    # A listener whose accept queue is full: the kernel leaves further SYNs unanswered.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    port = blocker.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        s = await stack(
            "upstream:\n  connect_timeout: 0.5\n", upstream_url=f"http://127.0.0.1:{port}"
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await s.complete()
        body = await expect_error(response, 504, "upstream_timeout")
        assert "connect_timeout" in body["error"]["message"]
        assert loop.time() - started < 3
    finally:
        for filler in fillers:
            filler.close()
        blocker.close()


async def test_upstream_slow_headers_past_read_timeout_is_504_and_not_retried(stack):
    s = await stack("upstream:\n  read_timeout: 0.3\n")
    response = await s.complete(headers={"X-Emulator-Fault": "slow-headers=2"})
    body = await expect_error(response, 504, "upstream_timeout")
    assert "not retried" in body["error"]["message"]
    await asyncio.sleep(0.1)
    assert s.emulator.requests == 1


async def test_upstream_5xx_in_a_row_open_the_circuit_then_one_probe_closes_it(stack, logs):
    s = await stack("upstream:\n  circuit_breaker: {failures: 3, cooldown: 0.5}\n")
    for _ in range(3):
        assert (await s.complete(headers={"X-Emulator-Fault": "status=503"})).status == 503
    refused = await s.complete()  # fails fast: the upstream is not asked
    body = await expect_error(refused, 503, "circuit_open")
    assert "Retry-After" in refused.headers and "circuit_breaker" in body["error"]["message"]
    assert s.emulator.requests == 3
    status = await (await s.session.get(f"{s.url}/-/status")).json()
    assert status["open_circuits"] == {"gpt-4": "open"}
    assert (await s.complete(model="claude-2")).status == 200  # other models are unaffected
    await asyncio.sleep(0.6)
    assert (await s.complete()).status == 200  # the probe succeeds, the circuit closes
    assert (await s.complete()).status == 200
    events = [e["event"] for e in logs.events()]
    assert events.count("upstream keeps failing; circuit open, failing fast") == 1
    assert "upstream answers again; circuit closed" in events


async def test_upstream_connection_refused_repeatedly_opens_the_circuit(stack):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = await stack(
        "upstream:\n  circuit_breaker: {failures: 2, cooldown: 30}\n",
        upstream_url=f"http://127.0.0.1:{port}",
    )
    for _ in range(2):
        await expect_error(await s.complete(), 502, "upstream_unreachable")
    await expect_error(await s.complete(), 503, "circuit_open")


async def test_upstream_huge_body_is_cut_at_max_response_size(stack, logs):
    s = await stack("upstream:\n  max_response_size: 1MiB\n")
    response = await s.complete(headers={"X-Emulator-Fault": "huge=5000000"})
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    line = (await logs.wait_requests(1))[-1]
    assert line["error"] == "upstream_response_too_large"
    assert line["bytes_out"] <= 1024 * 1024


async def test_upstream_endless_body_is_cut_too(stack, logs):
    s = await stack("upstream:\n  max_response_size: 1MiB\n")
    response = await s.complete(headers={"X-Emulator-Fault": "endless"})
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)
    assert (await logs.wait_requests(1))[-1]["error"] == "upstream_response_too_large"
