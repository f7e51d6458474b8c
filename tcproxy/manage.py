"""Management endpoints: /-/healthy, /-/ready, /-/status.

Answers come from the state the running parts already keep; nothing here changes anything.
"""

from __future__ import annotations

import time

from aiohttp import web

from tcproxy import __version__
from tcproxy.state import STATE


async def healthy(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready to take traffic: listening, token loaded, not draining, upstream not known broken."""
    state = request.app[STATE]
    problems = []
    if state.draining:
        problems.append("shutting down")
    if state.upstream is None:
        problems.append("upstream session not open")
    if "upstream_auth_failed" in state.alarms.active():
        problems.append("the upstream refuses the stored token")
    status = 503 if problems else 200
    return web.json_response({"ready": not problems, "problems": problems}, status=status)


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    return web.json_response(
        {
            "version": __version__,
            "uptime_s": round(time.time() - state.started_at, 1),
            "listen": str(config.listen),
            "upstream": config.upstream.base_url,
            "draining": state.draining,
            "alarms": state.alarms.active(),
            "models": state.limiter.snapshot(),
        }
    )
