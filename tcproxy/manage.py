"""Management endpoints: /-/healthy, /-/ready, /-/status, /metrics.

Answers come from the state the running parts already keep; nothing here changes anything.
"""

from __future__ import annotations

import time

from aiohttp import web

from tcproxy import __version__
from tcproxy.access import check_management
from tcproxy.metrics import CONTENT_TYPE_LATEST, METRICS
from tcproxy.state import STATE


async def healthy(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready for traffic: listening, not draining, the upstream reachable when last tried."""
    state = request.app[STATE]
    problems = []
    if state.draining:
        problems.append("shutting down")
    if state.upstream is None:
        problems.append("the upstream session is not open")
    elif state.upstream.reachable is False:
        problems.append("the upstream could not be reached on the last attempt")
    if "upstream_auth_failed" in state.alarms.active():
        problems.append("the upstream refuses the stored token")
    return web.json_response(
        {"ready": not problems, "problems": problems}, status=503 if problems else 200
    )


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    check_management(request, config.management)
    return web.json_response(
        {
            "version": __version__,
            "uptime_s": round(time.time() - state.started_at, 1),
            "listen": str(config.listen),
            "upstream": config.upstream.base_url,
            **state.snapshot(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    check_management(request, request.app[STATE].config.management)
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
