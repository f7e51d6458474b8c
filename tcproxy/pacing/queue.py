"""Who goes next for one model: a fair waiting line in front of a pacer.

- FIFO within a client; round-robin across clients, so one client's batch of 10,000 cannot
  starve another client's single request.
- A waiter that leaves (timeout, client hung up) is removed at once, in O(1): no residue.
- One dispatcher task per busy model asks the pacer for a slot and hands it to the next waiter;
  it ends when the line is empty. An idle model with a free slot skips the dispatcher entirely.
- A request the upstream refused with 429 re-enters at the head of the line (``front=True``).

Nothing here knows HTTP; errors raised are the tree's 429s, which the proxy passes on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from typing import Protocol

import structlog

from tcproxy.config.model import ModelLimit
from tcproxy.errors import TooManyRequests

log = structlog.get_logger("tcproxy.pacing")


class SlotSource(Protocol):
    """A pacing backend for one model (in-process ``Pacer``, or ``RedisPacer``)."""

    paused_until: float

    @property
    def interval(self) -> float: ...

    def ready(self, now: float) -> bool: ...

    async def acquire(self) -> None: ...

    def pause(self, until: float) -> None: ...

    def update(self, limit: ModelLimit, margin: float, window: float) -> None: ...

    def releases_within(self, now: float, seconds: float) -> int: ...

    def is_idle(self, now: float) -> bool: ...


class _Waiter:
    __slots__ = ("future", "since")

    def __init__(self, future: asyncio.Future[None], since: float) -> None:
        self.future = future
        self.since = since


class ModelQueue:
    __slots__ = (
        "_depth",
        "_dispatcher",
        "_ids",
        "_lines",
        "_turns",
        "closed",
        "label",
        "max_queue",
        "model",
        "pacer",
    )

    def __init__(
        self, model: str, pacer: SlotSource, max_queue: int, label: str | None = None
    ) -> None:
        self.model = model
        self.label = label or f"model '{model}'"  # what error messages call this queue
        self.pacer = pacer
        self.max_queue = max_queue
        self._lines: dict[str, OrderedDict[int, _Waiter]] = {}
        self._turns: deque[str] = deque()  # clients with waiters, in release order
        self._depth = 0
        self._ids = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        self.closed: Exception | None = None  # set when shut: every newcomer gets this error

    @property
    def depth(self) -> int:
        return self._depth

    def oldest_wait(self, now: float) -> float:
        if not self._lines:
            return 0.0
        return now - min(next(iter(line.values())).since for line in self._lines.values())

    def estimated_wait(self) -> float:
        """Seconds until a newcomer would be released, at full pace: for Retry-After."""
        return max(1.0, (self._depth + 1) * self.pacer.interval)

    async def wait_turn(self, client: str, timeout: float, *, front: bool = False) -> None:
        """Wait for this request's slot.

        Raises ``TooManyRequests`` when the line is full (at once) or ``timeout`` passes first.
        ``front`` puts a request the upstream refused back at the head; it is never refused for
        a full line, since it was accepted already.
        """
        if self.closed is not None:
            raise self.closed
        loop = asyncio.get_running_loop()
        start = loop.time()
        if self._depth == 0 and self._dispatcher is None and self.pacer.ready(start):
            await self.pacer.acquire()  # a free slot: taken without suspending
            return
        if not front and self._depth >= self.max_queue:
            raise TooManyRequests(
                "queue_full",
                f"the queue for {self.label} is full ({self.max_queue} waiting);"
                " retry later or raise limits.max_queue",
                retry_after=self.estimated_wait(),
            )
        if timeout <= 0:
            raise self._timed_out()
        waiter = _Waiter(loop.create_future(), start)
        key = next(self._ids)
        self._push(client, key, waiter, front)
        if self._dispatcher is None:
            self._dispatcher = loop.create_task(self._dispatch(), name=f"dispatch:{self.model}")
        # A bare timer, not asyncio.timeout(): with 10,000 waiting, each byte per waiter counts.
        expiry = loop.call_at(start + timeout, self._expire, waiter.future)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if _granted(waiter.future):
                self._grant_next()  # our slot was granted as we left: pass it on
            raise
        finally:
            expiry.cancel()
            self._remove(client, key)
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.exception()  # retrieved, even if we left before it was raised

    def _expire(self, future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_exception(self._timed_out())

    def _timed_out(self) -> TooManyRequests:
        return TooManyRequests(
            "queue_timeout",
            f"waited too long for a slot for {self.label} (limits.queue_timeout);"
            " only so many requests per minute may go, retry later",
            retry_after=self.estimated_wait(),
        )

    def _push(self, client: str, key: int, waiter: _Waiter, front: bool) -> None:
        line = self._lines.get(client)
        if line is None:
            line = self._lines[client] = OrderedDict()
            if front:
                self._turns.appendleft(client)
            else:
                self._turns.append(client)
        elif front and self._turns[0] != client:
            self._turns.remove(client)
            self._turns.appendleft(client)
        line[key] = waiter
        if front:
            line.move_to_end(key, last=False)
        self._depth += 1

    def _remove(self, client: str, key: int) -> None:
        line = self._lines.get(client)
        if line is None or line.pop(key, None) is None:
            return  # already released
        self._depth -= 1
        if not line:
            del self._lines[client]
            self._turns.remove(client)

    def _grant_next(self) -> bool:
        while self._turns:
            client = self._turns.popleft()
            line = self._lines[client]
            _, waiter = line.popitem(last=False)
            self._depth -= 1
            if line:
                self._turns.append(client)
            else:
                del self._lines[client]
            if not waiter.future.done():
                waiter.future.set_result(None)
                return True
        return False

    async def _dispatch(self) -> None:
        try:
            while self._depth:
                try:
                    await self.pacer.acquire()
                except Exception:  # a bug must not strand the waiters: log, pause, go on
                    log.error(
                        "pacing failed; retrying in a second", queue=self.label, exc_info=True
                    )
                    await asyncio.sleep(1.0)
                    continue
                self._grant_next()
        finally:
            self._dispatcher = None

    def shed(self, error: Exception) -> int:
        """Answer every waiter with ``error``, and every later newcomer too (shutting down).

        Returns how many were waiting."""
        self.closed = error
        waiters = [w for line in self._lines.values() for w in line.values()]
        self._lines.clear()
        self._turns.clear()
        self._depth = 0
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)
        return len(waiters)

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
