"""A fast stand-in for the upstream: fixed answers, no pacing, no work.

    python bench/upstream.py --port 9000

POST with ``"stream": true`` in the body gets an SSE answer whose first event leaves at once
(then four more, a millisecond apart); anything else gets a fixed completion with ``usage``.
Built on aiohttp's low-level server, so its own cost stays small next to a proxy's.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

COMPLETION = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": "gpt-4",
        "choices": [
            {"text": " fast" * 16, "index": 0, "logprobs": None, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20},
    }
).encode()
EVENT = b'data: {"choices":[{"text":" fast","index":0,"finish_reason":null}]}\n\n'
LAST = (
    b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":5,"total_tokens":9}}\n\n'
)


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.content.read()  # no size cap: bench/large.py sends 10 MiB prompts
    if b'"stream": true' not in body and b'"stream":true' not in body:
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(EVENT)
    for _ in range(4):
        await asyncio.sleep(0.001)
        await response.write(EVENT)
    await response.write(LAST + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def main(port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
