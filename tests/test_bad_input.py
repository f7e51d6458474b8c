"""Bad input from clients and broken upstreams: a clear error, a log line, no crash, no token."""

from __future__ import annotations

import asyncio
import json

import pytest

from tcproxy.emulator import EmulatorSettings
from tests.conftest import UPSTREAM_TOKEN
from tests.rawhttp import raw_request


async def expect_error(response, status: int, code: str) -> dict:
    assert response.status == status, await response.text()
    assert response.headers["X-TCProxy-Error"] == code
    body = await response.json()
    assert body["error"]["code"] == code
    assert body["error"]["type"]
    assert len(body["error"]["message"]) > 20  # says what to fix
    return body


@pytest.mark.parametrize(
    ("body", "code", "hint"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"[1, 2, 3]", "invalid_body", "must be a JSON object, got an array"),
        (b'"just a string"', "invalid_body", "got a string"),
        (b"", "invalid_body", "empty"),
        (b'{"prompt": "hi"}', "model_missing", '"model"'),
        (b'{"model": 4, "prompt": "hi"}', "invalid_model", "got a number"),
        (b'{"model": null}', "invalid_model", "got null"),
        (b'{"model": ""}', "invalid_model", "1-200"),
        (b"\xff\xfe{}", "invalid_json", "JSON"),
    ],
)
async def test_bad_bodies_are_400_and_never_reach_upstream(stack, logs, body, code, hint):
    s = await stack()
    response = await s.post(data=body, headers={"Content-Type": "application/json"})
    payload = await expect_error(response, 400, code)
    assert hint in payload["error"]["message"]
    assert s.emulator.requests == 0
    line = (await logs.wait_requests(1))[-1]
    assert line["status"] == 400 and line["error"] == code


async def test_body_over_the_limit_is_413_json_and_upstream_not_called(stack):
    s = await stack("server:\n  max_body_size: 64KiB\n")
    big = json.dumps({"model": "gpt-4", "prompt": "x" * 70_000}).encode()
    response = await s.post(data=big)
    body = await expect_error(response, 413, "body_too_large")
    assert "64 KiB" in body["error"]["message"]
    assert s.emulator.requests == 0


async def test_chunked_body_over_the_limit_is_413(stack):
    s = await stack("server:\n  max_body_size: 64KiB\n")

    async def chunks():
        for _ in range(40):
            yield b"x" * 4096

    response = await s.post(data=chunks())
    await expect_error(response, 413, "body_too_large")
    assert s.emulator.requests == 0


async def test_compressed_body_is_inflated_then_bounded(stack):
    import gzip

    s = await stack("server:\n  max_body_size: 64KiB\n")
    bomb = gzip.compress(b'{"model": "gpt-4", "prompt": "' + b"a" * 5_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    response = await s.post(data=bomb, headers={"Content-Encoding": "gzip"})
    await expect_error(response, 413, "body_too_large")
    small = gzip.compress(json.dumps({"model": "gpt-4", "prompt": "hi"}).encode())
    response = await s.post(
        data=small, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert response.status == 200
    assert "Content-Encoding" not in s.emulator.seen[-1]  # the upstream got the plain body


@pytest.mark.parametrize("path", ["/admin", "/v2/completions", "/", "/metrics-typo"])
async def test_unknown_paths_are_404(stack, path):
    s = await stack()
    response = await s.session.get(s.url + path)
    body = await expect_error(response, 404, "unknown_path")
    assert "/v1/" in body["error"]["message"]


@pytest.mark.parametrize(
    "target",
    ["/v1/../admin", "/v1/%2e%2e/admin", "/v1//completions", "/v1/a%2Fb", "/v1/./completions"],
)
async def test_path_tricks_are_refused(stack, target):
    s = await stack()
    status, _, body = await raw_request(s.proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 404)
    assert json.loads(body)["error"]["code"] in ("bad_path", "unknown_path")
    assert s.emulator.requests == 0


async def test_absolute_form_target_is_refused(stack):
    s = await stack()
    status, _, body = await raw_request(
        s.proxy.port, "GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    )
    assert status == 400
    assert "not a forward proxy" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    "bad_header",
    ["X-Evil: a\rb", "X-Evil: a\x00b", "Bad Name: x"],
)
async def test_malformed_headers_get_json_400(stack, logs, bad_header):
    s = await stack()
    status, headers, body = await raw_request(
        s.proxy.port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{bad_header}\r\n\r\n"
    )
    assert status == 400
    assert headers["x-tcproxy-error"] == "bad_http"
    assert json.loads(body)["error"]["code"] == "bad_http"
    assert logs.events("rejected malformed HTTP request")
    assert s.emulator.requests == 0


async def test_smuggling_shapes_are_refused(stack):
    s = await stack()
    body = b'{"model": "gpt-4"}'
    for framing in (
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n",
        f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 5}\r\n",
    ):
        status, _, _ = await raw_request(
            s.proxy.port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{framing}\r\n", body
        )
        assert status == 400
    assert s.emulator.requests == 0


async def test_trickled_body_gets_408(stack):
    s = await stack("server:\n  body_timeout: 0.5\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    from tests.rawhttp import read_response

    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 408
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert s.emulator.requests == 0


async def test_client_closing_mid_request_is_logged_and_harmless(stack, logs):
    s = await stack()
    _, writer = await asyncio.open_connection("127.0.0.1", s.proxy.port)
    writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"mo')
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    lines = await logs.wait_requests(1)
    assert lines[-1]["status"] in (400, 499)
    assert s.emulator.requests == 0
    response = await s.complete()  # and the proxy carries on
    assert response.status == 200


async def test_upstream_refusing_connections_is_502(stack, logs):
    import socket

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
    import aiohttp

    s = await stack()
    response = await s.complete(headers={"X-Emulator-Fault": "reset-mid-stream"})
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_no_token_in_any_error_answer(stack, logs):
    s = await stack()
    answers = []
    for fault in ("unauthorized", "redirect", "close", "status=500", "garbage"):
        response = await s.complete(headers={"X-Emulator-Fault": fault})
        answers.append(str(response.headers) + await response.text())
    answers.append(await (await s.post(data=b"{")).text())
    everything = "".join(answers) + logs.text()
    assert UPSTREAM_TOKEN not in everything


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


async def test_idle_and_slow_header_connections_are_closed(stack):
    s = await stack("server:\n  keepalive_timeout: 0.5\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy.port)
    writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finish
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()
