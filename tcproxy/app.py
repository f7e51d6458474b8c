"""``build_app(config, token)``: routes, middleware, and the parts the application owns.

Wiring only. Long-lived parts are opened in the running loop by cleanup contexts and closed
after their ``yield``, in reverse order; nothing is opened at import or in ``build_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from tcproxy import manage, middleware, proxy
from tcproxy.config import Config, Secret
from tcproxy.metrics import METRICS, Metrics
from tcproxy.pacing import Limiter
from tcproxy.state import STATE, State
from tcproxy.upstream import Upstream, make_session


def build_app(
    config: Config,
    token: Secret,
    *,
    time_scale: float = 1.0,
    log_lines_lost: Callable[[], int] | None = None,
) -> web.Application:
    """The proxy application. ``time_scale`` > 1 makes a pacing minute pass faster (tests)."""
    app = web.Application(
        middlewares=[middleware.observe],
        # Bodies are read by incoming.read_body against the live config; this is a backstop.
        client_max_size=config.server.max_body_size,
    )
    state = app[STATE] = State(
        config=config,
        token=token,
        limiter=Limiter(config.limits, time_scale=time_scale),
        time_scale=time_scale,
    )
    if log_lines_lost is not None:
        state.log_lines_lost = log_lines_lost
    metrics = app[METRICS] = Metrics(state.snapshot, lambda: set(state.config.limits.models))
    state.observers.append(metrics.observe)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_limiter)
    app.on_response_prepare.append(middleware.stamp_headers)
    app.router.add_get("/-/healthy", manage.healthy)
    app.router.add_get("/-/ready", manage.ready)
    app.router.add_get("/-/status", manage.status)
    app.router.add_get("/metrics", manage.metrics)
    app.router.add_route("*", "/v1/{tail:.*}", proxy.handle)
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    session = make_session()
    state.upstream = Upstream(state.config.upstream, session)
    yield
    state.upstream = None
    await session.close()


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    yield
    app[STATE].limiter.close()
