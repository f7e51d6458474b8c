"""Around every request: its id, its one access log line, and errors in the OpenAI shape.

``observe`` is the only middleware. It gives each request a ``RequestRecord`` and a request id
(the client's ``X-Request-Id`` when it is sane), turns tcproxy's errors and aiohttp's own (404,
405) into ``{"error": {...}}`` with ``X-TCProxy-Error``, and when the request ends — answered,
failed or abandoned by its client — writes the canonical log line and hands the record to
whoever counts (``State.observers``: metrics, budgets, the usage ledger), right after the answer
is sent.
"""

from __future__ import annotations

import asyncio
import os
import re

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from tcproxy.access import check_network
from tcproxy.errors import ProxyError, for_status
from tcproxy.log import enabled
from tcproxy.record import RECORD, RequestRecord
from tcproxy.state import STATE, State

log = structlog.get_logger("tcproxy.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
CLIENT_GONE = 499  # nginx's status for "the client closed the connection first"

_NOT_FOUND = (
    "tcproxy serves /v1/* (forwarded to the upstream) and /-/healthy, /-/ready, /-/status"
    " and /metrics"
)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    given = request.headers.get("X-Request-Id", "")
    request_id = given if given and _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
    record = RequestRecord(request_id, request.method, request.path, loop.time())
    request[RECORD] = record
    try:
        allow = request.app[STATE].config.listen.allow
        if allow:
            check_network(request, allow)
        response = await handler(request)
        record.status = response.status
        if not response.prepared:  # a relayed answer was stamped before it started
            record.stamp(response)
        return response
    except ProxyError as exc:
        return _error_response(record, exc)
    except web.HTTPException as exc:
        return _error_response(record, _translate(request, exc))
    except (asyncio.CancelledError, ConnectionError):
        record.status = CLIENT_GONE
        record.error = record.error or "client_gone"
        raise
    except Exception:
        log.error("unexpected error while handling a request", path=request.path, exc_info=True)
        error = ProxyError("internal_error", "tcproxy failed unexpectedly; see its log")
        return _error_response(record, error)
    finally:
        record.total_s = loop.time() - record.started
        # Counted and logged once the answer is on its way: aiohttp sends it when this returns,
        # and nothing here should stand between a client and its response. The callback still
        # runs before the loop reads anyone's next request, so budgets are never a step behind.
        loop.call_soon(_finish, request.app[STATE], record)


def _error_response(record: RequestRecord, error: ProxyError) -> web.Response:
    record.status = error.status
    record.error = error.code
    response = web.json_response(error.body(), status=error.status, headers=error.headers())
    record.stamp(response)
    if error.status in (408, 413) or error.code in ("bad_path", "bad_body_encoding"):
        # The rest of the body may still be on the wire: do not read it, close.
        response.force_close()
    return response


def _translate(request: web.Request, exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return for_status(404, "unknown_path", f"no such path: {request.path}; {_NOT_FOUND}")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return for_status(
            405, "method_not_allowed", f"{request.method} is not allowed here; use {allowed}"
        )
    if exc.status == 413:
        return for_status(413, "body_too_large", "the request body is too large")
    return for_status(exc.status, "http_error", exc.reason)


def _finish(state: State, record: RequestRecord) -> None:
    try:
        for observer in state.observers:
            observer(record)
        if record.path.startswith("/-/") or record.path == "/metrics":
            level = "debug"
        else:
            level = "warning" if record.status >= 500 else "info"
        if enabled(level):
            getattr(log, level)("request", **record.fields())
    except Exception:  # a bug in counting must not take the loop's callbacks down with it
        log.error("counting a finished request failed", request_id=record.request_id, exc_info=True)
