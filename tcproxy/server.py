"""Putting an application on a socket, with the settings a long-running proxy needs.

- ``handler_cancellation``: a client that hangs up cancels its handler, so a request whose client
  left while it waited in a queue never reaches the upstream.
- ``keepalive_timeout`` bounds idle connections and also connections whose headers never
  complete (aiohttp arms it from the first byte); bodies have their own deadline in ``incoming``.
- Malformed HTTP (bad header bytes, smuggling shapes) is answered by aiohttp's parser before any
  middleware runs, as plain text; ``_JsonErrorProtocol`` makes those answers use the OpenAI error
  shape too, and logs them without echoing the offending bytes.
- aiohttp's own access log is off: the middleware writes one richer line per request.

Used for the proxy and for the emulator alike.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("tcproxy.server")


class PureParserRefused(RuntimeError):
    pass


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 and up). Raises OSError or ssl.SSLError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def require_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS).

    A proxy's safety against request smuggling rests on a strict parser; the C one (llhttp) is
    the one aiohttp hardens first, and the pure-Python one is many times slower.
    """
    from aiohttp import http_parser

    if os.environ.get("AIOHTTP_NO_EXTENSIONS") or http_parser.HttpRequestParser is getattr(
        http_parser, "HttpRequestParserPy", None
    ):
        raise PureParserRefused(
            "aiohttp is running without its C extensions (AIOHTTP_NO_EXTENSIONS is set, or they"
            " are not installed); tcproxy needs the C HTTP parser. Unset AIOHTTP_NO_EXTENSIONS"
            " or reinstall aiohttp from a wheel for this platform."
        )


class _JsonErrorProtocol(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if status == 500:
            code, text = "internal_error", "tcproxy failed unexpectedly; see its log"
            kind = "server_error"
            log.error("unhandled error", error=type(exc).__name__ if exc else None)
        else:
            code, kind = "bad_http", "invalid_request_error"
            text = (
                "malformed HTTP request (invalid request line, header or framing);"
                " the client must send valid HTTP/1.1"
            )
            # The offending bytes are not logged: they may be a client's credentials.
            log.info(
                "rejected malformed HTTP request",
                status=status,
                error=type(exc).__name__ if exc else None,
                peer=request.remote,
            )
        body = {"error": {"message": text, "type": kind, "code": code}}
        response = web.Response(
            status=status,
            text=json.dumps(body),
            content_type="application/json",
            headers={
                "X-TCProxy-Error": code,
                # Every response carries these; this request never got as far as an id.
                "X-Request-Id": os.urandom(16).hex(),
                "X-TCProxy-Queue-Ms": "0",
            },
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no public hook for the protocol class; this is pinned by a test that
        # sends a malformed request and expects the JSON shape.
        server.__class__ = _Server
        return server


@dataclass
class Listening:
    """An application bound to a socket."""

    runner: web.AppRunner
    site: web.BaseSite
    host: str
    port: int
    tls_context: ssl.SSLContext | None = None

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls_context else 'http'}://{host}:{self.port}"

    async def stop_accepting(self) -> None:
        """Close the listening socket; connections already open carry on."""
        await self.site.stop()

    async def close(self) -> None:
        """aiohttp's graceful shutdown: stop listening, close idle connections, wait up to
        ``shutdown_timeout`` for handlers still running, then run the cleanup contexts."""
        await self.runner.cleanup()


async def listen(
    app: web.Application,
    host: str,
    port: int,
    *,
    keepalive_timeout: float = 75.0,
    shutdown_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Listening:
    sock = bind(host, port)
    runner = _Runner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
        handle_signals=False,
    )
    try:
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return Listening(runner, site, host, sock.getsockname()[1], ssl_context)


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening socket (port 0 picks a free one); raises OSError with the reason."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
