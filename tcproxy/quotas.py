"""Token budgets per client: what each used this UTC day and month, and whether it may spend more.

Counts come from the upstream's reported ``usage`` of finished requests; at start-up they are
read back from the usage ledger, so a restart does not hand out a fresh budget. A client over
either budget gets a local 402 before anything is sent upstream; the day and the month roll over
on their own (UTC calendar boundaries). The clock is a parameter, so tests move it.

A request already under way when a budget runs out still finishes: budgets are checked when a
request arrives, so a client can overshoot by what its requests in flight use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from tcproxy.config.model import ClientConfig
from tcproxy.errors import QuotaExceeded


def day_start(at: float) -> float:
    moment = datetime.fromtimestamp(at, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_start(at: float) -> float:
    moment = datetime.fromtimestamp(at, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def _next_day(at: float) -> float:
    return day_start(at) + 86400


def _next_month(at: float) -> float:
    moment = datetime.fromtimestamp(month_start(at), UTC)
    return (moment.replace(day=28) + timedelta(days=4)).replace(day=1).timestamp()


class Budgets:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # The periods the counts below belong to, as [start, end) in unix time.
        self._day = self._day_end = self._month = self._month_end = 0.0
        self._used_today: dict[str, int] = {}
        self._used_this_month: dict[str, int] = {}

    def load(self, today: Mapping[str, int], this_month: Mapping[str, int]) -> None:
        """Start from what the ledger says was used in the current day and month."""
        self._roll(self.clock())
        self._used_today = dict(today)
        self._used_this_month = dict(this_month)

    def used(self, client: str) -> tuple[int, int]:
        self._roll(self.clock())
        return self._used_today.get(client, 0), self._used_this_month.get(client, 0)

    def add(self, client: str, tokens: int) -> None:
        self._roll(self.clock())
        self._used_today[client] = self._used_today.get(client, 0) + tokens
        self._used_this_month[client] = self._used_this_month.get(client, 0) + tokens

    def check(self, client: ClientConfig) -> None:
        """Raise ``QuotaExceeded`` if ``client`` has spent a budget."""
        if client.tokens_per_day is None and client.tokens_per_month is None:
            return
        now = self.clock()
        today, month = self.used(client.name)
        if client.tokens_per_day is not None and today >= client.tokens_per_day:
            raise _spent(
                client.name,
                today,
                client.tokens_per_day,
                "today",
                "tokens_per_day",
                _next_day(now) - now,
            )
        if client.tokens_per_month is not None and month >= client.tokens_per_month:
            raise _spent(
                client.name, month, client.tokens_per_month, "this month", "tokens_per_month",
                _next_month(now) - now,
            )  # fmt: skip

    def _roll(self, now: float) -> None:
        # Two comparisons on the request path; calendar arithmetic only when a period ends.
        if not self._day <= now < self._day_end:
            self._day, self._day_end = day_start(now), _next_day(now)
            self._used_today.clear()
        if not self._month <= now < self._month_end:
            self._month, self._month_end = month_start(now), _next_month(now)
            self._used_this_month.clear()


def _spent(
    name: str, used: int, budget: int, when: str, key: str, resets_in: float
) -> QuotaExceeded:
    return QuotaExceeded(
        "quota_exceeded",
        f"client '{name}' has used {used:,} of its {budget:,} tokens {when} (clients.{name}.{key});"
        f" the budget renews in {_duration(resets_in)} (at 00:00 UTC)",
        retry_after=resets_in,
    )


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    if hours >= 48:
        return f"{hours // 24} days"
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min"
