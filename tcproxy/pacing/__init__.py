"""Pacing: per-model queues and the pacers behind them. Knows nothing of HTTP.

    limiter = Limiter(config.limits)
    await limiter.queue("gpt-4").wait_turn(client="-", timeout=600)

``pacer`` holds the release rules, ``shared`` the same rules kept in Redis for several
instances, ``queue`` the fair waiting line. This module keeps one queue per model (and one per
rpm-capped client), follows config reloads, and reports their state.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from tcproxy.config.model import ClientConfig, LimitsConfig, ModelLimit
from tcproxy.pacing.pacer import MINUTE, Pacer
from tcproxy.pacing.queue import ModelQueue, SlotSource

if TYPE_CHECKING:  # redis-py is imported only when Redis is configured (it costs 6 MiB)
    from tcproxy.pacing.shared import RedisBackend

__all__ = ["Limiter", "ModelQueue", "Pacer"]

# Models not in the config each get a queue of their own on first use. Past this many, idle
# ones are forgotten; if that is not enough, further unlisted models share one queue at the
# default pace (slower, never faster), so a client inventing model names cannot grow memory or
# multiply the pace without bound.
_MAX_UNLISTED_QUEUES = 256
OTHER_MODELS = "(other models)"


def model_key(model: str) -> str:
    """Models are paced by name without case or surrounding spaces: "GPT-4 " is gpt-4, so
    spelling a name differently never buys a second budget."""
    return model.strip().lower()


class Limiter:
    def __init__(
        self,
        limits: LimitsConfig,
        *,
        time_scale: float = 1.0,
        backend: RedisBackend | None = None,
    ) -> None:
        self._limits = limits
        # time_scale > 1 runs the minute faster (tests, emulation): the window shrinks by it.
        self.time_scale = time_scale
        self.backend = backend  # None: pacing in this process only
        self._queues: dict[str, ModelQueue] = {}
        self._refusals: dict[str, int] = {}  # upstream 429s seen, per model
        self._client_queues: dict[str, ModelQueue] = {}
        self._closed: Exception | None = None

    @property
    def window(self) -> float:
        return MINUTE / self.time_scale

    @property
    def limits(self) -> LimitsConfig:
        return self._limits

    def queue(self, model: str) -> ModelQueue:
        model = model_key(model)
        queue = self._queues.get(model)
        if queue is None:
            unlisted = model not in self._limits.models and model != OTHER_MODELS
            if unlisted and self._unlisted() >= _MAX_UNLISTED_QUEUES:
                self._forget_idle()
                if self._unlisted() >= _MAX_UNLISTED_QUEUES:
                    return self.queue(OTHER_MODELS)
            limit, margin = self._limits.for_model(model), self._limits.safety_margin
            pacer: SlotSource
            if self.backend is not None:
                from tcproxy.pacing.shared import RedisPacer

                pacer = RedisPacer(self.backend, model, limit, margin, self.window)
            else:
                pacer = Pacer(limit, margin, self.window)
            queue = self._queues[model] = ModelQueue(model, pacer, self._limits.max_queue)
            queue.closed = self._closed
        return queue

    def client_queue(self, client: ClientConfig) -> ModelQueue | None:
        """The line in front of a client's rpm cap (``clients.NAME.rpm``), if it has one.

        Caps are per instance: a client talks to its own tcproxy.
        """
        if client.rpm is None:
            return None
        limit = ModelLimit(rpm=client.rpm)
        margin = self._limits.safety_margin
        queue = self._client_queues.get(client.name)
        if queue is None:
            label = f"client '{client.name}' (clients.{client.name}.rpm: {client.rpm})"
            pacer = Pacer(limit, margin, self.window)
            queue = ModelQueue(client.name, pacer, self._limits.max_queue, label)
            queue.closed = self._closed
            self._client_queues[client.name] = queue
        else:
            queue.pacer.update(limit, margin, self.window)  # follows a reloaded cap
        return queue

    def update(self, limits: LimitsConfig) -> None:
        """Follow a reloaded config; waiters keep their place and follow the new pace."""
        self._limits = limits
        for model, queue in self._queues.items():
            queue.max_queue = limits.max_queue
            queue.pacer.update(limits.for_model(model), limits.safety_margin, self.window)

    def remember(self, releases: list[tuple[str, float, int]]) -> None:
        """Count releases made before a restart (model, unix time, how many): their window
        still runs.

        Shared pacing keeps its own record in Redis, so this is for in-process pacing only.
        """
        if self.backend is not None or not releases:
            return
        offset = asyncio.get_running_loop().time() - time.time()  # wall clock to loop clock
        by_model: dict[str, list[tuple[float, int]]] = {}
        for name, at, count in releases:
            by_model.setdefault(model_key(name), []).append((at + offset, count))
        for model, times in by_model.items():
            pacer = self.queue(model).pacer
            assert isinstance(pacer, Pacer)
            for at, count in sorted(times):
                pacer.note_release(at, count)
            pacer.precharge()  # and no fresh burst either

    def _unlisted(self) -> int:
        listed = self._limits.models
        return sum(1 for model in self._queues if model not in listed and model != OTHER_MODELS)

    def note_refusal(self, model: str) -> None:
        self._refusals[model] = self._refusals.get(model, 0) + 1

    def _forget_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        keep = {*self._limits.models, OTHER_MODELS}
        for model in [m for m, q in self._queues.items() if q.depth == 0 and m not in keep]:
            if self._queues[model].pacer.is_idle(now):
                del self._queues[model]

    def _all_queues(self) -> list[ModelQueue]:
        return [*self._queues.values(), *self._client_queues.values()]

    def shed(self, error: Exception) -> int:
        """Answer every waiting request with ``error``, and every later one (queues made after
        this too); returns how many were waiting."""
        self._closed = error
        return sum(queue.shed(error) for queue in self._all_queues())

    def queued(self) -> int:
        return sum(queue.depth for queue in self._all_queues())

    def close(self) -> None:
        for queue in self._all_queues():
            queue.close()

    @property
    def mode(self) -> str:
        """memory, redis, or local fallback (Redis configured but not answering)."""
        return "memory" if self.backend is None else self.backend.mode

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-model state for /-/status and /metrics."""
        now = asyncio.get_running_loop().time()
        models: dict[str, dict[str, Any]] = {}
        for model, queue in sorted(self._queues.items()):
            pacer = queue.pacer
            models[model] = {
                "rpm": self._limits.for_model(model).rpm,
                "queue_depth": queue.depth,
                "oldest_wait_s": round(queue.oldest_wait(now), 3),
                "released_last_60s": pacer.releases_within(now, self.window),
                "paused_for_s": round(max(0.0, pacer.paused_until - now), 3),
                "upstream_429": self._refusals.get(model, 0),
            }
        return models
