"""What one running proxy holds: its current config and its long-lived parts.

The application object owns one ``State`` (under ``STATE``). Parts that need the running loop
(the upstream session) are filled in by the app's cleanup contexts. ``apply`` is the one place a
reloaded config reaches the running parts; ``snapshot`` the one place their state is read for
``/-/status`` and ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tcproxy.alarms import Alarms
from tcproxy.clients import ClientTable
from tcproxy.config import Config, Secret
from tcproxy.ledger import Ledger
from tcproxy.pacing import Limiter
from tcproxy.quotas import Budgets
from tcproxy.record import RequestRecord
from tcproxy.upstream import Upstream


@dataclass(repr=False, eq=False)
class State:
    config: Config
    token: Secret
    limiter: Limiter
    clients: ClientTable
    budgets: Budgets
    time_scale: float = 1.0
    upstream: Upstream | None = None
    ledger: Ledger | None = None
    alarms: Alarms = field(default_factory=Alarms)
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    # Called with every finished request's record (metrics, the usage ledger).
    observers: list[Callable[[RequestRecord], None]] = field(default_factory=list)
    # How many log lines could not be written (the log sink is outside the app).
    log_lines_lost: Callable[[], int] = lambda: 0

    def authorization(self) -> str:
        return "Bearer " + self.token.reveal()

    def apply(self, config: Config, token: Secret) -> None:
        """Follow a reloaded config. Requests queued or in flight carry on untouched."""
        self.config = config
        self.token = token
        self.clients = ClientTable(config.clients)
        self.limiter.update(config.limits)
        if self.upstream is not None:
            self.upstream.configure(config.upstream)

    def count_usage(self, record: RequestRecord) -> None:
        """Observer: spent tokens count against the client's budgets."""
        if record.usage is not None and record.usage.total_tokens:
            self.budgets.add(record.client, record.usage.total_tokens)

    def snapshot(self) -> dict[str, Any]:
        upstream = self.upstream
        return {
            "draining": self.draining,
            "log_lines_lost": self.log_lines_lost(),
            "upstream_reachable": None if upstream is None else upstream.reachable,
            "upstream_failures": {} if upstream is None else dict(upstream.failures),
            "pacing": self.limiter.mode,
            "open_circuits": {} if upstream is None else upstream.open_circuits(),
            "alarms": self.alarms.active(),
            "models": self.limiter.snapshot(),
        }


STATE = web.AppKey("tcproxy_state", State)
