"""The way to the upstream, and what its failures mean to a client.

Requests go through ``http1.Pool``, made for the base URL with what a proxy needs and a
general-purpose client gets wrong for one:

- redirects are never followed (a 30x would carry the token to another origin): answered 502;
- no total timeout (it would cut any stream longer than five minutes): a connect timeout and a
  timeout on silence between the upstream's bytes instead;
- responses are not decompressed: bytes are relayed as they came, with their Content-Encoding;
- no cookies (one client's cookies must never ride along with another's request), and no proxy
  settings taken from the environment;
- no connection limit: the pacer decides how many requests go, and a pool limit would hold
  released requests back and let them reach the upstream in a bunch.

This module knows the token only as the header value it is handed; it knows nothing of clients.
"""

from __future__ import annotations

from collections import Counter

from multidict import CIMultiDict

from tcproxy import http1
from tcproxy.breaker import Breaker
from tcproxy.config.model import UpstreamConfig
from tcproxy.errors import BadGateway, BadRequest, GatewayTimeout, ProxyError

UpstreamResponse = http1.Response


_MAX_BREAKERS = 1000
# Answers that say nothing about the upstream's health: its token check and a redirect.
_NOT_A_FAILURE = frozenset({"upstream_auth_failed", "upstream_redirect"})


class Upstream:
    """Sends one request upstream and maps every way that can fail to a tcproxy error."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._pool: http1.Pool | None = None
        self._retired: list[http1.Pool] = []  # earlier base URLs' pools, busy ones still closing
        self.failures: Counter[str] = Counter()  # by error code, for /-/status and /metrics
        self.reachable: bool | None = None  # None: not tried yet
        self._breakers: dict[str, Breaker] = {}
        self.configure(config)

    def breaker(self, model: str) -> Breaker:
        breaker = self._breakers.get(model)
        if breaker is None:
            if len(self._breakers) >= _MAX_BREAKERS:  # model names come from clients
                self._breakers = {m: b for m, b in self._breakers.items() if b.state != "closed"}
            breaker = self._breakers[model] = Breaker(model)
        return breaker

    def open_circuits(self) -> dict[str, str]:
        return {m: b.state for m, b in self._breakers.items() if b.state != "closed"}

    def configure(self, config: UpstreamConfig) -> None:
        """Use a reloaded config for the requests that follow."""
        self.config = config
        if self._pool is None or self._pool.origin.base_url != config.base_url:
            if self._pool is not None:
                self._pool.retire()
                self._retired = [p for p in self._retired if p.busy] + [self._pool]
            self._pool = http1.Pool(http1.Origin(config.base_url))

    def close(self) -> None:
        for pool in [*self._retired, self._pool]:
            if pool is not None:
                pool.close()

    async def send(
        self,
        model: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | bytearray,
    ) -> UpstreamResponse:
        """The upstream's response with headers read and the body still to come."""
        breaker = self.breaker(model)
        breaker.check(send=True)
        try:
            response = await self._answer(method, target, headers, body)
        except ProxyError as error:
            self.failures[error.code] += 1
            if error.code in _NOT_A_FAILURE:
                breaker.succeeded()  # the upstream answered: it is up
            else:
                breaker.failed(self.config.circuit_breaker)
            raise
        if response.status >= 500:
            breaker.failed(self.config.circuit_breaker)
        else:
            breaker.succeeded()
        return response

    async def _answer(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | bytearray
    ) -> UpstreamResponse:
        config = self.config
        assert self._pool is not None
        try:
            response = await self._pool.request(
                method, target, headers, body, config.connect_timeout, config.read_timeout
            )
        except http1.UpstreamTimeout:
            raise GatewayTimeout(
                "upstream_timeout",
                f"the upstream did not answer within {config.read_timeout:g}s"
                " (upstream.read_timeout); the request was sent and is not retried",
            ) from None
        except http1.ConnectFailed as exc:
            self.reachable = False
            raise BadGateway(
                "upstream_unreachable",
                f"cannot connect to the upstream at {self._pool.origin.display}"
                f" ({exc.reason}); check upstream.base_url and the network",
            ) from None
        except http1.ConnectTimeout:
            self.reachable = False
            raise GatewayTimeout(
                "upstream_timeout",
                f"connecting to the upstream took longer than {config.connect_timeout:g}s"
                " (upstream.connect_timeout)",
            ) from None
        except http1.UpstreamReset:
            raise BadGateway(
                "upstream_reset",
                "the upstream closed the connection before answering; the request may or may"
                " not have been processed, so it is not retried",
            ) from None
        except http1.BadResponse:
            raise BadGateway(
                "upstream_bad_response", "the upstream sent a response that is not valid HTTP"
            ) from None
        except http1.UnsafeHeader as exc:
            raise BadRequest("bad_header", f"the request cannot be sent upstream: {exc}") from None
        self.reachable = True
        if 300 <= response.status < 400:
            response.release()
            raise BadGateway(
                "upstream_redirect",
                f"the upstream answered with a redirect ({response.status}); tcproxy never"
                " follows one, since it would carry the token elsewhere. Check upstream.base_url",
            )
        if response.status == 401:
            response.release()
            raise BadGateway(
                "upstream_auth_failed",
                "the upstream refused the token stored on the tcproxy host (not your key):"
                " whoever runs tcproxy should fix the token there (TOKENCHEAP_API_KEY,"
                " upstream.token_file or the systemd credential) and reload",
            )
        return response
