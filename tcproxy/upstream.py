"""The way to the upstream: one shared ClientSession and what its failures mean to a client.

The session is made once per application (in a cleanup context) with settings a proxy needs and
aiohttp's defaults get wrong for one:

- redirects are never followed (a 30x would carry the token to another origin): answered 502;
- no total timeout (it would cut any stream longer than five minutes): a connect timeout and a
  per-read timeout instead;
- responses are not decompressed: bytes are relayed as they came, with their Content-Encoding;
- no cookie jar (one client's cookies must never ride along with another's request), and no
  proxy settings taken from the environment;
- no connection limit: the pacer decides how many requests go, and a pool limit would hold
  released requests back and let them reach the upstream in a bunch.

This module knows the token only as the header value it is handed; it knows nothing of clients.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from tcproxy.breaker import Breaker
from tcproxy.config.model import UpstreamConfig
from tcproxy.errors import BadGateway, GatewayTimeout, ProxyError


def make_session() -> aiohttp.ClientSession:
    """The session. Timeouts and the base URL come with each request, so reloads can change them."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


_MAX_BREAKERS = 1000
# Answers that say nothing about the upstream's health: its token check and a redirect.
_NOT_A_FAILURE = frozenset({"upstream_auth_failed", "upstream_redirect"})


def _timeout(config: UpstreamConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        # connect also bounds name resolution (sock_connect does not); with no pool limit there
        # is no wait for a free connection inside it.
        total=None,
        connect=config.connect_timeout,
        sock_connect=config.connect_timeout,
        sock_read=config.read_timeout,
    )


class Upstream:
    """Sends one request upstream and maps every way that can fail to a tcproxy error."""

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession) -> None:
        self._session = session
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
        self._timeout = _timeout(config)

    async def send(
        self,
        model: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | bytearray,
    ) -> aiohttp.ClientResponse:
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
    ) -> aiohttp.ClientResponse:
        url = self.config.base_url + target
        try:
            response = await self._session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                # A view: aiohttp slices what it sends, and a slice of a bytearray is a copy.
                data=memoryview(body) if body else None,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except aiohttp.SocketTimeoutError:
            raise GatewayTimeout(
                "upstream_timeout",
                f"the upstream did not answer within {self.config.read_timeout:g}s"
                " (upstream.read_timeout); the request was sent and is not retried",
            ) from None
        except aiohttp.ClientConnectorError as exc:
            self.reachable = False
            raise BadGateway(
                "upstream_unreachable",
                f"cannot connect to the upstream at {_origin(self.config.base_url)}"
                f" ({exc.strerror or type(exc).__name__}); check upstream.base_url and the network",
            ) from None
        except TimeoutError:
            self.reachable = False
            raise GatewayTimeout(
                "upstream_timeout",
                f"connecting to the upstream took longer than {self.config.connect_timeout:g}s"
                " (upstream.connect_timeout)",
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            raise BadGateway(
                "upstream_reset",
                "the upstream closed the connection before answering; the request may or may"
                " not have been processed, so it is not retried",
            ) from None
        except aiohttp.ClientResponseError:
            raise BadGateway(
                "upstream_bad_response", "the upstream sent a response that is not valid HTTP"
            ) from None
        except aiohttp.ClientError as exc:
            raise BadGateway(
                "upstream_error", f"the request to the upstream failed ({type(exc).__name__})"
            ) from None
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


def _origin(url: str) -> str:
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


async def drain_and_release(response: aiohttp.ClientResponse, cap: int = 64 * 1024) -> None:
    """Read a small refused answer so its connection can be reused; close it if it is large."""
    try:
        async with asyncio.timeout(5):
            await response.content.read(cap)
    except (TimeoutError, aiohttp.ClientError):
        pass
    finally:
        response.release()
