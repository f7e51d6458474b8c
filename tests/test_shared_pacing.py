"""Several instances, one budget: pacing shared through a real Redis.

Uses the machine's Redis at 127.0.0.1:6379 (database 15, a key prefix of its own per test,
removed afterwards), and Redis servers started here on free ports for outages. Without Redis
these tests skip with a message, except where TCPROXY_REQUIRE_SERVICES is set (CI), where a
missing Redis is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from tcproxy.config import Secret
from tcproxy.emulator import EMULATOR, EmulatorSettings, max_in_window
from tcproxy.server import Listening
from tcproxy.service import start_emulator, start_proxy
from tcproxy.state import STATE
from tests.conftest import UPSTREAM_TOKEN, proxy_config
from tests.processes import free_port

SCALE = 30
RPM = 120
SHARED_REDIS = ("127.0.0.1", 6379)
DB = 15


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _missing(what: str) -> None:
    if os.environ.get("TCPROXY_REQUIRE_SERVICES"):
        pytest.fail(f"{what} (TCPROXY_REQUIRE_SERVICES is set, so this is a failure)")
    pytest.skip(f"{what}; these tests need Redis")


@pytest.fixture
async def shared_redis() -> AsyncIterator[tuple[str, str]]:
    """(URL, key prefix) on the machine's Redis; every key under the prefix is removed after."""
    if not _reachable(*SHARED_REDIS):
        _missing("no Redis at 127.0.0.1:6379")
    prefix = f"tcproxy-test-{uuid.uuid4().hex[:12]}"
    url = f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/{DB}"
    yield url, prefix
    client = aioredis.Redis.from_url(url)
    keys = [key async for key in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class OwnRedis:
    """A Redis server of the test's own on a free port, which the test may stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _missing("redis-server is not installed")
        self.process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            if _reachable("127.0.0.1", self.port):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("own redis-server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    server = OwnRedis()
    yield server
    await server.stop()


class Fleet:
    """One emulator (the shared upstream) and several tcproxy instances in front of it."""

    def __init__(self) -> None:
        self.upstream: Listening | None = None
        self.proxies: list[Listening] = []
        self.session = aiohttp.ClientSession()

    async def start(
        self,
        backend: str,
        instances: int,
        prefix: str = "tcproxy",
        extra: str = "",
        rpm: int = RPM,
        burst: int | None = None,
    ) -> None:
        self.upstream = await start_emulator(
            EmulatorSettings(
                token=UPSTREAM_TOKEN, time_scale=SCALE, rpm={"gpt-4": rpm}, enforce="sliding"
            )
        )
        limit = f"{{rpm: {rpm}}}" if burst is None else f"{{rpm: {rpm}, burst: {burst}}}"
        for _ in range(instances):
            config = proxy_config(
                self.upstream.url,
                f"limits:\n  models:\n    gpt-4: {limit}\n  safety_margin: 0.01\n"
                f"  backend: '{backend}'\n  redis_prefix: {prefix}\n  instances: {instances}\n"
                f"  redis_timeout: 0.2\n{extra}",
            )
            self.proxies.append(await start_proxy(config, Secret(UPSTREAM_TOKEN), time_scale=SCALE))

    @property
    def emulator(self):
        return self.upstream.app[EMULATOR]

    async def complete(self, index: int) -> int:
        url = self.proxies[index].url + "/v1/completions"
        async with self.session.post(url, json={"model": "gpt-4", "prompt": "hi"}) as response:
            await response.read()
            return response.status

    async def saturate(self, minutes: float, workers: int = 15) -> list[list[int]]:
        """Keep every instance's gpt-4 queue busy; returns the statuses each instance got."""
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + minutes * 60 / SCALE
        statuses: list[list[int]] = [[] for _ in self.proxies]

        async def worker(index: int) -> None:
            while loop.time() < stop_at:
                statuses[index].append(await self.complete(index))

        await asyncio.gather(*(worker(i) for i in range(len(self.proxies)) for _ in range(workers)))
        return statuses

    async def status(self, index: int) -> dict:
        async with self.session.get(self.proxies[index].url + "/-/status") as response:
            return await response.json()

    async def close(self) -> None:
        for proxy in self.proxies:
            await proxy.close()
        if self.upstream is not None:
            await self.upstream.close()
        await self.session.close()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    instances = Fleet()
    yield instances
    await instances.close()


async def test_three_instances_share_one_budget(fleet, shared_redis):
    url, prefix = shared_redis
    await fleet.start(url, instances=3, prefix=prefix)
    assert [(await fleet.status(i))["pacing"] for i in range(3)] == ["redis"] * 3
    minutes = 2
    statuses = await fleet.saturate(minutes)
    stats = fleet.emulator.models["gpt-4"]
    assert stats.rate_limited == 0
    assert all(set(s) == {200} for s in statuses)
    arrivals = sorted(stats.arrivals)
    assert max_in_window(arrivals) <= RPM
    in_run = [t for t in arrivals if t < arrivals[0] + minutes * 60]
    assert len(in_run) / (RPM * minutes) >= 0.97
    shares = [len(s) / sum(map(len, statuses)) for s in statuses]
    assert all(share > 0.25 for share in shares), shares  # each a fair third, give or take


async def test_a_429_seen_by_one_instance_pauses_all(fleet, shared_redis):
    url, prefix = shared_redis
    await fleet.start(url, instances=2, prefix=prefix, rpm=6000)
    fleet.emulator.inject("rate-limit=60")  # 60 emulated seconds: 2 s of real time
    refused = asyncio.create_task(fleet.complete(0))  # refused once, pauses, retries after it
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await fleet.complete(1) == 200
    assert loop.time() - started > 1.2  # instance 1 waited out a pause it never saw itself
    assert await refused == 200
    assert fleet.emulator.models["gpt-4"].rate_limited == 1


async def test_redis_down_and_back(fleet, own_redis, logs):
    await own_redis.start()
    await fleet.start(own_redis.url, instances=2)
    assert await fleet.complete(0) == 200
    await own_redis.stop()
    for _ in range(3):  # no Redis: requests keep flowing on the local fallback
        assert await fleet.complete(0) == 200
        assert await fleet.complete(1) == 200
    status = await fleet.status(0)
    assert status["pacing"] == "local fallback"
    async with fleet.session.get(fleet.proxies[0].url + "/metrics") as response:
        assert "tcproxy_pacing_fallback 1.0" in await response.text()
    warnings = [e for e in logs.events() if e["event"].startswith("Redis unreachable")]
    assert len(warnings) == 2  # once per instance, not once per request
    await own_redis.start()  # the same port again
    for _ in range(60):
        if [(await fleet.status(i))["pacing"] for i in range(2)] == ["redis"] * 2:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("did not switch back to Redis")
    assert await fleet.complete(1) == 200
    assert any(e["event"].startswith("Redis answers again") for e in logs.events())


async def test_wrong_redis_url_serves_on_the_fallback(fleet, logs):
    await fleet.start(f"redis://:s3cret-redis-pw@127.0.0.1:{free_port()}/0", instances=2)
    assert await fleet.complete(0) == 200
    status = await fleet.status(0)
    assert status["pacing"] == "local fallback"
    assert "s3cret-redis-pw" not in logs.text() + str(status)
    (warning,) = [e for e in logs.events() if e["event"].startswith("Redis unreachable")][:1]
    assert warning["redis"].startswith("redis://:****@127.0.0.1")
    assert warning["share"] == 0.5


async def test_slow_redis_never_holds_a_request_past_its_timeout(fleet):
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, read, say nothing

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await fleet.start(f"redis://127.0.0.1:{port}/0", instances=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await fleet.complete(0) == 200
        assert loop.time() - started < 1.0  # redis_timeout is 0.2 s
        assert (await fleet.status(0))["pacing"] == "local fallback"
    finally:
        server.close()


async def test_fallback_paces_at_the_configured_share(fleet):
    await fleet.start(f"redis://127.0.0.1:{free_port()}/0", instances=4, rpm=120)
    pacer = fleet.proxies[0].app[STATE].limiter.queue("gpt-4").pacer
    assert pacer._local.limit.rpm == 30  # a quarter of 120


async def test_the_fallback_remembers_what_went_through_redis(fleet, own_redis):
    await own_redis.start()
    # One instance with the whole budget (share 1): six slots a minute, all at once.
    await fleet.start(own_redis.url, instances=1, rpm=6, extra="  queue_timeout: 0.3\n", burst=6)
    for _ in range(6):
        assert await fleet.complete(0) == 200
    await own_redis.stop()
    # Redis is gone: the local pacer takes over knowing those six (and with no fresh burst), so
    # the minute stays spent.
    assert await fleet.complete(0) == 429
    assert fleet.emulator.models["gpt-4"].accepted == 6
    local = fleet.proxies[0].app[STATE].limiter.queue("gpt-4").pacer._local
    assert local.releases_within(asyncio.get_running_loop().time(), 60 / SCALE) == 6
