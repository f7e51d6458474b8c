"""Lasting upstream conditions, logged once when they begin and once when they end.

A spent balance (402) or a refused token (401) affects every request until someone acts; one
error line per episode tells the operator, where one per request would bury everything else.
"""

from __future__ import annotations

from typing import Any

import structlog

log = structlog.get_logger("tcproxy.alarms")


class Alarms:
    def __init__(self) -> None:
        self._active: dict[str, str] = {}

    def begin(self, name: str, message: str, **fields: Any) -> None:
        if name not in self._active:
            self._active[name] = message
            log.error(message, alarm=name, **fields)

    def end(self, name: str, message: str) -> None:
        if self._active.pop(name, None) is not None:
            log.info(message, alarm=name)

    def active(self) -> dict[str, str]:
        return dict(self._active)
