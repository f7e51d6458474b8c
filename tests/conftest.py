"""Shared fixtures: a real proxy in front of a real emulator, both on ephemeral loopback ports.

``stack(...)`` starts the TokenCheap emulator and tcproxy exactly as ``tcproxy serve`` does
(same runner, same settings) and returns handles to both. Logging is configured for every test
with the production processors, writing into a buffer that tests can read and search.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml

from tcproxy.config import Config, Secret, parse_config
from tcproxy.emulator import EMULATOR, Emulator, EmulatorSettings
from tcproxy.log import LogControl, configure_logging
from tcproxy.server import Listening
from tcproxy.service import start_emulator, start_proxy
from tcproxy.state import STATE, State

# Distinctive, so a search of everything written finds it if it ever leaks.
UPSTREAM_TOKEN = "tc-UPSTREAM-secret-5f0c2a9e77d14b6c"
# Every secret a test hands to a proxy (client keys add themselves): none may ever come back out.
SECRETS: set[str] = {UPSTREAM_TOKEN}


class Witness:
    """Everything a test's proxies said: every answer their clients read, their logs, their
    /metrics and /-/status. ``assert_no_secrets`` searches all of it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def on_end(session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
            self.seen.append(str(params.response.headers))

        async def on_chunk(session: Any, context: Any, params: Any) -> None:
            self.seen.append(params.chunk.decode("utf-8", "replace"))

        config.on_request_end.append(on_end)
        config.on_response_chunk_received.append(on_chunk)
        return config

    def assert_no_secrets(self, *more: str) -> None:
        from tests import rawhttp

        everything = "\n".join([*self.seen, *rawhttp.RECEIVED, *more])
        for secret in SECRETS:
            assert secret not in everything, "a secret appeared in what the proxy wrote"


class LogBuffer(io.TextIOBase):
    """A thread-safe text stream the log writer thread can write to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)


class Logs:
    def __init__(self, control: LogControl, buffer: LogBuffer) -> None:
        self.control = control
        self.buffer = buffer

    def text(self) -> str:
        self.control.flush()
        return self.buffer.text()

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.text().splitlines() if line.strip()]
        return [line for line in lines if event is None or line.get("event") == event]

    def requests(self) -> list[dict[str, Any]]:
        return self.events("request")

    async def wait_requests(self, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Access lines once ``count`` of them are written (a stream's line follows its end)."""
        async with asyncio.timeout(timeout):
            while len(lines := self.requests()) < count:
                await asyncio.sleep(0.01)
        return lines


class SwitchableStream(io.TextIOBase):
    """Where the log writer thread writes: the current test's buffer."""

    def __init__(self) -> None:
        self.target = LogBuffer()

    def write(self, text: str) -> int:
        return self.target.write(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="session")
def _logging() -> Any:
    # structlog caches loggers on first use, as in production, so logging is configured once
    # per session and each test gets a fresh buffer behind it.
    stream = SwitchableStream()
    control = configure_logging("debug", "json", stream=stream, env={})
    control.add_secret(UPSTREAM_TOKEN)
    yield control, stream
    control.close()
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def logs(_logging: Any) -> Any:
    control, stream = _logging
    control.flush()
    stream.target = buffer = LogBuffer()
    control.set_level("debug")
    return Logs(control, buffer)


@dataclasses.dataclass
class Stack:
    proxy: Listening
    upstream: Listening
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def emulator(self) -> Emulator:
        return self.upstream.app[EMULATOR]

    @property
    def state(self) -> State:
        return self.proxy.app[STATE]

    async def post(self, path: str = "/v1/completions", **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.session.post(self.url + path, **kwargs)

    async def complete(self, model: str = "gpt-4", **body: Any) -> aiohttp.ClientResponse:
        headers = body.pop("headers", None)
        payload = {"model": model, "prompt": "Hello, world!", "max_tokens": 5, **body}
        return await self.post(json=payload, headers=headers)


StackFactory = Callable[..., Any]


def proxy_config(base_url: str, extra: str = "") -> Config:
    """A config listening on a free loopback port, in front of ``base_url``, plus ``extra`` YAML."""
    tree = yaml.safe_load(extra) or {}
    tree.setdefault("listen", "127.0.0.1:0")
    tree.setdefault("upstream", {})["base_url"] = base_url
    return parse_config(yaml.safe_dump(tree), source="<test config>")


@pytest.fixture
async def stack(logs: Logs) -> AsyncIterator[StackFactory]:
    """Start an emulator and a proxy in front of it; ``config`` is extra YAML for the proxy.

    When the test ends, everything its proxies wrote and answered is searched for secrets.
    """
    from tests import rawhttp

    opened: list[Any] = []
    proxies: list[Listening] = []
    witness = Witness()
    rawhttp.RECEIVED.clear()

    async def make(
        config: str = "",
        *,
        emulator: EmulatorSettings | None = None,
        time_scale: float = 1.0,
        upstream_url: str | None = None,
        ledger_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Stack:
        settings = dataclasses.replace(
            emulator or EmulatorSettings(), token=UPSTREAM_TOKEN, time_scale=time_scale
        )
        upstream = await start_emulator(settings)
        opened.append(upstream)
        proxy = await start_proxy(
            proxy_config(upstream_url or upstream.url, config),
            Secret(UPSTREAM_TOKEN),
            time_scale=time_scale,
            ledger_path=ledger_path,
            clock=clock,
        )
        opened.append(proxy)
        proxies.append(proxy)
        session = aiohttp.ClientSession(trace_configs=[witness.trace_config()])
        opened.append(session)
        return Stack(proxy, upstream, session)

    yield make
    if proxies:
        async with aiohttp.ClientSession(trace_configs=[witness.trace_config()]) as session:
            for proxy in proxies:
                for path in ("/metrics", "/-/status"):
                    try:
                        async with session.get(proxy.url + path, ssl=False) as response:
                            await response.read()
                    except aiohttp.ClientError:
                        pass  # a test that stopped its proxy already
    for item in reversed(opened):
        await item.close()
    witness.assert_no_secrets(logs.text())
