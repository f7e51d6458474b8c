"""Errors that tcproxy itself answers with.

Every error here knows the HTTP status it maps to and a stable machine-readable ``code``; the
error middleware turns any of them into the OpenAI error shape
``{"error": {"message", "type", "code"}}`` plus the header ``X-TCProxy-Error: <code>``, so a
user can tell them from answers that came from the upstream.

    ProxyError
    ├── ClientError                  the request must change before it can succeed
    │   ├── BadRequest          400  invalid_json, invalid_body, model_missing, bad_path, ...
    │   ├── Unauthorized        401  invalid_client_key
    │   ├── QuotaExceeded       402  a local budget is spent
    │   ├── Forbidden           403  the client's network is not allowed
    │   ├── NotFound            404  unknown_path
    │   ├── MethodNotAllowed    405
    │   ├── RequestTimeout      408  body_timeout
    │   ├── PayloadTooLarge     413  body_too_large
    │   └── TooManyRequests     429  queue_full, queue_timeout (carries Retry-After)
    └── UpstreamError                the upstream, or tcproxy's way to it, failed
        ├── BadGateway          502  upstream_unreachable, upstream_auth_failed, upstream_reset...
        ├── ServiceUnavailable  503  shutting_down, circuit_open
        └── GatewayTimeout      504  upstream_timeout

Messages say what to fix. They never contain the upstream token or a client key: nothing that
builds one of these errors has either in hand.
"""

from __future__ import annotations

import math


class ProxyError(Exception):
    """Base of every error tcproxy answers with."""

    status = 500
    type = "server_error"

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        headers = {"X-TCProxy-Error": self.code}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


class ClientError(ProxyError):
    type = "invalid_request_error"
    status = 400


class BadRequest(ClientError):
    status = 400


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"


class QuotaExceeded(ClientError):
    status = 402
    type = "insufficient_quota"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"


class NotFound(ClientError):
    status = 404


class MethodNotAllowed(ClientError):
    status = 405


class RequestTimeout(ClientError):
    status = 408


class PayloadTooLarge(ClientError):
    status = 413


class TooManyRequests(ClientError):
    status = 429
    type = "rate_limit_error"


class UpstreamError(ProxyError):
    type = "upstream_error"
    status = 502


class BadGateway(UpstreamError):
    status = 502


class ServiceUnavailable(UpstreamError):
    status = 503


class GatewayTimeout(UpstreamError):
    status = 504


_BY_STATUS: dict[int, type[ProxyError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        QuotaExceeded,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        RequestTimeout,
        PayloadTooLarge,
        TooManyRequests,
        BadGateway,
        ServiceUnavailable,
        GatewayTimeout,
    )
}


def for_status(status: int, code: str, message: str) -> ProxyError:
    """Our error for an HTTP status aiohttp raised on its own (404, 405, 413...)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ClientError if 400 <= status < 500 else ProxyError
        error = cls(code, message)
        error.status = status
        return error
    return cls(code, message)
