"""The reference: a bare aiohttp pass-through, about as little as a proxy can be.

    python bench/bare_proxy.py --port 9001 --upstream http://127.0.0.1:9000

One shared ClientSession; each request's body is read and sent on with its headers (minus
Host, Content-Length and hop-by-hop ones), and the answer streamed back as it arrives. No auth,
no queue, no logging, no metrics: the floor that tcproxy's features are measured against.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
}
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    url = request.app["upstream"] + request.rel_url.raw_path_qs
    async with request.app[SESSION].request(
        request.method, url, headers=headers, data=body
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(limit=0)
    )
    yield
    await app[SESSION].close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)  # as tcproxy: large prompts pass
    app["upstream"] = args.upstream
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
