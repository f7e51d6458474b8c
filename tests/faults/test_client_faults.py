"""Faults and bad input from clients: each test is named after what it sends.

Every case ends with a clear answer (or a closed connection), a log line, nothing sent upstream
that should not be, and — checked by the ``stack`` fixture — no secret in anything written.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from tcproxy.emulator import EmulatorSettings
from tests.faults.checks import expect_error
from tests.rawhttp import raw_request, read_response


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


async def test_idle_and_slow_header_connections_are_closed(stack):
    s = await stack("server:\n  keepalive_timeout: 0.5\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy.port)
    writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finish
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()


@pytest.mark.parametrize(
    ("body", "field", "kind"),
    [
        (b'{"model": "gpt-4", "stream": "yes"}', '"stream"', "got a string"),
        (b'{"model": "gpt-4", "stream": 1}', '"stream"', "got a number"),
        (b'{"model": ["gpt-4"]}', '"model"', "got an array"),
        (b'{"model": {"name": "gpt-4"}}', '"model"', "got an object"),
    ],
)
async def test_wrong_field_types_name_the_field(stack, body, field, kind):
    s = await stack()
    response = await s.post(data=body)
    message = (await expect_error(response, 400, (await response.json())["error"]["code"]))[
        "error"
    ]["message"]
    assert field in message and kind in message
    assert s.emulator.requests == 0


@pytest.mark.parametrize(
    "host_headers",
    ["Host: evil.example\r\n", "Host: a\r\nHost: b\r\n", "Host: \r\n", ""],
)
async def test_odd_or_duplicate_host_never_steers_the_request(stack, host_headers):
    s = await stack()
    body = b'{"model": "gpt-4", "prompt": "hi"}'
    status, _, _ = await raw_request(
        s.proxy.port,
        f"POST /v1/completions HTTP/1.1\r\n{host_headers}Content-Length: {len(body)}\r\n\r\n",
        body,
    )
    assert status in (200, 400)  # aiohttp refuses some shapes outright; none goes elsewhere
    for seen in s.emulator.seen:
        assert seen["Host"] == s.upstream.url.removeprefix("http://")


async def test_body_fields_naming_other_hosts_are_never_followed(stack):
    # A listener standing in for "elsewhere": it must never hear from the proxy.
    heard: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    other = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        s = await stack()
        body = {
            "model": "gpt-4",
            "prompt": "hi",
            "api_base": other,
            "base_url": other + "/v1",
            "extra": {"callback": other, "urls": [other, "http://169.254.169.254/latest"]},
        }
        response = await s.post(
            json=body, headers={"X-Forwarded-Host": "127.0.0.1", "Referer": other}
        )
        assert response.status == 200
        await asyncio.sleep(0.2)
        assert heard == []
        assert s.emulator.requests == 1
    finally:
        server.close()


async def test_client_leaving_mid_stream_cancels_the_upstream_request(stack, logs):
    s = await stack(emulator=EmulatorSettings(stream_delay=0.1))
    response = await s.complete(max_tokens=100, stream=True)
    await response.content.readuntil(b"\n\n")  # the first event arrived
    assert s.emulator.in_flight == 1
    response.close()  # the client hangs up
    for _ in range(20):
        if s.emulator.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert s.emulator.in_flight == 0 and s.emulator.cancelled == 1  # within a second
    line = (await logs.wait_requests(1))[-1]
    assert line["status"] == 499 and line["stream_events"] >= 1


async def test_pipelining_flood_on_one_connection_is_served_in_order(stack):
    s = await stack()
    count = 2000
    reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy.port)
    one = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(one * count)  # all at once, without reading a single answer
    await writer.drain()
    statuses = []
    async with asyncio.timeout(30):
        for _ in range(count):
            status, _, _ = await read_response(reader)
            statuses.append(status)
    writer.close()
    assert statuses == [200] * count
    response = await s.session.get(f"{s.url}/-/healthy")  # and the proxy still answers others
    assert response.status == 200


async def test_body_whose_content_encoding_lies_is_400(stack):
    s = await stack()
    status, _, body = await raw_request(
        s.proxy.port,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
        "Content-Length: 12\r\n\r\n",
        b"not gzip at all"[:12],
    )
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_body_encoding"
    assert s.emulator.requests == 0
