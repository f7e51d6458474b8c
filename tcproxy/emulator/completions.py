"""What the emulated upstream answers: completion bodies and SSE chunks in the OpenAI shapes.

Text is deterministic for a given prompt, so tests can compare a response through the proxy with
one fetched directly. One "token" is one word.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_WORDS = (
    "the quick brown fox jumps over a lazy dog while cheap tokens stream past every idle proxy"
    " that paces its requests politely and never hears a single refusal from upstream"
).split(" ")

DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    """The request body does not fit the API; the message says which parameter and why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    kind: str  # "completion" or "chat"
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    seed: int

    @classmethod
    def parse(cls, kind: str, body: Any) -> CompletionRequest:
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", "model")
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidRequest("'messages' must be a non-empty list", "messages")
            text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        else:
            prompt = body.get("prompt", "")
            if isinstance(prompt, list):
                prompt = " ".join(str(p) for p in prompt)
            if not isinstance(prompt, str):
                raise InvalidRequest("'prompt' must be a string or a list of strings", "prompt")
            text = prompt
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest("'max_tokens' must be a whole number of at least 1", "max_tokens")
        options = body.get("stream_options") or {}
        return cls(
            kind=kind,
            model=model,
            prompt_tokens=max(1, len(text.split())),
            max_tokens=min(max_tokens, 4096),
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            seed=int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big"),
        )

    def words(self) -> list[str]:
        return [_WORDS[(self.seed + i * 7) % len(_WORDS)] for i in range(self.max_tokens)]

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.max_tokens,
            "total_tokens": self.prompt_tokens + self.max_tokens,
        }

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl"
        else:
            obj, prefix = "text_completion", "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model,
        }

    def body(self) -> dict[str, Any]:
        text = " ".join(self.words())
        reply = self._envelope(chunk=False)
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}
        reply["choices"] = [choice]
        reply["usage"] = self.usage()
        return reply

    def events(self) -> Iterator[bytes]:
        """The SSE events of a streamed answer, ``[DONE]`` included.

        The chunk with the finish reason carries ``usage`` (TokenCheap's documentation is silent;
        this is the shape the proxy must handle). With ``stream_options.include_usage`` a
        separate usage-only chunk follows, as OpenAI sends it.
        """
        envelope = self._envelope(chunk=True)
        words = self.words()
        for i, word in enumerate(words):
            last = i == len(words) - 1
            piece = word if i == 0 else " " + word
            if self.kind == "chat":
                delta: dict[str, Any] = {"content": piece}
                if i == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"text": piece, "index": 0, "logprobs": None}
            choice["finish_reason"] = "length" if last else None
            chunk = {**envelope, "choices": [choice]}
            if last:
                chunk["usage"] = self.usage()
            yield _event(chunk)
        if self.include_usage:
            yield _event({**envelope, "choices": [], "usage": self.usage()})
        yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
