"""Forwarding through the real proxy to the real emulator: what clients see, what upstream gets."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import openai
import pytest
import requests

from tcproxy.emulator import EmulatorSettings
from tests.conftest import UPSTREAM_TOKEN
from tests.rawhttp import raw_request

DOC_BODY = {"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 100}


async def test_documented_python_requests_example(stack):
    s = await stack()

    def documented_example():
        # tokencheap-api.md's Python example, with only the URL changed.
        response = requests.post(
            f"{s.url}/v1/completions",
            headers={"Authorization": "Bearer your-token-here", "Content-Type": "application/json"},
            json=DOC_BODY,
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    data = await asyncio.to_thread(documented_example)
    assert data["object"] == "text_completion"
    assert len(data["choices"][0]["text"].split()) == 100
    assert data["usage"]["completion_tokens"] == 100
    assert s.emulator.seen[-1]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"


async def test_documented_curl_example(stack):
    s = await stack()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", "-X", "POST", f"{s.url}/v1/completions",
        "-H", "Authorization: Bearer your-token-here",
        "-H", "Content-Type: application/json",
        "-d", json.dumps(DOC_BODY),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert json.loads(out)["usage"]["total_tokens"] > 100


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_documented_javascript_fetch_example(stack):
    s = await stack()
    script = """
    const response = await fetch(process.argv[1], {
      method: 'POST',
      headers: {'Authorization': 'Bearer your-token-here', 'Content-Type': 'application/json'},
      body: JSON.stringify({model: 'gpt-4', prompt: 'Hello, world!', max_tokens: 100}),
    });
    if (!response.ok) { throw new Error('HTTP ' + response.status); }
    console.log(JSON.stringify(await response.json()));
    """
    proc = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e", script, f"{s.url}/v1/completions",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert json.loads(out)["choices"][0]["finish_reason"] == "length"


async def test_fetch_equivalent_with_aiohttp(stack):
    s = await stack()
    response = await s.post(json=DOC_BODY, headers={"Authorization": "Bearer your-token-here"})
    assert response.ok
    assert (await response.json())["usage"]["prompt_tokens"] == 2


async def test_openai_sdk_completions_and_chat(stack):
    s = await stack()
    client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="not-the-real-key", max_retries=0)
    completion = await client.completions.create(model="gpt-4", prompt="Say hi", max_tokens=7)
    assert completion.usage.completion_tokens == 7
    chat = await client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.choices[0].message.content
    assert all(h["Authorization"] == f"Bearer {UPSTREAM_TOKEN}" for h in s.emulator.seen)
    await client.close()


async def test_openai_sdk_streaming(stack, logs):
    s = await stack()
    client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
    stream = await client.completions.create(
        model="gpt-4", prompt="Tell a story", max_tokens=6, stream=True
    )
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len(pieces) == 6
    await client.close()
    line = (await logs.wait_requests(1))[-1]
    assert line["stream"] is True
    assert line["completion_tokens"] == 6  # usage read from the final chunk


async def test_stream_reaches_client_chunk_by_chunk(stack):
    s = await stack(emulator=EmulatorSettings(stream_delay=0.1))
    response = await s.complete(max_tokens=5, stream=True)
    arrivals = []
    async for chunk in response.content.iter_any():
        if b"data:" in chunk:
            arrivals.append(time.monotonic())
    # Six events (five tokens and [DONE]) spaced 0.1 s at the source arrive spread out, not in
    # one lump at the end.
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.35


async def test_authorization_replaced_and_hop_by_hop_headers_dropped(stack):
    s = await stack()
    body = json.dumps({"model": "gpt-4", "prompt": "x"}).encode()
    status, headers, _ = await raw_request(
        s.proxy.port,
        "POST /v1/completions?user=alice&x=%20y HTTP/1.1\r\n"
        "Host: localhost\r\n"
        "Authorization: Bearer client-own-key\r\n"
        "Connection: keep-alive, X-Per-Hop\r\n"
        "X-Per-Hop: must-not-pass\r\n"
        "Keep-Alive: timeout=5\r\n"
        "Proxy-Authorization: Basic abc\r\n"
        "TE: trailers\r\n"
        "X-Request-Id: client-chosen-id-1\r\n"
        "X-Custom: passes\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n",
        body,
    )
    assert status == 200
    assert headers["x-request-id"] == "client-chosen-id-1"
    seen = s.emulator.seen[-1]
    assert seen["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert seen["X-Custom"] == "passes"
    assert seen["X-Request-Id"] == "client-chosen-id-1"
    for gone in ("X-Per-Hop", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert gone not in seen
    assert seen["Host"].startswith("127.0.0.1:")


async def test_query_string_and_get_without_model(stack):
    s = await stack()
    response = await s.session.get(f"{s.url}/v1/models?limit=5")
    assert response.status == 200
    assert {m["id"] for m in (await response.json())["data"]} >= {"gpt-4", "claude-2"}


async def test_every_response_carries_request_id_and_queue_ms(stack):
    s = await stack()
    for response in (
        await s.complete(),
        await s.session.get(f"{s.url}/-/healthy"),
        await s.session.get(f"{s.url}/nowhere"),
        await s.post(data=b"{broken"),
    ):
        assert len(response.headers["X-Request-Id"]) >= 16
        assert response.headers["X-TCProxy-Queue-Ms"].isdigit()


async def test_a_large_prompt_reaches_the_upstream_whole(stack):
    s = await stack()
    words = [f"w{i}" for i in range(400_000)]  # about 3 MiB: it arrives in many pieces
    body = {"model": "gpt-4", "prompt": " ".join(words), "max_tokens": 1, "stream": False}
    response = await s.session.post(f"{s.url}/v1/completions", json=body)
    assert response.status == 200
    # The emulator counts the words of the prompt it received: every byte made it across.
    assert (await response.json())["usage"]["prompt_tokens"] == len(words)
