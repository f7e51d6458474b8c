"""Handing work from the event loop to a writer thread in batches.

The event loop (or any thread) calls ``put``: one append to a deque, no lock, no wake-up. The
writer thread wakes on its own every ``interval`` seconds and hands whatever piled up to
``write_batch`` in one call. Waking the writer for every item instead costs a thread switch
per item, on the same core as the loop: that is what this saves (bench/perf.py shows it).

``flush`` waits until everything put so far is written; ``close`` also ends the thread. When
more than ``max_pending`` items wait (the sink is stuck), ``put`` refuses and the caller counts
the loss: memory stays bounded and the loop never waits.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchWriter(Generic[T]):
    def __init__(
        self,
        write_batch: Callable[[list[T]], None],
        *,
        interval: float,
        max_pending: int,
        name: str,
    ) -> None:
        self._write_batch = write_batch
        self._interval = interval
        self._max_pending = max_pending
        self._items: deque[T] = deque()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._put = 0  # items accepted so far
        self._handled = 0  # items handed to write_batch so far
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> bool:
        """Queue ``item``; False (and nothing queued) if too many are waiting already."""
        if len(self._items) >= self._max_pending:
            return False
        self._items.append(item)
        self._put += 1
        return True

    @property
    def pending(self) -> int:
        return len(self._items)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every item put so far was handed over. False if that took too long."""
        target = self._put
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._done:
            while self._handled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._done.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued, then end the thread. False if it did not finish in time."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stopping
            while self._items:
                batch: list[T] = []
                while self._items and len(batch) < 1000:
                    batch.append(self._items.popleft())
                try:
                    self._write_batch(batch)
                finally:
                    with self._done:
                        self._handled += len(batch)
                        self._done.notify_all()
            with self._done:
                self._done.notify_all()
            if stopping:
                return
