"""The floor for bench/waiters.py: a bare aiohttp server whose handler reads the body and waits.

    python bench/hold_server.py --port 9002

Holds every ``/v1/*`` request until its client hangs up, and answers ``/-/healthy`` and
``/-/status`` (how many are held, in tcproxy's shape), so waiters.py measures it exactly as it
measures tcproxy: what aiohttp itself costs per waiting request, before any feature.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

HELD = web.AppKey("held", list)


async def hold(request: web.Request) -> web.Response:
    await request.read()
    request.app[HELD][0] += 1
    try:
        # A bare future, the least a waiting handler can hold (an Event would add a deque);
        # it is never set: the client hangs up and aiohttp cancels the handler.
        await asyncio.get_running_loop().create_future()
    finally:
        request.app[HELD][0] -= 1
    raise AssertionError("unreachable")


async def status(request: web.Request) -> web.Response:
    return web.json_response({"models": {"gpt-4": {"queue_depth": request.app[HELD][0]}}})


async def healthy(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[HELD] = [0]
    app.router.add_route("*", "/v1/{tail:.*}", hold)
    app.router.add_get("/-/status", status)
    app.router.add_get("/-/healthy", healthy)
    # As tcproxy serves: a client that hangs up cancels its handler.
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        keepalive_timeout=3600,
    )
