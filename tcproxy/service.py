"""Running as a service: start, say where we listen, stop cleanly on a signal.

Signals (installed on the running loop; nothing happens in a signal handler but setting state):
    SIGTERM, SIGINT   drain: stop accepting, let in-flight requests finish (shutdown_timeout), exit 0

Start-up problems (a port in use, the pure-Python parser) raise ``StartupError`` with a message
that says what to do; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import signal

import structlog

from tcproxy.app import build_app
from tcproxy.config import Config, Secret
from tcproxy.emulator import Emulator, EmulatorSettings
from tcproxy.server import Listening, PureParserRefused, listen, require_c_parser
from tcproxy.state import STATE

log = structlog.get_logger("tcproxy.service")


class StartupError(Exception):
    pass


async def start_emulator(settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0) -> Listening:
    emulator = Emulator(settings)
    try:
        return await listen(emulator.app, host, port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def start_proxy(config: Config, token: Secret, *, time_scale: float = 1.0) -> Listening:
    try:
        require_c_parser()
    except PureParserRefused as exc:
        raise StartupError(str(exc)) from None
    app = build_app(config, token, time_scale=time_scale)
    try:
        listening = await listen(
            app,
            config.listen.host,
            config.listen.port,
            keepalive_timeout=config.server.keepalive_timeout,
            shutdown_timeout=config.server.shutdown_timeout,
        )
    except OSError as exc:
        hint = " (is another tcproxy running?)" if exc.errno == 98 else ""
        raise StartupError(f"cannot listen on {config.listen}: {exc.strerror}{hint}") from None
    limits = config.limits
    log.info(
        "tcproxy listening",
        url=listening.url,
        upstream=config.upstream.base_url,
        limits={name: limit.rpm for name, limit in limits.models.items()},
        default_rpm=limits.default.rpm,
        queue_timeout_s=limits.queue_timeout,
    )
    return listening


async def serve(config: Config, token: Secret, *, emulator: EmulatorSettings | None = None) -> None:
    """Run the proxy (and, with ``emulator``, an emulated upstream beside it) until a signal."""
    upstream: Listening | None = None
    if emulator is not None:
        upstream = await start_emulator(emulator)
        config = dataclasses.replace(
            config, upstream=dataclasses.replace(config.upstream, base_url=upstream.url)
        )
        log.info(
            "built-in TokenCheap emulator answering offline; no balance is spent",
            url=upstream.url,
        )
    try:
        listening = await start_proxy(config, token)
    except BaseException:
        if upstream is not None:
            await upstream.close()
        raise
    try:
        await until_stopped()
        log.info("stopping: no new connections; letting requests in flight finish")
        listening.app[STATE].draining = True
        await listening.close()
    finally:
        if upstream is not None:
            await upstream.close()
    log.info("stopped")


async def until_stopped() -> None:
    """Return once SIGTERM or SIGINT arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def emulator_token() -> str:
    """A fresh token for ``serve --emulator``: the emulator checks the proxy really injects it."""
    return "tc-emulated-" + secrets.token_urlsafe(24)
