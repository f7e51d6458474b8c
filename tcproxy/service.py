"""Running as a service: start, reload, drain, and tell systemd about each.

Signals (handled on the running loop; a handler only queues the signal):
    SIGHUP            reload: re-read the config file and the token. Limits, queue settings,
                      timeouts, the token and the log level change in place; requests queued or
                      in flight carry on (a queue whose rpm changed keeps its waiters and follows
                      the new pace). An invalid config is logged and the running one stays.
                      ``listen``, ``server.keepalive_timeout`` and ``log.format`` need a restart.
    SIGTERM, SIGINT   drain, then exit 0:
                      1. stop accepting connections; new requests on open connections get 503;
                      2. queued requests keep their place and are released at the usual pace
                         while the drain lasts; those still waiting 2 s before
                         ``server.shutdown_timeout`` is over get 503 ``shutting_down`` with
                         Retry-After, so every accepted request gets an answer;
                      3. requests and streams in flight get until ``shutdown_timeout`` to finish;
                      4. the upstream session closes and the logs are flushed.

Start-up problems (a port in use, the pure-Python parser) raise ``StartupError`` with a message
that says what to do; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from tcproxy.app import build_app
from tcproxy.config import Config, ConfigInvalid, Secret, TokenError, resolve_token
from tcproxy.config.model import exposure_problem
from tcproxy.config.paths import ledger_path
from tcproxy.emulator import Emulator, EmulatorSettings
from tcproxy.errors import ServiceUnavailable
from tcproxy.log import LogControl
from tcproxy.pacing.urls import url_passwords
from tcproxy.server import Listening, PureParserRefused, listen, require_c_parser, tls_context
from tcproxy.state import STATE, State
from tcproxy.systemd import Notifier

log = structlog.get_logger("tcproxy.service")

_SHED_BEFORE_END = 2.0  # seconds before shutdown_timeout at which queued requests get their 503
_RESTART_ONLY = (
    "listen.host",
    "listen.port",
    "listen.tls",
    "server.keepalive_timeout",
    "log.format",
    "ledger",
    "limits.backend",
    "limits.redis_prefix",
    "limits.redis_timeout",
    "limits.instances",
    "limits.redis_fallback_share",
)


class StartupError(Exception):
    pass


async def start_emulator(
    settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0
) -> Listening:
    emulator = Emulator(settings)
    try:
        return await listen(emulator.app, host, port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def start_proxy(
    config: Config,
    token: Secret,
    *,
    ledger_path: Path | None = None,
    time_scale: float = 1.0,
    clock: Callable[[], float] = time.time,
    log_control: LogControl | None = None,
) -> Listening:
    try:
        require_c_parser()
    except PureParserRefused as exc:
        raise StartupError(str(exc)) from None
    problem = exposure_problem(config)
    if problem:
        raise StartupError(problem)
    tls = config.listen.tls
    context = None
    if tls is not None:
        try:
            context = tls_context(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"cannot load the TLS certificate or key (listen.tls): {exc}"
            ) from None
    lost = (lambda: log_control.sink.lost) if log_control is not None else None
    app = build_app(
        config,
        token,
        ledger_path=ledger_path,
        time_scale=time_scale,
        clock=clock,
        log_lines_lost=lost,
    )
    try:
        listening = await listen(
            app,
            config.listen.host,
            config.listen.port,
            keepalive_timeout=config.server.keepalive_timeout,
            shutdown_timeout=config.server.shutdown_timeout,
            ssl_context=context,
        )
    except OSError as exc:
        hint = " (is another tcproxy running?)" if exc.errno == 98 else ""
        raise StartupError(f"cannot listen on {config.listen}: {exc.strerror}{hint}") from None
    limits = config.limits
    log.info(
        "tcproxy listening",
        url=listening.url,
        clients=len(config.clients) or "none (loopback only, no keys)",
        ledger=str(ledger_path) if ledger_path else "off",
        upstream=config.upstream.base_url,
        limits={name: limit.rpm for name, limit in limits.models.items()},
        default_rpm=limits.default.rpm,
        queue_timeout_s=limits.queue_timeout,
    )
    return listening


@dataclasses.dataclass
class Source:
    """Where config and token come from, so a reload can read them again the same way."""

    load_config: Callable[[], Config]
    token: Secret | None = None  # fixed (serve --emulator); None: resolve from the config

    def read(self) -> tuple[Config, Secret, list[str]]:
        """Config, token and warnings; raises ConfigInvalid or TokenError."""
        config = self.load_config()
        if self.token is not None:
            return config, self.token, []
        resolved = resolve_token(config.upstream)
        return config, resolved.secret, resolved.warnings


class Service:
    def __init__(
        self,
        source: Source,
        log_control: LogControl,
        *,
        emulator: EmulatorSettings | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.source = source
        self.log_control = log_control
        self.emulator = emulator
        self.notifier = notifier or Notifier()
        self._emulator_url: str | None = None
        self._tls: ssl.SSLContext | None = None

    async def run(self, config: Config, token: Secret) -> None:
        """Serve until SIGTERM or SIGINT, reloading on SIGHUP."""
        upstream: Listening | None = None
        if self.emulator is not None:
            upstream = await start_emulator(self.emulator)
            self._emulator_url = upstream.url
            log.info(
                "built-in TokenCheap emulator answering offline; no balance is spent",
                url=upstream.url,
            )
        try:
            listening = await start_proxy(
                self._fixed(config),
                token,
                ledger_path=ledger_path(config.ledger),
                log_control=self.log_control,
            )
            self._tls = listening.tls_context
            await self._serve(listening)
        finally:
            if upstream is not None:
                await upstream.close()
        log.info("stopped")

    async def _serve(self, listening: Listening) -> None:
        state = listening.app[STATE]
        self.notifier.ready(f"listening on {listening.url}")
        watchdog = asyncio.create_task(self.notifier.keep_watchdog_fed())
        signals: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        for signum in handled:
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        try:
            while (received := await signals.get()) == signal.SIGHUP:
                try:
                    self.reload(state)
                except Exception as exc:  # a reload must never take the service down
                    log.error(
                        "reload failed; the running config stays in force",
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    self.notifier.ready("reload failed; running on the previous config")
            await self._drain(listening, state, signal.Signals(received).name)
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            watchdog.cancel()

    def reload(self, state: State) -> bool:
        """Re-read config and token; apply them, or keep the running ones if they are broken."""
        self.notifier.reloading()
        try:
            config, token, warnings = self.source.read()
        except (ConfigInvalid, TokenError) as exc:
            problems = (
                [str(p) for p in exc.problems] if isinstance(exc, ConfigInvalid) else [str(exc)]
            )
            log.error("reload rejected; the running config stays in force", problems=problems)
            self.notifier.ready("reload rejected; running on the previous config")
            return False
        for warning in warnings:
            log.warning(warning)
        config = self._fixed(config)
        running = state.config
        kept = [key for key in _RESTART_ONLY if _get(config, key) != _get(running, key)]
        if kept:
            log.warning("these settings change only on restart; kept as they are", keys=kept)
            config = _keep(config, running, kept)
        problem = exposure_problem(config)  # e.g. clients removed while still listening widely
        if problem:
            log.error("reload rejected; the running config stays in force", problems=[problem])
            self.notifier.ready("reload rejected; running on the previous config")
            return False
        if self._tls is not None and config.listen.tls is not None:
            try:  # renewed certificate files at the same paths are picked up
                self._tls.load_cert_chain(config.listen.tls.cert, config.listen.tls.key)
            except (OSError, ssl.SSLError) as exc:
                log.error("could not reload the TLS certificate; the old one stays", error=str(exc))
        register_secrets(self.log_control, config, token)
        state.apply(config, token)
        self.log_control.set_level(config.log.level)
        log.info(
            "config reloaded",
            limits={name: limit.rpm for name, limit in config.limits.models.items()},
            default_rpm=config.limits.default.rpm,
        )
        self.notifier.ready("config reloaded")
        return True

    async def _drain(self, listening: Listening, state: State, why: str) -> None:
        timeout = state.config.server.shutdown_timeout
        queued = state.limiter.queued()
        log.info(
            "draining: no new connections; requests in flight get time to finish",
            signal=why,
            queued=queued,
            shutdown_timeout_s=timeout,
        )
        self.notifier.stopping(f"draining ({queued} queued)")
        state.draining = True
        await listening.stop_accepting()
        shedder = asyncio.create_task(self._shed_later(state, max(0.0, timeout - _SHED_BEFORE_END)))
        try:
            await listening.close()  # waits up to shutdown_timeout for handlers, then cleans up
        finally:
            shedder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shedder

    async def _shed_later(self, state: State, delay: float) -> None:
        await asyncio.sleep(delay)
        error = ServiceUnavailable(
            "shutting_down",
            "tcproxy is shutting down and this request's turn did not come in time;"
            " it was not sent upstream, retry shortly",
            retry_after=5,
        )
        shed = state.limiter.shed(error)
        if shed:
            log.warning("answered queued requests with 503: the drain time ran out", count=shed)

    def _fixed(self, config: Config) -> Config:
        """The config as it runs: in front of the built-in emulator when there is one."""
        if self._emulator_url is None:
            return config
        upstream = dataclasses.replace(config.upstream, base_url=self._emulator_url)
        return dataclasses.replace(config, upstream=upstream)


async def until_stopped() -> None:
    """Return once SIGTERM or SIGINT arrives (for ``tcproxy emulate``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _get(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _keep(config: Config, running: Config, keys: list[str]) -> Config:
    for key in keys:
        section, _, name = key.partition(".")
        if not name:
            config = dataclasses.replace(config, **{section: getattr(running, section)})
        else:
            part = dataclasses.replace(getattr(config, section), **{name: _get(running, key)})
            config = dataclasses.replace(config, **{section: part})
    return config


def register_secrets(log_control: LogControl, config: Config, token: Secret) -> None:
    """Everything that must never be printed, for the log's last-line mask."""
    log_control.add_secret(token.reveal())
    for password in url_passwords(config.limits.backend):
        log_control.add_secret(password)


def emulator_token() -> str:
    """A fresh token for ``serve --emulator``: the emulator checks the proxy really injects it."""
    return "tc-emulated-" + secrets.token_urlsafe(24)
