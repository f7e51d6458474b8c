"""A lean HTTP/1.1 client for the one upstream: kept-alive connections, one request at a time each.

tcproxy talks to a single origin with a handful of request shapes, on the hot path of every
request. A general-purpose client (aiohttp's) pays per request for what a proxy never uses:
cookie jars, redirects, proxies, tracing, per-read timer objects, a writer task. Here a request
is one ``write`` of a prepared head and body, the answer is parsed by llhttp (``httptools``) as it
arrives, and bytes reach the relay as they came: no decompression, chunked framing removed.

- **Pool.** Idle connections wait in a LIFO list; one idle longer than ``_IDLE_EXPIRY`` is closed
  rather than reused, since the upstream may be closing it at that very moment. A connection
  goes back only when its answer was whole, the upstream allowed keep-alive and nothing of the
  request is still unsent.
- **Connecting.** The upstream's name is looked up once for a burst of new connections and its
  addresses kept for ``_DNS_TTL`` seconds (as aiohttp does); the addresses are tried RFC 8305
  style through ``aiohappyeyeballs``, so one that never answers (a broken IPv6 route) holds up
  the next by 0.25 s, not by the whole connect timeout.
- **Timeouts.** Connecting is bounded by ``connect_timeout``. While an answer is awaited or read,
  one timer per request checks the time of the last bytes received: silence past ``read_timeout``
  ends the answer with ``UpstreamTimeout``. Nothing is rescheduled per read, and while reading is
  paused (the client is slower than the upstream) silence is not counted.
- **Back-pressure.** Past ``_HIGH_WATER`` bytes of unread body the connection stops reading
  from the upstream until the relay has taken them.

Errors are this module's own (``UpstreamFailure`` and subclasses); ``upstream`` maps them to what
a client is told.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
from collections import deque
from urllib.parse import urlsplit

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict

_IDLE_EXPIRY = 15.0  # seconds a kept-alive connection may sit unused before it is closed
_DNS_TTL = 10.0  # seconds the upstream's looked-up addresses serve new connections
_HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's recommended wait before trying the next address
_HIGH_WATER = 256 * 1024  # unread body bytes that pause reading from the upstream
_LOW_WATER = 64 * 1024
# Requests sent again on a fresh connection when a reused one closed before any answer.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class UpstreamFailure(Exception):
    """The exchange with the upstream failed."""


class ConnectFailed(UpstreamFailure):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectTimeout(UpstreamFailure):
    pass


class UpstreamTimeout(UpstreamFailure):
    """No bytes from the upstream for ``read_timeout`` seconds."""


class UpstreamReset(UpstreamFailure):
    """The connection closed before the answer was whole."""


class BadResponse(UpstreamFailure):
    """What the upstream sent is not a valid HTTP/1.1 response."""


class UnsafeHeader(ValueError):
    """A header name or value would break the request's framing: never sent."""


class Origin:
    """Where requests go: scheme, host, port and path prefix of the configured base URL."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        default = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.display = f"{parts.scheme}://{host}:{self.port}"


class Response:
    """One answer: status and headers once they arrived, the body as it arrives."""

    def __init__(self, connection: Connection, head_only: bool) -> None:
        self._connection = connection
        self._head_only = head_only
        self.status = 0
        self.reason = ""
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._until_close = False  # no length, not chunked: the body ends when the connection does
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._failure: UpstreamFailure | None = None
        self.complete = False  # the whole body has arrived
        self._released = False

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        return self._buffered

    def take(self) -> bytes:
        """Everything received and not yet read, at once (the whole body when ``complete``)."""
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def read(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end. Raises UpstreamFailure."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= _LOW_WATER:
            self._connection.resume()
        return chunk

    async def drain(self, cap: int, timeout: float) -> None:
        """Read a small answer to its end so its connection can be reused; give up past ``cap``."""
        try:
            async with asyncio.timeout(timeout):
                seen = 0
                while seen <= cap and (chunk := await self.read()):
                    seen += len(chunk)
        except (TimeoutError, UpstreamFailure):
            pass
        finally:
            self.release()

    def release(self) -> None:
        """Done with this answer: the connection is reused if it can be, closed if not."""
        if not self._released:
            self._released = True
            self._connection.finished(self)

    # Called by the connection.

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _fail(self, failure: UpstreamFailure) -> None:
        if not self.complete and self._failure is None:
            self._failure = failure
            self._wake()


class Connection(asyncio.Protocol):
    """One connection to the upstream; carries one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._headers_waiter: asyncio.Future[Response] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._reusable = True
        self._got_bytes = False  # any byte of the current answer
        self._closed_by_us = False
        self.idle_since = 0.0
        self.closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self._got_bytes = True
        response = self._response
        if response is None or response.complete:  # nothing was asked: broken or hostile
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._failed(BadResponse("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._failed(BadResponse(str(exc) or type(exc).__name__))
        except UpstreamFailure as exc:  # raised by a callback below
            self._failed(exc)

    def eof_received(self) -> bool | None:
        self._reusable = False
        self.closed = True  # the transport closes next: not a connection to hand out
        response = self._response
        if response is not None and response._until_close and response.status:
            self._message_complete()  # the end of a body that had no length
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if (
            response is not None
            and response._until_close
            and response.status
            and exc is None
            and not self._closed_by_us
        ):
            self._message_complete()  # the same, where TLS ended without a close_notify
        self._failed(UpstreamReset("the upstream closed the connection"))
        self._pool.forget(self)

    def resume_writing(self) -> None:  # a large request body drained below the high mark
        self._last_read = self._loop.time()  # the upstream is taking the body: not silent

    # httptools callbacks

    def on_message_begin(self) -> None:
        response = self._response
        if response is None or response.complete:
            # A second answer to one request: stop here, before it touches the first one.
            raise BadResponse("the upstream sent more than one answer")

    def on_status(self, reason: bytes) -> None:
        assert self._response is not None
        self._response._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        self._response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            response._raw_headers.clear()
            response._reason = b""
            return
        response.status = status
        response.reason = response._reason.decode("latin-1")
        headers = response.headers
        for name, value in response._raw_headers:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        response._raw_headers = []
        # RFC 9112 6.3: chunked framing wins; a length comes next; else the body runs to the close
        # (also when the last transfer coding is not chunked).
        codings = ",".join(headers.getall("Transfer-Encoding", ()))
        chunked = codings.rpartition(",")[2].strip().lower() == "chunked"
        response._until_close = (
            not chunked
            and (bool(codings) or "Content-Length" not in headers)
            and status not in (204, 304)
        )
        if response._head_only:
            self._reusable = False  # llhttp would wait for a body a HEAD answer never has
            self._message_complete()
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and not response._head_only:
            response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or not response.status:
            return  # the end of an interim answer
        if not self._parser.should_keep_alive():
            self._reusable = False
        self._message_complete()

    # The pool and the response

    async def send(
        self, head: bytes, body: bytes | bytearray | memoryview, timeout: float, head_only: bool
    ) -> Response:
        """Write one request and wait for the answer's headers."""
        transport = self.transport
        assert transport is not None and self._response is None
        self._got_bytes = False
        if self.closed or transport.is_closing():
            raise UpstreamReset("the connection closed before the request was sent")
        response = self._response = Response(self, head_only)
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._headers_waiter = waiter
        if len(body) <= 65536:
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            transport.write(body)
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + timeout, self._check_silence, timeout)
        try:
            return await waiter
        except BaseException:
            self._reusable = False
            response.release()
            raise
        finally:
            self._headers_waiter = None

    def finished(self, response: Response) -> None:
        if response is not self._response:
            return
        if not response.complete:
            self._reusable = False
        self._response = None
        self._cancel_timer()
        transport = self.transport
        if (
            self._reusable
            and not self.closed
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        ):
            self.resume()
            self._pool.put_back(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_read = self._loop.time()  # the pause was ours, not the upstream's silence
            self.transport.resume_reading()

    @property
    def got_bytes(self) -> bool:
        return self._got_bytes

    def close(self) -> None:
        self.closed = True
        self._closed_by_us = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    # Inside

    def _message_complete(self) -> None:
        response = self._response
        assert response is not None
        if response._failure is not None:
            return  # already ended badly: a close after a timeout is not the end of the body
        response.complete = True
        self._cancel_timer()
        response._wake()

    def _failed(self, failure: UpstreamFailure) -> None:
        self._reusable = False
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(failure)
        if self._response is not None:
            self._response._fail(failure)
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.close()

    def _check_silence(self, timeout: float) -> None:
        self._timer = None
        now = self._loop.time()
        if self._paused:
            self._last_read = now
        silent_until = self._last_read + timeout
        if now < silent_until:
            self._timer = self._loop.call_at(silent_until, self._check_silence, timeout)
        else:
            self._failed(UpstreamTimeout(f"no bytes from the upstream for {timeout:g}s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Pool:
    """Kept-alive connections to one origin; a new one is opened whenever none is idle."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._tls = ssl.create_default_context() if origin.tls else None
        self._retired = False
        self._addresses: list[aiohappyeyeballs.AddrInfoType] = []
        self._looked_up_at = -math.inf
        self._lookup: asyncio.Task[list[aiohappyeyeballs.AddrInfoType]] | None = None

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | bytearray,
        connect_timeout: float,
        read_timeout: float,
    ) -> Response:
        """Send one request; the answer once its headers are in. Raises UpstreamFailure."""
        head = self._head(method, target, headers, len(body))
        connection = self._take_idle()
        if connection is None:
            connection = await self._connect(connect_timeout)
        elif method in _IDEMPOTENT:
            try:
                return await connection.send(head, body, read_timeout, method == "HEAD")
            except UpstreamReset:
                if connection.got_bytes:
                    raise
                # A kept-alive connection the upstream closed as the request went out: as
                # aiohttp and Go's client do, an idempotent request gets one fresh connection.
                connection = await self._connect(connect_timeout)
        return await connection.send(head, body, read_timeout, method == "HEAD")

    def put_back(self, connection: Connection) -> None:
        if self._retired:
            connection.close()
            return
        now = connection.idle_since = self.loop.time()
        idle = self._idle
        idle.append(connection)
        # The LIFO list keeps its oldest at the bottom, where taking never reaches under steady
        # traffic: a burst's extra connections are closed here once they expire.
        while now - idle[0].idle_since > _IDLE_EXPIRY:
            idle.pop(0).close()

    def forget(self, connection: Connection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    @property
    def busy(self) -> bool:
        return bool(self._all)

    def retire(self) -> None:
        """The base URL changed: close idle connections now and busy ones when they finish."""
        self._retired = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def close(self) -> None:
        self.retire()
        if self._lookup is not None:
            self._lookup.cancel()
        for connection in list(self._all):
            connection.close()

    def _take_idle(self) -> Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.closed or connection.transport is None:
                continue
            if self.loop.time() - connection.idle_since > _IDLE_EXPIRY:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self, timeout: float) -> Connection:
        origin = self.origin
        try:
            async with asyncio.timeout(timeout) as deadline:
                sock = await aiohappyeyeballs.start_connection(
                    await self._look_up(),
                    happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY,
                    interleave=1,
                    loop=self.loop,
                )
                if deadline.expired():  # it can swallow the timeout's cancel as it finishes
                    sock.close()
                    raise TimeoutError
                _, connection = await self.loop.create_connection(
                    lambda: Connection(self),
                    sock=sock,
                    ssl=self._tls,
                    server_hostname=origin.host if self._tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"connecting took longer than {timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or exc.reason
            raise ConnectFailed(f"TLS certificate not trusted: {reason}") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS: {exc.reason or exc}") from None
        except OSError as exc:
            self._looked_up_at = -math.inf  # look the name up afresh next time: it may have moved
            raise ConnectFailed(exc.strerror or str(exc) or type(exc).__name__) from None
        self._all.add(connection)
        return connection

    async def _look_up(self) -> list[aiohappyeyeballs.AddrInfoType]:
        """The upstream's addresses: kept for ``_DNS_TTL``; one lookup serves every caller."""
        if self.loop.time() - self._looked_up_at < _DNS_TTL:
            return self._addresses
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = self.loop.create_task(self._resolve())
            # Seen as retrieved even when every caller gave up waiting before it failed.
            lookup.add_done_callback(_seen)
        try:
            # Shielded: a caller that times out leaves the lookup running for the others.
            return await asyncio.shield(lookup)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if lookup.cancelled() and current is not None and not current.cancelling():
                raise ConnectFailed("tcproxy is shutting down") from None  # close() ended it
            raise

    async def _resolve(self) -> list[aiohappyeyeballs.AddrInfoType]:
        origin = self.origin
        try:
            infos = await self.loop.getaddrinfo(
                origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        finally:
            self._lookup = None
        if not infos:  # as asyncio itself guards: never cache an empty answer
            raise OSError(f"no address found for {origin.host}")
        self._addresses = list(infos)
        self._looked_up_at = self.loop.time()
        return self._addresses

    def _head(self, method: str, target: str, headers: CIMultiDict[str], length: int) -> bytes:
        origin = self.origin
        lines = [f"{method} {origin.prefix}{target} HTTP/1.1", f"Host: {origin.host_header}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if length or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"Content-Length: {length}")
        lines.append("\r\n")
        head = "\r\n".join(lines)
        # Every line break is one of ours: a CR, LF or NUL inside a name or value would let it
        # smuggle a header or a second request.
        breaks = len(lines)
        if head.count("\n") != breaks or head.count("\r") != breaks or "\x00" in head:
            raise UnsafeHeader("a header name or value holds a line break or NUL")
        return head.encode("utf-8", "surrogateescape")


def _seen(task: asyncio.Task[list[aiohappyeyeballs.AddrInfoType]]) -> None:
    if not task.cancelled():
        task.exception()
