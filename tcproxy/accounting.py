"""Finding the upstream's ``usage`` token counts in a response while it is relayed unchanged.

The bytes that reach the client are never touched. A copy of what is needed is kept on the side:
for a JSON body, the body up to a cap; for an SSE stream, only a tail long enough to hold the last
events (the chunk that carries ``usage`` is the final one). Gzip and deflate are inflated on the
side, bounded, so a compressed answer is counted too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import orjson

_JSON_CAP = 4 * 1024 * 1024  # bigger JSON answers are relayed but not counted
_SSE_TAIL = 64 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, value: Any) -> Usage | None:
        if not isinstance(value, dict):
            return None
        prompt = _count(value.get("prompt_tokens"))
        completion = _count(value.get("completion_tokens"))
        if prompt is None or completion is None:
            return None
        total = _count(value.get("total_tokens"))
        return cls(prompt, completion, prompt + completion if total is None else total)

    def as_fields(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


_MAX_COUNT = 10**15  # no answer uses more; anything past it is garbage, not a count


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT:
        return value
    return None


class UsageSniffer:
    """Fed every relayed chunk; ``usage()`` at the end (or after a cut) gives what was reported."""

    __slots__ = ("_buffer", "_inflate", "_size", "_spoiled", "_sse")

    def __init__(self, content_type: str, content_encoding: str) -> None:
        self._sse = content_type.startswith("text/event-stream")
        encoding = content_encoding.strip().lower()
        self._inflate: Any = None
        self._spoiled = not (self._sse or "json" in content_type)
        if encoding == "gzip":
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflate = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            self._spoiled = True  # an encoding we cannot read: relay, do not count
        self._buffer = bytearray()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._spoiled:
            return
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk, _JSON_CAP)
            except zlib.error:
                self._spoiled = True
                return
        self._buffer += chunk
        if self._sse:
            if len(self._buffer) > 2 * _SSE_TAIL:
                del self._buffer[:-_SSE_TAIL]
        elif len(self._buffer) > _JSON_CAP:
            self._spoiled = True
            self._buffer.clear()

    def usage(self) -> Usage | None:
        if self._spoiled or not self._buffer:
            return None
        if not self._sse:
            try:
                return Usage.from_json(orjson.loads(self._buffer).get("usage"))
            except (ValueError, AttributeError):
                return None
        # Walk the events from the end: the last one with usage wins.
        text = bytes(self._buffer).replace(b"\r\n", b"\n")
        for event in reversed(text.split(b"\n\n")):
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if not data.startswith(b"{") or b'"usage"' not in data:
                    continue
                try:
                    usage = Usage.from_json(orjson.loads(data).get("usage"))
                except (ValueError, AttributeError):
                    continue
                if usage is not None:
                    return usage
        return None
