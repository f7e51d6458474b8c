"""A circuit breaker per model: stop sending to an upstream that keeps failing, for a while.

After ``failures`` consecutive failures (5xx answers, connections refused, reset or timed out)
the breaker opens: requests for that model get 503 ``circuit_open`` with Retry-After at once,
without waiting in the queue or spending a slot. After ``cooldown`` seconds one request goes
through as a probe; its success closes the breaker, its failure opens it for another cooldown
(a probe that never reports back, its client gone, is replaced after a cooldown). Opening and
closing are logged once each.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from tcproxy.config.model import BreakerConfig
from tcproxy.errors import ServiceUnavailable

log = structlog.get_logger("tcproxy.breaker")


class Breaker:
    __slots__ = ("_clock", "_cooldown", "_failures", "_open_until", "_probe_since", "model")

    def __init__(self, model: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self._clock = clock
        self._failures = 0
        self._cooldown = 0.0
        self._open_until: float | None = None
        self._probe_since: float | None = None

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        return "half-open" if self._clock() >= self._open_until else "open"

    def check(self, *, send: bool) -> None:
        """Raise 503 while open. With ``send``, also take the single probe of a half-open breaker
        (or raise if another request is probing); without it (before queueing) only refuse
        during the cooldown itself."""
        if self._open_until is None:
            return
        now = self._clock()
        if now >= self._open_until:
            if not send:
                return
            if self._probe_since is None or now - self._probe_since > self._cooldown:
                self._probe_since = now
                return
        raise ServiceUnavailable(
            "circuit_open",
            f"the upstream failed repeatedly for model '{self.model}'; tcproxy is not sending"
            " it requests for a moment (upstream.circuit_breaker), retry shortly",
            retry_after=max(1.0, self._open_until - now),
        )

    def succeeded(self) -> None:
        if self._open_until is not None:
            log.info("upstream answers again; circuit closed", model=self.model)
        self._failures = 0
        self._open_until = None
        self._probe_since = None

    def failed(self, config: BreakerConfig) -> None:
        self._failures += 1
        self._probe_since = None
        if config.failures and self._failures >= config.failures:
            if self._open_until is None:
                log.warning(
                    "upstream keeps failing; circuit open, failing fast",
                    model=self.model,
                    failures=self._failures,
                    cooldown_s=config.cooldown,
                )
            self._cooldown = config.cooldown
            self._open_until = self._clock() + config.cooldown
