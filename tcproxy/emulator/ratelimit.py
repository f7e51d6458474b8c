"""How the emulated upstream counts "requests per minute": three readings of the documentation.

- ``fixed``:   at most rpm per calendar minute (windows aligned to the emulator's start);
- ``sliding``: at most rpm in the 60 s before each request;
- ``bucket``:  a bucket of rpm/60 tokens refilled at rpm/60 per second.

A request refused here does not count against the limit (as with OpenAI). Times are emulated
seconds (real seconds times the time scale).
"""

from __future__ import annotations

import math
from collections import deque

MODES = ("fixed", "sliding", "bucket")
MINUTE = 60.0


class RateEnforcer:
    __slots__ = ("_count", "_level", "_mode", "_recent", "_stamp", "_window_index", "rpm")

    def __init__(self, rpm: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.rpm = rpm
        self._mode = mode
        self._recent: deque[float] = deque()
        self._window_index = -1
        self._count = 0
        self._level = max(1.0, rpm / MINUTE)  # the bucket starts full
        self._stamp = 0.0

    def admit(self, now: float) -> float | None:
        """Count a request arriving at ``now``: None if accepted, else seconds to wait."""
        if self._mode == "fixed":
            index = math.floor(now / MINUTE)
            if index != self._window_index:
                self._window_index, self._count = index, 0
            if self._count >= self.rpm:
                return (index + 1) * MINUTE - now
            self._count += 1
            return None
        if self._mode == "sliding":
            recent = self._recent
            while recent and recent[0] <= now - MINUTE:
                recent.popleft()
            if len(recent) >= self.rpm:
                return recent[0] + MINUTE - now
            recent.append(now)
            return None
        rate = self.rpm / MINUTE
        capacity = max(1.0, rate)
        self._level = min(capacity, self._level + (now - self._stamp) * rate)
        self._stamp = now
        # A hair of tolerance for float rounding; the proxy keeps a real margin on top.
        if self._level < 1.0 - 1e-9:
            return (1.0 - self._level) / rate
        self._level -= 1.0
        return None


def max_in_window(times: list[float], window: float = MINUTE) -> int:
    """Most arrivals in any half-open window of ``window`` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def bucket_violations(times: list[float], rpm: int) -> int:
    """Arrivals a bucket of rpm/60 per second with burst rpm/60 would have refused."""
    enforcer = RateEnforcer(rpm, "bucket")
    return sum(1 for t in sorted(times) if enforcer.admit(t) is not None)
