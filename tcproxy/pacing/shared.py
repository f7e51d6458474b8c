"""Pacing shared through Redis: several tcproxy instances, one budget per model.

Each instance keeps its own fair waiting line (``queue``); only the decision *when* the next
slot is belongs to Redis. A slot is reserved in one atomic Lua step that applies the same two
rules as the in-process ``pacer``, to the releases of every instance together:

- an exact sliding-window log (a sorted set of reserved slot times): a new slot never makes more
  than ``rpm`` in any ``window + margin``. Exact rather than approximate, because the point is to
  never see a 429: a GCRA alone bursts past a sliding window at the start of a minute;
- a GCRA with the pacer's bucket shape (``bucket_shape``), for the per-second reading.

The script answers with the slot time and Redis's own clock, so an instance sleeps until
``slot - redis_now`` from when the answer arrived: clocks of different machines never enter into
it. Slots are handed out in the order instances ask, one outstanding reservation per busy model
per instance, so busy instances share the pace evenly. Nobody polls: an instance asks once per
slot and sleeps until it.

A 429 seen by one instance pauses the model for all of them (a key the script honours).

When Redis is unreachable or slow — at start-up or any time — requests keep flowing: each model
falls back to an in-process pacer at ``redis_fallback_share`` of its rpm (by default
1/``instances``), the switch is logged once at warning level and shown in ``/-/status`` and
``/metrics``, and a probe switches back when Redis answers again. No Redis call may take longer
than ``redis_timeout``; the Redis password never leaves this module unmasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from tcproxy.config.model import ModelLimit
from tcproxy.pacing.pacer import MINUTE, Pacer, ReleaseLog, bucket_shape
from tcproxy.pacing.urls import masked

log = structlog.get_logger("tcproxy.pacing")

_PROBE_SECONDS = 1.0

# KEYS: log (zset of slot times), tat (GCRA), pause (until), seq (member counter)
# ARGV: interval, tolerance, span, rpm, ttl_ms
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local span, rpm, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local slot = now
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat - tolerance > slot then slot = tat - tolerance end
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused > slot then slot = paused end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
local count = redis.call('ZCARD', KEYS[1])
if count > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if tonumber(last[2]) > slot then slot = tonumber(last[2]) end
end
if count >= rpm then
  local kth = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  local earliest = tonumber(kth[2]) + span
  if earliest > slot then slot = earliest end
end
if tat < slot then tat = slot end
redis.call('SET', KEYS[2], string.format('%.6f', tat + interval), 'PX', ttl)
local seq = redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('ZADD', KEYS[1], slot, string.format('%.6f:%d', slot, seq))
redis.call('PEXPIRE', KEYS[1], ttl)
return {string.format('%.6f', slot), string.format('%.6f', now), string.format('%.6f', paused)}
"""

# KEYS: pause; ARGV: seconds
PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local resume = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if resume > current then
  local ttl = math.ceil(tonumber(ARGV[1]) * 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.6f', resume), 'PX', ttl)
end
return string.format('%.6f', resume)
"""


class RedisBackend:
    """One Redis connection pool and the health of the link, shared by every model's pacer."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        timeout: float,
        fallback_share: float,
    ) -> None:
        self.url = masked(url)
        self.prefix = prefix
        self.timeout = timeout
        self.fallback_share = fallback_share
        self.healthy = False
        self.failures = 0
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # our own deadline and fallback; never a retry loop
            health_check_interval=0,
        )
        self._reserve = self._client.register_script(RESERVE)
        self._pause = self._client.register_script(PAUSE)
        self._probe: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # fire-and-forget calls, kept alive

    def spawn(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def mode(self) -> str:
        return "redis" if self.healthy else "local fallback"

    async def start(self) -> None:
        if await self._ping():
            self.healthy = True
            log.info("pacing shared through Redis", redis=self.url, prefix=self.prefix)
        else:
            self.failed(None, starting=True)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    def keys(self, model: str) -> list[str]:
        # A hash tag keeps one model's keys together on a Redis Cluster node.
        tag = hashlib.sha1(model.encode()).hexdigest()[:16]
        base = f"{self.prefix}:{{{tag}}}"
        return [f"{base}:log", f"{base}:tat", f"{base}:pause", f"{base}:seq"]

    async def reserve(self, keys: list[str], args: list[float | int]) -> tuple[float, float, float]:
        """(slot, redis_now, paused_until) in Redis time. Raises on failure or timeout."""
        async with asyncio.timeout(self.timeout):
            slot, now, paused = await self._reserve(keys=keys, args=args)
        return float(slot), float(now), float(paused)

    async def pause(self, keys: list[str], seconds: float) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._pause(keys=[keys[2]], args=[seconds])
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)

    def failed(self, exc: BaseException | None, *, starting: bool = False) -> None:
        """Redis did not answer: fall back (logged once per outage) and probe for its return."""
        self.failures += 1
        if self.healthy or starting:
            log.warning(
                "Redis unreachable or slow; pacing locally at a share of each rpm until it answers",
                redis=self.url,
                share=round(self.fallback_share, 3),
                error=_describe(exc),
            )
        self.healthy = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._wait_for_redis(), name="redis-probe")

    async def _wait_for_redis(self) -> None:
        while True:
            if await self._ping():
                break
            await asyncio.sleep(_PROBE_SECONDS)  # a probe a second, never more
        self.healthy = True
        log.warning("Redis answers again; pacing is shared again", redis=self.url)

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.ping()
            return True
        except (RedisError, OSError, TimeoutError):
            return False


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, TimeoutError):
        return "timed out"
    # redis-py's messages name host and port, never the password; keep only the first line.
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip(": ")


class RedisPacer:
    """A model's slots, reserved in Redis; an in-process pacer stands in while Redis is away."""

    __slots__ = (
        "_args",
        "_backend",
        "_gate_until",
        "_keys",
        "_limit",
        "_local",
        "_recent",
        "_was_shared",
        "paused_until",
    )

    def __init__(
        self, backend: RedisBackend, model: str, limit: ModelLimit, margin: float, window: float
    ) -> None:
        self._backend = backend
        self._keys = backend.keys(model)
        self._recent = ReleaseLog()  # this instance's releases, for /-/status
        self.paused_until = 0.0
        # The stand-in while Redis is away. It is told of every release made through Redis, so
        # when it takes over it knows this instance's last minute; and for one window after
        # Redis returns it still gates releases, since Redis never saw the ones made without it.
        self._local = Pacer(self._share(limit), margin, window)
        self._was_shared = backend.healthy
        self._gate_until = 0.0
        self._configure(limit, margin, window)

    def _share(self, limit: ModelLimit) -> ModelLimit:
        rpm = max(1, math.floor(limit.rpm * self._backend.fallback_share))
        return ModelLimit(rpm=rpm, burst=limit.burst)

    def _configure(self, limit: ModelLimit, margin: float, window: float) -> None:
        self._limit = limit
        capacity, period = bucket_shape(limit, margin, window)
        interval = period / capacity
        tolerance = (capacity - 1) * interval
        span = window + margin
        ttl_ms = math.ceil((span + MINUTE) * 1000)
        self._args: list[float | int] = [interval, tolerance, span, limit.rpm, ttl_ms]

    @property
    def limit(self) -> ModelLimit:
        return self._limit

    @property
    def interval(self) -> float:
        return float(self._args[0])

    @property
    def shared(self) -> bool:
        return self._backend.healthy

    def update(self, limit: ModelLimit, margin: float, window: float = MINUTE) -> None:
        self._configure(limit, margin, window)
        self._local.update(self._share(limit), margin, window)

    def ready(self, now: float) -> bool:
        # Shared slots always come from Redis; the fast path is only for the local fallback.
        return not self._backend.healthy and self._local.ready(now)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._follow_backend(loop.time())
            if not self._backend.healthy:
                await self._local.acquire()
                self._released(loop.time())
                return
            try:
                slot, redis_now, paused = await self._backend.reserve(self._keys, self._args)
            except (RedisError, OSError, TimeoutError) as exc:
                self._backend.failed(exc)
                continue
            answered = loop.time()
            if paused > redis_now:
                self.paused_until = max(self.paused_until, answered + paused - redis_now)
            if slot > redis_now:
                await asyncio.sleep(slot - redis_now)
            now = loop.time()
            if self.paused_until > now:
                # A 429 arrived while this slot was pending: let it go, wait out the pause.
                await asyncio.sleep(self.paused_until - now)
                continue
            if now < self._gate_until:
                await self._local.acquire()  # the local record still binds (see __init__)
            else:
                self._local.note_release(now)
            self._released(loop.time())
            return

    def _released(self, at: float) -> None:
        self._recent.add(at)
        self._recent.forget_until(at - float(self._args[2]))

    def _follow_backend(self, now: float) -> None:
        shared = self._backend.healthy
        if shared == self._was_shared:
            return
        self._was_shared = shared
        if shared:
            self._gate_until = now + float(self._args[2])
        else:
            self._local.precharge()  # takes over without a burst

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)
        self._local.pause(until)
        if self._backend.healthy:
            seconds = until - asyncio.get_running_loop().time()
            self._backend.spawn(self._backend.pause(self._keys, seconds))

    def releases_within(self, now: float, seconds: float) -> int:
        return self._recent.since(now - seconds)

    def is_idle(self, now: float) -> bool:
        return not self.releases_within(now, float(self._args[2])) and self.paused_until <= now
