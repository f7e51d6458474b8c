"""When the next request for one model may leave: the in-process pacing backend.

The upstream documents "N requests per minute" and not how it counts, so a release must be
acceptable to the strictest reading. Two rules, both kept at every release:

1. A sliding window: at most ``rpm`` releases in any ``window + margin`` seconds, starting at any
   instant — the first minute after start-up and after an idle spell included. A log of recent
   release times enforces it exactly. The margin covers arrival jitter: a request released at t
   reaches the upstream somewhat later, by a varying amount.

2. A per-second bucket: the upstream may count with a bucket of ``rpm/60`` per second and a burst
   of ``rpm/60``. Our releases go through aiolimiter's leaky bucket at the same rate with a burst
   of ``rpm/60 - margin/interval``: smaller by what the jitter could add, so whatever the
   upstream sees still fits its bucket. For small rpm that burst drops below one request, and the
   bucket spaces releases a little wider than the interval instead. A configured ``burst``
   replaces this default (for users who know their upstream counts per minute); rule 1 still
   holds then.

The bucket absorbs event-loop lag as well: a release that fires a millisecond late does not push
every later release back, so the long-run rate stays at the interval and utilisation near 100%.

A plain ``AsyncLimiter(rpm, 60)`` keeps neither rule: it lets ``rpm`` through at once and nearly
``2 * rpm`` in the first minute (bench/pacing.py shows it side by side).

This module knows nothing of HTTP or of who is waiting; ``queue`` decides that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from aiolimiter import AsyncLimiter

from tcproxy.config.model import ModelLimit

MINUTE = 60.0


class ReleaseLog:
    """When recent releases happened, in memory that stays small however high the rate.

    Releases closer together than ``GRAIN`` share one entry stamped with the latest of their
    times. The log can only say a release happened *later* than it did, so every check built on
    it errs towards waiting. At the documented limits releases are 17 ms or more apart and every
    entry holds exactly one; at a limit set very high (a benchmark) the log still holds at most
    ``span / GRAIN`` entries instead of one per request.
    """

    GRAIN = 0.005

    __slots__ = ("_entries", "count")

    def __init__(self) -> None:
        self._entries: deque[list[float]] = deque()  # [time, releases], oldest first
        self.count = 0

    def add(self, at: float, releases: int = 1) -> None:
        entries = self._entries
        if entries and at - entries[-1][0] < self.GRAIN:
            last = entries[-1]
            last[0] = max(last[0], at)
            last[1] += releases
        else:
            entries.append([at, releases])
        self.count += releases

    def forget_until(self, cutoff: float) -> None:
        """Drop releases at or before ``cutoff``."""
        entries = self._entries
        while entries and entries[0][0] <= cutoff:
            self.count -= int(entries.popleft()[1])

    def time_of(self, index: int) -> float:
        """(An upper bound of) the time of the ``index``-th oldest release still held."""
        for at, releases in self._entries:
            if index < releases:
                return at
            index -= int(releases)
        raise IndexError(index)

    def since(self, cutoff: float) -> int:
        return int(sum(releases for at, releases in self._entries if at > cutoff))


def bucket_shape(limit: ModelLimit, margin: float, window: float = MINUTE) -> tuple[float, float]:
    """(capacity, period) of the leaky bucket that paces ``limit``; see rule 2 above."""
    interval = window / limit.rpm
    if limit.burst is not None:
        burst = limit.burst
    else:
        upstream_burst = max(1.0, limit.rpm / MINUTE)
        burst = upstream_burst - margin / interval
    if burst >= 1:
        return burst, burst * interval
    # Negative tolerance: one at a time, spaced wider than the interval by what is missing.
    return 1.0, interval * (2 - burst)


class Pacer:
    """Grants release slots for one model; one consumer (the model's dispatcher) at a time."""

    __slots__ = (
        "_bucket",
        "_changed",
        "_limit",
        "_margin",
        "_precharge",
        "_recent",
        "_span",
        "_window",
        "paused_until",
    )

    def __init__(self, limit: ModelLimit, margin: float, window: float = MINUTE) -> None:
        self._recent = ReleaseLog()
        self._changed = asyncio.Event()
        self._precharge = False
        self.paused_until = 0.0
        self._configure(limit, margin, window)

    def _configure(self, limit: ModelLimit, margin: float, window: float) -> None:
        self._limit = limit
        self._margin = margin
        self._window = window
        self._span = window + margin
        capacity, period = bucket_shape(limit, margin, window)
        self._bucket = AsyncLimiter(capacity, period)

    @property
    def limit(self) -> ModelLimit:
        return self._limit

    @property
    def interval(self) -> float:
        """Seconds between releases at full pace."""
        return self._bucket.time_period / self._bucket.max_rate

    def update(self, limit: ModelLimit, margin: float, window: float = MINUTE) -> None:
        """Follow a new limit from now on; slots already granted stay granted."""
        if (limit, margin, window) == (self._limit, self._margin, self._window):
            return
        self._configure(limit, margin, window)
        # The new bucket starts full rather than empty: what the upstream counted before the
        # change still counts, so a reload must not open a fresh burst.
        self._precharge = True
        self._wake()

    def precharge(self) -> None:
        """Start the bucket full from the next release on: no burst (taking over, reloading)."""
        self._precharge = True

    def note_release(self, at: float, releases: int = 1) -> None:
        """Count a release made elsewhere (through Redis, or before a restart)."""
        self._recent.add(at, releases)

    def pause(self, until: float) -> None:
        """Release nothing before loop time ``until`` (the upstream asked us to back off)."""
        if until > self.paused_until:
            self.paused_until = until
            self._wake()

    def ready(self, now: float) -> bool:
        """True if a release right now would keep both rules (and nothing is pending)."""
        return not self._precharge and self._blocked_for(now) <= 0 and self._bucket.has_capacity()

    async def acquire(self) -> None:
        """Wait for the next slot and take it."""
        loop = asyncio.get_running_loop()
        holding = False
        while True:
            wait = self._blocked_for(loop.time())
            if wait > 0:
                await self._nap(wait)
                continue
            if not holding:
                bucket = self._bucket
                if self._precharge:
                    self._precharge = False
                    await bucket.acquire(bucket.max_rate)
                holding = await self._bucket_slot(bucket)
                continue  # the bucket may have made us wait: check the window and pause again
            self._recent.add(loop.time())
            return

    def releases_within(self, now: float, seconds: float) -> int:
        """How many slots were granted in the last ``seconds`` (at most window + margin)."""
        return self._recent.since(now - seconds)

    def _blocked_for(self, now: float) -> float:
        """Seconds until the window log and any pause allow a release (<= 0: allowed now)."""
        recent = self._recent
        recent.forget_until(now - self._span)
        wait = self.paused_until - now
        excess = recent.count - self._limit.rpm
        if excess >= 0:
            wait = max(wait, recent.time_of(excess) + self._span - now)
        return wait

    async def _bucket_slot(self, bucket: AsyncLimiter) -> bool:
        """Take a unit of ``bucket``; False if the limit changed first (start again, new bucket)."""
        if bucket.has_capacity():
            await bucket.acquire()  # does not suspend
            return True
        self._changed.clear()
        acquire = asyncio.ensure_future(bucket.acquire())
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait((acquire, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if not acquire.done():
                acquire.cancel()
        return acquire.done() and not acquire.cancelled()

    async def _nap(self, seconds: float) -> None:
        """Sleep, but wake early when the limit changes or a pause arrives."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def _wake(self) -> None:
        self._changed.set()

    def is_idle(self, now: float) -> bool:
        """Nothing granted within the window and no pause: forgetting this pacer loses nothing."""
        self._blocked_for(now)
        return not self._recent.count and self.paused_until <= now
