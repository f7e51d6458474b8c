"""What one running proxy holds: its current config and its long-lived parts.

The application object owns one ``State`` (under ``STATE``). Parts that need the running loop
(the upstream session) are filled in by the app's cleanup contexts; a reload swaps ``config``
and tells the parts that follow it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tcproxy.alarms import Alarms
from tcproxy.config import Config, Secret
from tcproxy.pacing import Limiter
from tcproxy.record import RequestRecord
from tcproxy.upstream import Upstream


@dataclass(repr=False, eq=False)
class State:
    config: Config
    token: Secret
    limiter: Limiter
    time_scale: float = 1.0
    upstream: Upstream | None = None
    alarms: Alarms = field(default_factory=Alarms)
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    # Called with every finished request's record (metrics, the usage ledger).
    observers: list[Callable[[RequestRecord], None]] = field(default_factory=list)

    def authorization(self) -> str:
        return "Bearer " + self.token.reveal()


STATE = web.AppKey("tcproxy_state", State)
