"""The forwarding handler for ``/v1/*``: read → wait for a slot → upstream → stream back.

One way through: the body is read and its model found (``incoming``), the request waits in its
model's queue (``pacing``), goes upstream with the stored token (``headers``, ``upstream``), and
the answer is relayed chunk by chunk as it arrives, its ``usage`` noted on the side
(``accounting``). A 429 from the upstream pauses the model and puts the request back at the head
of its queue; the client sees a 429 only once its own deadline has passed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from email.utils import parsedate_to_datetime

import structlog
from aiohttp import web
from multidict import CIMultiDict

from tcproxy import headers as hdrs
from tcproxy.accounting import UsageSniffer
from tcproxy.config.model import ClientConfig
from tcproxy.errors import BadGateway, ServiceUnavailable
from tcproxy.http1 import UpstreamFailure, UpstreamTimeout
from tcproxy.incoming import find_model, read_body, upstream_target
from tcproxy.record import RECORD, RequestRecord
from tcproxy.state import STATE, State
from tcproxy.upstream import UpstreamResponse

log = structlog.get_logger("tcproxy.proxy")

_BACKOFF_BASE = 1.0  # seconds (upstream time) before the first retry of a bare 429
_BACKOFF_CAP = 60.0
_RETRY_AFTER_CAP = 3600.0


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    record = request[RECORD]
    if state.draining:
        raise ServiceUnavailable(
            "shutting_down", "tcproxy is shutting down; retry in a moment", retry_after=5
        )
    # Who is asking comes first: a request without a valid key is not even read.
    client = state.clients.identify(request.headers.get("Authorization"))
    if client is not None:
        record.client = client.name
    server = state.config.server
    target = upstream_target(request)
    body = await read_body(request, server.max_body_size, server.body_timeout)
    record.bytes_in = len(body)
    record.model, record.stream = find_model(request.method, body)
    if client is not None and record.model is not None:
        state.budgets.check(client)  # a spent budget costs nothing upstream
    response = await _send(request, state, record, client, target, body)
    return await _relay(request, response, record, state.config.upstream.max_response_size)


def _upstream_headers(
    request: web.Request, state: State, record: RequestRecord, body: bytes | bytearray
) -> CIMultiDict[str]:
    """Built once the request's slot has come: a request waiting in the queue holds no copy."""
    headers = hdrs.to_upstream(
        request.headers, state.authorization(), record.request_id, has_body=bool(body)
    )
    if body:
        # aiohttp inflated a compressed request body; it goes upstream as plain bytes.
        headers.popall("Content-Encoding", None)
    return headers


async def _send(
    request: web.Request,
    state: State,
    record: RequestRecord,
    client: ClientConfig | None,
    target: str,
    body: bytes | bytearray,
) -> UpstreamResponse:
    loop = asyncio.get_running_loop()
    if record.model is None:  # no model, no documented limit: straight through
        headers = _upstream_headers(request, state, record, body)
        started = loop.time()
        response = await _upstream_answer(state, "-", request.method, target, headers, body)
        record.upstream_s = loop.time() - started
        return response
    limits = state.config.limits
    queue = state.limiter.queue(record.model)
    assert state.upstream is not None
    state.upstream.breaker(queue.model).check(send=False)  # failing fast costs no slot
    deadline = loop.time() + limits.queue_timeout
    capped = state.limiter.client_queue(client) if client is not None else None
    waited_from = loop.time()
    try:
        if capped is not None:  # the client's own rpm cap first, then its model's line
            await capped.wait_turn(record.client, deadline - waited_from)
    finally:
        record.queue_s += loop.time() - waited_from
    prepared: CIMultiDict[str] | None = None
    while True:
        waited_from = loop.time()
        try:
            await queue.wait_turn(record.client, deadline - waited_from, front=record.retries > 0)
        finally:
            record.queue_s += loop.time() - waited_from
        if prepared is None:
            prepared = _upstream_headers(request, state, record, body)
        started = loop.time()
        response = await _upstream_answer(
            state, queue.model, request.method, target, prepared, body
        )
        record.upstream_s = loop.time() - started
        record.upstream_status = response.status
        if response.status != 429:
            return response
        pause = _retry_after(response.headers.get("Retry-After"), state.time_scale)
        if pause is None:
            pause = _backoff(record.retries) / state.time_scale
        resume = loop.time() + pause
        queue.pacer.pause(resume)
        state.limiter.note_refusal(queue.model)
        if record.retries >= limits.max_retries or resume >= deadline:
            return response  # the upstream's own 429, Retry-After and all
        log.info(
            "upstream refused with 429; model paused, request back at the head of its queue",
            request_id=record.request_id,
            model=record.model,
            pause_s=round(pause, 3),
            retry=record.retries + 1,
        )
        await response.drain(64 * 1024, timeout=5)  # so its connection can be reused
        record.retries += 1


async def _upstream_answer(
    state: State,
    model: str,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: bytes | bytearray,
) -> UpstreamResponse:
    """Send upstream, and keep the alarms for lasting conditions (token refused, balance spent)."""
    upstream = state.upstream
    assert upstream is not None, "the upstream session is opened at start-up"
    try:
        response = await upstream.send(model, method, target, headers, body)
    except BadGateway as error:
        if error.code == "upstream_auth_failed":
            state.alarms.begin(
                "upstream_auth_failed",
                "the upstream refuses the stored token (401); every request fails until the token"
                " on this host is fixed and tcproxy reloaded",
            )
        raise
    if response.status == 402:
        state.alarms.begin(
            "balance_spent",
            "the upstream answers 402: the TokenCheap balance is spent; requests fail until it"
            " is topped up",
        )
    elif response.status < 400:
        state.alarms.end("balance_spent", "the upstream accepts requests again (balance restored)")
        state.alarms.end("upstream_auth_failed", "the upstream accepts the stored token again")
    return response


def _retry_after(value: str | None, time_scale: float) -> float | None:
    """Loop seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value) / time_scale
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, in upstream seconds."""
    ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0**attempt)
    return ceiling * random.uniform(0.5, 1.0)


async def _relay(
    request: web.Request, upstream: UpstreamResponse, record: RequestRecord, cap: int
) -> web.StreamResponse:
    """Stream the upstream's answer to the client as it arrives.

    An SSE stream may run as long as it likes; any other body is cut off past ``cap`` bytes.
    """
    loop = asyncio.get_running_loop()
    started = loop.time() - (record.upstream_s or 0.0)  # when the request went upstream
    content_type = upstream.headers.get("Content-Type", "")
    sse = content_type.startswith("text/event-stream")
    sniffer = UsageSniffer(content_type, upstream.headers.get("Content-Encoding", ""))
    # (A HEAD answer goes the long way: it keeps the Content-Length of the body it stands for.)
    if not sse and upstream.complete and upstream.buffered <= cap and request.method != "HEAD":
        return _whole(upstream, record, sniffer, started)
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=hdrs.from_upstream(upstream.headers),
    )
    record.stamp(response)
    try:
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.read()
            except UpstreamFailure as exc:
                # The upstream broke off (reset, timeout) after its headers were relayed.
                record.error = (
                    "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_reset"
                )
                break
            if not chunk:
                break
            if sse:
                record.events += chunk.count(b"data:")
            elif record.bytes_out + len(chunk) > cap:
                record.error = "upstream_response_too_large"
                log.warning(
                    "upstream answer larger than upstream.max_response_size; cut off",
                    request_id=record.request_id,
                    cap=cap,
                )
                break
            sniffer.feed(chunk)
            # A client that went away raises ConnectionError here; the middleware logs it.
            await response.write(chunk)
            record.bytes_out += len(chunk)
    finally:
        upstream.release()
        record.usage = sniffer.usage()
        record.upstream_s = loop.time() - started
    if record.error:
        await _cut(request, response, sse, record)
    else:
        await response.write_eof()
    return response


def _whole(
    upstream: UpstreamResponse, record: RequestRecord, sniffer: UsageSniffer, started: float
) -> web.Response:
    """An answer that arrived complete with its headers (most completions): sent in one piece.

    Nothing waits here: relaying "as it arrives" and relaying at once are the same thing.
    """
    body = upstream.take()
    upstream.release()
    sniffer.feed(body)
    record.usage = sniffer.usage()
    record.bytes_out = len(body)
    record.upstream_s = asyncio.get_running_loop().time() - started
    headers = hdrs.from_upstream(upstream.headers)
    headers.popall("Content-Length", None)  # aiohttp sets it from the body
    response = web.Response(
        status=upstream.status, reason=upstream.reason, headers=headers, body=body
    )
    record.stamp(response)
    return response


async def _cut(
    request: web.Request, response: web.StreamResponse, sse: bool, record: RequestRecord
) -> None:
    """End a relay the upstream broke off, so the client can tell it is incomplete."""
    if sse and response.prepared:
        # An SSE client gets an error event it can act on, then a clean end without [DONE].
        event = {
            "error": {
                "message": "the upstream connection broke off mid-stream; the answer is incomplete",
                "type": "upstream_error",
                "code": record.error,
            }
        }
        try:
            await response.write(b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n")
            await response.write_eof()
            return
        except ConnectionError:
            pass
    # Any other body: close the connection mid-body, which every HTTP client reports as a
    # truncated response, rather than ending it as if it were whole.
    response.force_close()
    transport = request.transport
    if transport is not None:
        transport.abort()
