"""``build_app(config, token)``: routes, middleware, and the parts the application owns.

Wiring only. Long-lived parts are opened in the running loop by cleanup contexts and closed
after their ``yield``, in reverse order; nothing is opened at import or in ``build_app``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from tcproxy import manage, middleware, proxy
from tcproxy.clients import ClientTable
from tcproxy.config import Config, Secret
from tcproxy.housekeeping import keep_house
from tcproxy.ledger import Ledger
from tcproxy.metrics import METRICS, Metrics
from tcproxy.pacing import Limiter
from tcproxy.quotas import Budgets
from tcproxy.state import STATE, State
from tcproxy.upstream import Upstream


def build_app(
    config: Config,
    token: Secret,
    *,
    ledger_path: Path | None = None,
    time_scale: float = 1.0,
    clock: Callable[[], float] = time.time,
    log_lines_lost: Callable[[], int] | None = None,
) -> web.Application:
    """The proxy application.

    ``ledger_path``: where the usage ledger lives (None: no ledger). ``time_scale`` > 1 makes a
    pacing minute pass faster and ``clock`` is the wall clock of the budgets (tests move both).
    """
    app = web.Application(
        middlewares=[middleware.observe],
        # Bodies are read by incoming.read_body against the live config; this is a backstop.
        client_max_size=config.server.max_body_size,
    )
    state = app[STATE] = State(
        config=config,
        token=token,
        limiter=Limiter(config.limits, time_scale=time_scale),
        clients=ClientTable(config.clients),
        budgets=Budgets(clock),
        time_scale=time_scale,
        ledger=Ledger(ledger_path) if ledger_path is not None else None,
    )
    if log_lines_lost is not None:
        state.log_lines_lost = log_lines_lost
    metrics = app[METRICS] = Metrics(state.snapshot, lambda: state.config.limits.models)
    state.observers += [metrics.observe, state.count_usage]
    if state.ledger is not None:
        state.observers.append(state.ledger.record)
        app.cleanup_ctx.append(_ledger)
    if config.limits.backend != "memory":
        app.cleanup_ctx.append(_shared_pacing)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(keep_house)
    app.router.add_route("*", "/v1/{tail:.*}", proxy.handle)
    app.router.add_get("/-/healthy", manage.healthy)
    app.router.add_get("/-/ready", manage.ready)
    app.router.add_get("/-/status", manage.status)
    app.router.add_get("/metrics", manage.metrics)
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    upstream = state.upstream = Upstream(state.config.upstream)
    yield
    state.upstream = None
    upstream.close()


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    ledger = state.ledger
    assert ledger is not None
    remembered = await asyncio.to_thread(ledger.open)
    state.budgets.load(remembered.today, remembered.this_month)  # budgets survive a restart
    # So does the pacing: a restart within a minute must not open a fresh minute's budget.
    state.limiter.remember(remembered.recent_releases)
    yield
    await asyncio.to_thread(ledger.close)  # writes every row still queued


async def _shared_pacing(app: web.Application) -> AsyncIterator[None]:
    from tcproxy.pacing.shared import RedisBackend  # redis-py only when Redis is configured

    state = app[STATE]
    limits = state.config.limits
    backend = RedisBackend(
        limits.backend,
        prefix=limits.redis_prefix,
        timeout=limits.redis_timeout,
        fallback_share=limits.fallback_share,
    )
    await backend.start()  # an unreachable Redis is logged and paced around, never fatal
    state.limiter.backend = backend
    yield
    await backend.close()


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    yield
    app[STATE].limiter.close()
