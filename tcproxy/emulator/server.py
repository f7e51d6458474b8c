"""The TokenCheap emulator: an aiohttp app that behaves like the documented API.

It is the proxy's test upstream and a feature for users who want to try their tools offline:
401 on a wrong token, 402 once a balance is spent, 429 with Retry-After past a model's rpm
(counted one of three ways, see ``ratelimit``), completions with ``usage``, SSE streaming,
latency, a time scale so a "minute" can pass in a second, and faults on request.

Faults come from ``inject()`` (or ``POST /_emulator/inject?fault=SPEC&count=N``) for the next
requests, from the ``X-Emulator-Fault`` request header (the proxy relays it like any other
header), or from ``EmulatorSettings.fault`` for every request:

    status=CODE          answer CODE with an error body (e.g. status=503)
    rate-limit[=S]       429 with Retry-After: S (default 1)
    rate-limit-date=S    429 with Retry-After as an HTTP date S seconds ahead
    rate-limit-bare      429 without Retry-After
    payment              402, as when the balance is spent
    unauthorized         401, as when the token is wrong
    close                close the connection before any response
    hang                 never answer
    slow-headers=S       wait S seconds, then answer normally
    stall=S              wait S seconds between SSE events
    reset-mid-stream=N   abort the connection after N SSE events (or N KiB of a plain body)
    garbage              200 with a body that is not JSON
    redirect             307 to another origin (a proxy must never follow it)
    gzip                 gzip the JSON answer
    huge=BYTES           a 200 JSON-typed body of BYTES bytes
    endless              a 200 body that never ends
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tcproxy.config.model import DOCUMENTED_RPM
from tcproxy.emulator.completions import CompletionRequest, InvalidRequest, error_body
from tcproxy.emulator.ratelimit import RateEnforcer

FAULT_HEADER = "X-Emulator-Fault"


@dataclass(frozen=True)
class EmulatorSettings:
    """How the emulated upstream behaves.

    >>> EmulatorSettings(token="sk-test", enforce="bucket", time_scale=60).time_scale
    60
    """

    token: str | None = None  # None: any non-empty bearer token is accepted
    rpm: Mapping[str, int] = field(default_factory=lambda: dict(DOCUMENTED_RPM))
    unknown_model_rpm: int | None = None  # None: unknown models get 404 model_not_found
    enforce: str = "sliding"
    time_scale: float = 1.0
    balance: int | None = None  # tokens; None: never runs out
    latency: float = 0.0  # seconds before answering
    stream_delay: float = 0.0  # seconds between SSE events
    fault: str | None = None  # applied to every request (unless the header names another)
    fault_rate: float = 1.0  # share of requests that get ``fault``


@dataclass
class ModelStats:
    accepted: int = 0
    rate_limited: int = 0
    arrivals: list[float] = field(default_factory=list)  # emulated seconds, every arrival


class Emulator:
    """State of one emulated upstream; ``app`` serves it."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self.balance = self.settings.balance
        self.models: dict[str, ModelStats] = {}
        self.requests = 0
        self.unauthorized = 0
        self.seen: deque[CIMultiDict[str]] = deque(maxlen=200)  # request headers, for tests
        self.cancelled = 0  # requests whose client went away before the answer was complete
        self.in_flight = 0
        self._enforcers: dict[str, RateEnforcer] = {}
        self._injected: deque[str] = deque()  # faults for the next requests, one each
        self._t0 = 0.0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app[EMULATOR] = self
        self.app.on_startup.append(self._start_clock)
        self.app.router.add_post("/v1/completions", self._completion("completion"))
        self.app.router.add_post("/v1/chat/completions", self._completion("chat"))
        self.app.router.add_get("/v1/models", self._list_models)
        self.app.router.add_get("/_emulator/stats", self._stats)
        self.app.router.add_post("/_emulator/reset", self._reset)
        self.app.router.add_post("/_emulator/inject", self._inject)

    def inject(self, fault: str, count: int = 1) -> None:
        """Give the next ``count`` completion requests ``fault`` (then behave normally)."""
        self._injected.extend([fault] * count)

    # -- time ---------------------------------------------------------------------------

    async def _start_clock(self, app: web.Application) -> None:
        self._t0 = asyncio.get_running_loop().time()

    def now(self) -> float:
        """Emulated seconds since start."""
        return (asyncio.get_running_loop().time() - self._t0) * self.settings.time_scale

    async def _sleep(self, emulated_seconds: float) -> None:
        await asyncio.sleep(emulated_seconds / self.settings.time_scale)

    # -- handlers -----------------------------------------------------------------------

    def _completion(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            self.in_flight += 1
            try:
                return await self._answer(kind, request)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.in_flight -= 1

        return handler

    async def _answer(self, kind: str, request: web.Request) -> web.StreamResponse:
        self.seen.append(CIMultiDict(request.headers))
        fault_name, fault_arg = self._fault_for(request)
        if not self._authorized(request) or fault_name == "unauthorized":
            self.unauthorized += 1
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(
                400,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
            )
        try:
            completion = CompletionRequest.parse(kind, body)
        except InvalidRequest as exc:
            return _error(400, str(exc), "invalid_request_error", None, exc.param)
        enforcer = self._enforcer(completion.model)
        if enforcer is None:
            return _error(
                404,
                f"The model '{completion.model}' does not exist.",
                "invalid_request_error",
                "model_not_found",
            )
        if fault_name == "payment" or (self.balance is not None and self.balance <= 0):
            return _error(
                402, "Insufficient token balance.", "insufficient_quota", "insufficient_balance"
            )
        stats = self.models.setdefault(completion.model, ModelStats())
        now = self.now()
        stats.arrivals.append(now)
        wait = enforcer.admit(now)
        if wait is not None or fault_name.startswith("rate-limit"):
            stats.rate_limited += 1
            return _rate_limited(wait if wait is not None else 1.0, fault_name, fault_arg)
        stats.accepted += 1
        if self.balance is not None:
            self.balance -= completion.usage()["total_tokens"]
        return await self._deliver(request, completion, fault_name, fault_arg)

    async def _deliver(
        self, request: web.Request, completion: CompletionRequest, fault: str, arg: str
    ) -> web.StreamResponse:
        settings = self.settings
        if settings.latency:
            await asyncio.sleep(settings.latency)
        if fault == "status":
            status = int(arg or 500)
            return _error(status, f"Emulated upstream error {status}.", "server_error", None)
        if fault == "close":
            _drop(request, abort=False)
            return web.Response()  # never reaches the client: the connection is gone
        if fault == "hang":
            await asyncio.sleep(3600 * 24)
        if fault == "slow-headers":
            await asyncio.sleep(float(arg or 5))
        if fault == "garbage":
            return web.Response(
                status=200, body=b"<html>not json at all", content_type="application/json"
            )
        if fault == "redirect":
            return web.Response(
                status=307, headers={"Location": "http://127.0.0.1:9/v1/completions"}
            )
        if fault in ("huge", "endless"):
            return await _big_body(request, int(arg or 0) if fault == "huge" else None)
        if completion.stream:
            return await self._stream(request, completion, fault, arg)
        payload = json.dumps(completion.body()).encode()
        if fault == "reset-mid-stream":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            _drop(request, abort=True)
            return response
        if fault == "gzip":
            return web.Response(
                body=gzip.compress(payload),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        return web.Response(body=payload, content_type="application/json")

    async def _stream(
        self, request: web.Request, completion: CompletionRequest, fault: str, arg: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        delay = float(arg) if fault == "stall" else self.settings.stream_delay
        cut_after = int(arg or 1) if fault == "reset-mid-stream" else None
        for i, event in enumerate(completion.events()):
            if cut_after is not None and i >= cut_after:
                _drop(request, abort=True)
                return response
            if i and delay:
                await asyncio.sleep(delay)
            await response.write(event)
        await response.write_eof()
        return response

    async def _list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        data = [{"id": m, "object": "model", "owned_by": "tokencheap"} for m in self.settings.rpm]
        return web.json_response({"object": "list", "data": data})

    async def _stats(self, request: web.Request) -> web.Response:
        with_arrivals = request.query.get("arrivals") == "1"
        models = {
            name: {
                "accepted": s.accepted,
                "rate_limited": s.rate_limited,
                **({"arrivals": s.arrivals} if with_arrivals else {}),
            }
            for name, s in self.models.items()
        }
        return web.json_response(
            {
                "requests": self.requests,
                "unauthorized": self.unauthorized,
                "cancelled": self.cancelled,
                "in_flight": self.in_flight,
                "balance": self.balance,
                "time_scale": self.settings.time_scale,
                "enforce": self.settings.enforce,
                "models": models,
            }
        )

    async def _inject(self, request: web.Request) -> web.Response:
        fault = request.query.get("fault", "")
        try:
            count = int(request.query.get("count", "1"))
        except ValueError:
            count = 0
        if not fault or count < 1:
            return _error(400, "use ?fault=SPEC&count=N", "invalid_request_error", None)
        self.inject(fault, count)
        return web.json_response({"injected": fault, "count": count})

    async def _reset(self, request: web.Request) -> web.Response:
        self.models.clear()
        self._enforcers.clear()
        self.requests = self.unauthorized = self.cancelled = 0
        self.balance = self.settings.balance
        self._t0 = asyncio.get_running_loop().time()
        return web.json_response({"reset": True})

    # -- helpers ------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return self.settings.token is None or token.strip() == self.settings.token

    def _enforcer(self, model: str) -> RateEnforcer | None:
        enforcer = self._enforcers.get(model)
        if enforcer is None:
            rpm = self.settings.rpm.get(model, self.settings.unknown_model_rpm)
            if rpm is None:
                return None
            enforcer = self._enforcers[model] = RateEnforcer(rpm, self.settings.enforce)
        return enforcer

    def _fault_for(self, request: web.Request) -> tuple[str, str]:
        spec = self._injected.popleft() if self._injected else request.headers.get(FAULT_HEADER)
        if spec is None and self.settings.fault and random.random() < self.settings.fault_rate:
            spec = self.settings.fault
        if not spec:
            return "", ""
        name, _, arg = spec.strip().partition("=")
        return name.strip().lower(), arg.strip()


def _error(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> web.Response:
    return web.json_response(error_body(message, type_, code, param), status=status)


def _rate_limited(wait: float, fault: str, arg: str) -> web.Response:
    headers = {}
    if fault == "rate-limit-date":
        headers["Retry-After"] = formatdate(time.time() + float(arg or 1), usegmt=True)
    elif fault != "rate-limit-bare":
        seconds = float(arg) if fault == "rate-limit" and arg else wait
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    body = error_body(
        "Rate limit reached for requests per minute.", "requests", "rate_limit_exceeded"
    )
    return web.json_response(body, status=429, headers=headers)


def _drop(request: web.Request, *, abort: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if abort:
        transport.abort()
    else:
        transport.close()


async def _big_body(request: web.Request, size: int | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if size is not None:
        response.content_length = size
    await response.prepare(request)
    block = b"x" * 65536
    sent = 0
    while size is None or sent < size:
        piece = block if size is None else block[: size - sent]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


def build_emulator(settings: EmulatorSettings | None = None) -> Emulator:
    return Emulator(settings)


EMULATOR = web.AppKey("tcproxy_emulator", Emulator)
