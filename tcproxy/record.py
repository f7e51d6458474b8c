"""What is known about one request by the time it ends: the canonical log line's fields.

The proxy fills a ``RequestRecord`` as the request moves along; the middleware turns it into the
one access log line, the metrics and (for teams) the usage ledger. Never holds headers or bodies.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tcproxy.accounting import Usage


class RequestRecord:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "error",
        "events",
        "method",
        "model",
        "path",
        "queue_s",
        "request_id",
        "retries",
        "started",
        "status",
        "stream",
        "total_s",
        "upstream_s",
        "upstream_status",
        "usage",
    )

    def __init__(self, request_id: str, method: str, path: str, started: float) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.started = started
        self.client = "-"
        self.model: str | None = None
        self.stream = False
        self.status = 0
        self.error: str | None = None  # our error code, when tcproxy produced the answer
        self.upstream_status: int | None = None
        self.queue_s = 0.0
        self.upstream_s: float | None = None
        self.total_s = 0.0
        self.retries = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.events = 0  # SSE data events relayed (a stream cut short still shows its progress)
        self.usage: Usage | None = None

    def stamp(self, response: web.StreamResponse) -> None:
        """Every response says which request it answers and how long that waited for its slot."""
        response.headers["X-Request-Id"] = self.request_id
        response.headers["X-TCProxy-Queue-Ms"] = str(round(self.queue_s * 1000))

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "status": self.status,
            "queue_ms": round(self.queue_s * 1000, 1),
            "upstream_ms": None if self.upstream_s is None else round(self.upstream_s * 1000, 1),
            "total_ms": round(self.total_s * 1000, 1),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        if self.stream:
            fields["stream"] = True
            fields["stream_events"] = self.events
        if self.error:
            fields["error"] = self.error
        if self.upstream_status is not None and self.upstream_status != self.status:
            fields["upstream_status"] = self.upstream_status
        if self.retries:
            fields["retries"] = self.retries
        if self.usage is not None:
            fields.update(self.usage.as_fields())
        return fields


RECORD = web.RequestKey("tcproxy_record", RequestRecord)
