"""Giving memory back once a burst has passed.

When a burst is over (say 10,000 requests queued and then gone), CPython has freed most of what
they held at once. Two things still keep a quiet proxy's RSS near its peak:

- the reference cycles each cancelled request leaves (its task, exception and traceback) wait
  for a full collection, which a process doing little may not run for a long time;
- glibc keeps freed heap pages mapped until asked to return them (``malloc_trim``).

Every second ``Housekeeper.check`` samples the interpreter's allocated blocks: one call, about
60 µs with 2 million blocks alive. It cleans up once they have fallen at least ``_MIN_DROP``
below their peak since the last clean-up, nothing is queued (a queue drained at its rate limit
falls for minutes; a clean-up halfway down would leave the rest and cost a collection of all
that still waits), and they have stayed within ``_NOISE`` for ``_SETTLED`` checks. It runs one
full collection and ``malloc_trim`` (glibc only; elsewhere the collection alone) and logs what
came back: 47-57 ms after 10,000 requests here. Under steady load, while a burst is held or
still draining, it does nothing; whatever a clean-up does, the next one needs a new burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from tcproxy.state import STATE

log = structlog.get_logger("tcproxy.housekeeping")

_EVERY = 1.0  # seconds between checks: often enough to see a short burst's peak
_MIN_DROP = 100_000  # allocated blocks (roughly 10 MiB of objects) that make a burst
_NOISE = _MIN_DROP // 20  # blocks the count may move by and still count as settled
_SETTLED = 3  # checks in a row within _NOISE before the fall counts as over


class Housekeeper:
    def __init__(
        self,
        blocks: Callable[[], int] = sys.getallocatedblocks,
        queued: Callable[[], int] = lambda: 0,
        clean: Callable[[], bool] | None = None,
    ) -> None:
        self._blocks = blocks
        self._queued = queued
        self._clean = clean or _collect_and_trim
        self.peak = self._mark = blocks()
        self._flat = 0  # checks in a row within _NOISE of the mark

    def check(self) -> bool:
        """Clean up if a burst has come and gone since the last time; say whether it did."""
        now = self._blocks()
        if now > self.peak:
            self.peak = self._mark = now
            self._flat = 0
            return False
        if now < self._mark - _NOISE or self._queued():  # still falling, or requests still wait
            self._mark = now
            self._flat = 0
            return False
        self._flat += 1
        if self.peak - now < _MIN_DROP or self._flat < _SETTLED:
            return False
        before, started = _rss_mib(), time.perf_counter()
        try:
            trimmed = self._clean()
        finally:  # done, or failed: either way this burst is over
            self.peak = self._mark = self._blocks()
            self._flat = 0
        log.info(
            "memory returned after a burst",
            rss_before_mib=before,
            rss_after_mib=_rss_mib(),
            heap_trimmed=trimmed,
            took_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return True


async def keep_house(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: check every ``_EVERY`` seconds while the application runs."""
    state = app[STATE]
    keeper = Housekeeper(queued=lambda: state.limiter.queued())

    async def every() -> None:
        while True:
            await asyncio.sleep(_EVERY)
            try:
                keeper.check()
            except Exception:  # never worth stopping the checks, or the proxy, for
                log.error("housekeeping failed", exc_info=True)

    task = asyncio.create_task(every(), name="housekeeping")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _collect_and_trim() -> bool:
    """A full collection, then glibc's heap trimmed; says whether there was a heap to trim."""
    gc.collect()
    if sys.platform != "linux":
        return False
    try:
        import ctypes  # only here: most processes never get this far

        malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (ImportError, OSError, AttributeError):  # no ctypes, no C library, no such function
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
    return True


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024, 1)
