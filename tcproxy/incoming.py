"""Reading a client's request: the path it may go to, its body, and the model it names.

Everything a client can get wrong is caught here with a 4xx that says what to fix. The body is
read once, bounded in size and time, and kept as bytes: it is forwarded as received (or as
aiohttp inflated it), and decoded only as far as ``model`` and ``stream``: the prompt and the
rest are checked to be UTF-8 JSON but never built into Python objects.
"""

from __future__ import annotations

import asyncio
import codecs
from typing import Any
from urllib.parse import unquote

import msgspec
import orjson
from aiohttp import web

from tcproxy.errors import BadRequest, PayloadTooLarge, RequestTimeout

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_MAX_MODEL_LENGTH = 200
_UTF8_PIECE = 1024 * 1024


def upstream_target(request: web.Request) -> str:
    """The request's path and query as they go upstream, once checked to be a plain /v1/ path."""
    raw = request.raw_path
    if not raw.startswith("/"):
        raise BadRequest(
            "bad_path",
            "tcproxy is not a forward proxy: send the path only (e.g. POST /v1/completions),"
            " not an absolute URL",
        )
    path = request.rel_url.raw_path
    if not path.startswith("/v1/"):
        raise BadRequest("bad_path", f"the path {path!r} must start with /v1/ as sent")
    if "%" in path or "/." in path or "//" in path or path.endswith("/"):
        _check_segments(path)  # a plain path (the usual case) has nothing this could find
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


def _check_segments(path: str) -> None:
    for segment in path.split("/")[2:]:
        decoded = unquote(segment)
        if (
            decoded in ("", ".", "..")
            or "/" in decoded
            or "\\" in decoded
            or not decoded.isprintable()
        ):
            raise BadRequest(
                "bad_path",
                f"the path {path!r} has an empty, '.' or '..' segment or an encoded slash;"
                " send a plain API path like /v1/completions",
            )


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes | bytearray:
    """The whole body, or 413 past ``limit`` bytes, or 408 if it does not arrive in ``timeout``."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        return await _read(request, limit, timeout)
    except web.RequestPayloadError:
        raise BadRequest(
            "bad_body_encoding",
            "the request body could not be read: its Content-Encoding does not match its bytes,"
            " or its chunked framing is broken",
        ) from None


async def _read(request: web.Request, limit: int, timeout: float) -> bytes | bytearray:
    content = request.content
    if content.is_eof() and content.total_bytes <= limit:
        # The whole body came with the headers (the usual case for a prompt): no deadline needed.
        return await content.read()
    # One growing buffer: each piece the socket delivered (inflated, if the client sent
    # Content-Encoding) is copied in once and dropped; a large buffer grows in place.
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                if len(body) + len(chunk) > limit:
                    raise _too_large(limit)
                body += chunk
    except TimeoutError:
        raise RequestTimeout(
            "body_timeout",
            f"the request body did not arrive within {timeout:g}s (server.body_timeout)",
        ) from None
    return body


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        "body_too_large",
        f"the request body is larger than {_human(limit)} (server.max_body_size); send less",
    )


class _Head(msgspec.Struct):
    """The two fields tcproxy reads from a request body."""

    model: Any = msgspec.UNSET
    stream: Any = None


# msgspec skips the fields a struct does not name without building them: a 10 MiB prompt is
# checked, not copied into a str (3 ms instead of 10 for a full parse; bench/large.py).
_HEAD = msgspec.json.Decoder(_Head)


def find_model(method: str, body: bytes | bytearray) -> tuple[str | None, bool]:
    """(model, stream) named by a JSON body. Requests without a body name no model."""
    if method not in _METHODS_WITH_BODY and not body:
        return None, False
    if not body or body.isspace():
        raise BadRequest(
            "invalid_body",
            "the request body is empty; send a JSON object such as"
            ' {"model": "gpt-4", "prompt": "Hello"}',
        )
    head = _read_head(body)
    model, stream = (head.model, head.stream) if head is not None else _explain(body)
    if model is msgspec.UNSET:
        raise BadRequest(
            "model_missing", 'the request body needs a "model", e.g. {"model": "gpt-4", ...}'
        )
    if not isinstance(model, str):
        raise BadRequest(
            "invalid_model", f'"model" must be a string such as "gpt-4", got {_json_kind(model)}'
        )
    if not model or len(model) > _MAX_MODEL_LENGTH or not model.isprintable():
        raise BadRequest(
            "invalid_model",
            f'"model" must be a model name of 1-{_MAX_MODEL_LENGTH} printable characters',
        )
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest(
            "invalid_body", f'"stream" must be true or false, got {_json_kind(stream)}'
        )
    return model, stream is True


def _read_head(body: bytes | bytearray) -> _Head | None:
    """``model`` and ``stream`` the fast way, or None for a body that is not valid UTF-8 JSON
    (the full parser then says what is wrong)."""
    if not _is_utf8(body):  # msgspec does not check the strings it skips
        return None
    try:
        return _HEAD.decode(body)
    except (msgspec.DecodeError, RecursionError):  # msgspec stops nesting at Python's limit
        return None


def _is_utf8(body: bytes | bytearray) -> bool:
    if body.isascii():  # most bodies, and anything json.dumps wrote with its defaults
        return True
    # In pieces, so a large prompt is checked without building it whole as a str.
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(body)
    try:
        for start in range(0, len(view), _UTF8_PIECE):
            decoder.decode(view[start : start + _UTF8_PIECE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _explain(body: bytes | bytearray) -> tuple[Any, Any]:
    """A body the fast decoder refused, parsed whole to say where it is wrong (or, should the two
    parsers ever disagree, to read it after all)."""
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            "invalid_json",
            f"the request body is not valid JSON: {exc.msg}"
            f" (line {exc.lineno}, column {exc.colno})",
        ) from None
    if not isinstance(document, dict):
        raise BadRequest(
            "invalid_body",
            f"the request body must be a JSON object, got {_json_kind(document)}",
        )
    return document.get("model", msgspec.UNSET), document.get("stream")


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"
