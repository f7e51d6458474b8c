"""tcproxy as a service: the real ``tcproxy serve`` process, its signals, systemd and metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcproxy.emulator import EMULATOR, EmulatorSettings
from tcproxy.service import start_emulator
from tests.processes import Process, free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tcproxy.service"
TOKEN = "tc-service-secret-TOKEN-71c0ffee"


class Served:
    """An emulator in this process and ``tcproxy serve --config`` as a child process."""

    def __init__(self, tmp_path: Path) -> None:
        self.config_path = tmp_path / "config.yaml"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None
        self.upstream = None

    def write_config(self, limits: str = "gpt-4: {rpm: 6000}", extra: str = "") -> None:
        self.config_path.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"upstream:\n  base_url: {self.upstream.url}\n"
            f"limits:\n  models:\n    {limits}\n"
            f"{extra}"
        )

    async def start(
        self, env: dict[str, str] | None = None, emulator: EmulatorSettings | None = None, **config
    ) -> None:
        settings = emulator or EmulatorSettings()
        self.upstream = await start_emulator(
            EmulatorSettings(**{**settings.__dict__, "token": TOKEN})
        )
        self.write_config(**config)
        self.process = await Process.start(
            ["serve", "--config", str(self.config_path)],
            env={"TOKENCHEAP_API_KEY": TOKEN, **(env or {})},
        )
        await self.process.wait_healthy(self.url + "/-/healthy")

    def lines(self) -> list[dict]:
        return [
            json.loads(line)
            for line in self.process.stdout.decode().splitlines()
            if line.startswith("{")
        ]

    async def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            await self.process.finish()
        if self.upstream is not None:
            await self.upstream.close()


@pytest.fixture
async def served(tmp_path):
    instance = Served(tmp_path)
    yield instance
    await instance.close()


async def status(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "/-/status") as response:
        return await response.json()


async def test_reload_under_load_changes_limits_without_failing_a_request(served):
    await served.start(limits="gpt-4: {rpm: 600}")
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.post(
                served.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}
            ) as r:
                await r.read()
                statuses.append(r.status)

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session)) for _ in range(20)]
        await asyncio.sleep(1.0)
        assert (await status(served.url))["models"]["gpt-4"]["rpm"] == 600
        served.write_config(limits="gpt-4: {rpm: 3000}")
        served.process.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*clients)
    assert (await status(served.url))["models"]["gpt-4"]["rpm"] == 3000
    assert len(statuses) > 50 and set(statuses) == {200}
    assert await served.process.stop() == 0
    assert any(line["event"] == "config reloaded" for line in served.lines())


async def test_queued_requests_follow_the_new_pace_after_reload(served):
    await served.start(limits="gpt-4: {rpm: 6}")  # one release every 10 s
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4", "prompt": "x"}
        first = await session.post(served.url + "/v1/completions", json=body)
        assert first.status == 200
        waiting = [
            asyncio.create_task(session.post(served.url + "/v1/completions", json=body))
            for _ in range(5)
        ]
        await asyncio.sleep(0.5)
        assert (await status(served.url))["models"]["gpt-4"]["queue_depth"] == 5
        served.write_config(limits="gpt-4: {rpm: 6000}")
        served.process.proc.send_signal(signal.SIGHUP)
        done = await asyncio.wait_for(asyncio.gather(*waiting), 5)  # not the 50 s of the old pace
        assert [r.status for r in done] == [200] * 5


async def test_broken_config_on_reload_keeps_the_running_one(served):
    await served.start(limits="gpt-4: {rpm: 600}")
    served.config_path.write_text("limits:\n  models:\n    gpt-4: {rpm: lots}\nnonsense: 1\n")
    served.process.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            served.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}
        )
        assert response.status == 200
    assert (await status(served.url))["models"]["gpt-4"]["rpm"] == 600
    assert await served.process.stop() == 0
    (rejected,) = [line for line in served.lines() if line["event"].startswith("reload rejected")]
    assert rejected["level"] == "error"
    assert any("limits.models.gpt-4.rpm" in p for p in rejected["problems"])
    assert any("nonsense: unknown key" in p for p in rejected["problems"])


async def test_changed_listen_on_reload_is_reported_as_needing_a_restart(served):
    await served.start()
    served.config_path.write_text(
        served.config_path.read_text().replace(str(served.port), str(free_port()))
    )
    served.process.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert (await status(served.url))["listen"] == f"127.0.0.1:{served.port}"
    await served.process.stop()
    (warning,) = [line for line in served.lines() if "restart" in line["event"]]
    assert warning["keys"] == ["listen.port"]


async def test_sigterm_lets_a_long_stream_finish_and_exits_0(served):
    await served.start(emulator=EmulatorSettings(stream_delay=0.2))
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4", "prompt": "x", "max_tokens": 10, "stream": True}
        response = await session.post(served.url + "/v1/completions", json=body)
        assert response.status == 200
        await asyncio.sleep(0.3)
        served.process.proc.send_signal(signal.SIGTERM)
        text = (await response.read()).decode()
    assert text.count("data: {") == 10 and text.endswith("data: [DONE]\n\n")
    assert await served.process.finish() == 0
    events = [line["event"] for line in served.lines()]
    assert events.index("request") < events.index("stopped")


async def test_sigterm_answers_requests_still_queued_with_503(served):
    await served.start(limits="gpt-4: {rpm: 1}", extra="server:\n  shutdown_timeout: 2.5\n")
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4", "prompt": "x"}
        assert (await session.post(served.url + "/v1/completions", json=body)).status == 200
        queued = [
            asyncio.create_task(session.post(served.url + "/v1/completions", json=body))
            for _ in range(3)
        ]
        await asyncio.sleep(0.3)
        served.process.proc.send_signal(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*queued), 10)
        for response in answers:
            assert response.status == 503
            assert response.headers["X-TCProxy-Error"] == "shutting_down"
            assert "Retry-After" in response.headers
    assert await served.process.finish() == 0
    assert served.upstream.app[EMULATOR].requests == 1  # none of the queued ones went upstream


async def test_systemd_notifications(tmp_path, served):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    messages: list[str] = []

    async def expect(field: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(field in m.split("\n") for m in messages):
            remaining = deadline - loop.time()
            assert remaining > 0, f"no {field} in {messages}"
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), remaining)
            except TimeoutError:
                continue
            messages.append(data.decode())

    try:
        await served.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        await expect("READY=1")
        assert any(m.startswith("READY=1\nSTATUS=listening on") for m in messages)
        await expect("WATCHDOG=1")
        served.process.proc.send_signal(signal.SIGHUP)
        await expect("RELOADING=1")
        messages.clear()
        await expect("READY=1")
        served.process.proc.send_signal(signal.SIGTERM)
        await expect("STOPPING=1")
        assert await served.process.finish() == 0
    finally:
        sock.close()


async def test_metrics_parse_as_prometheus_text(served):
    await served.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await (
                await session.post(
                    served.url + "/v1/completions", json={"model": "gpt-4", "prompt": "hi"}
                )
            ).read()
        await (await session.post(served.url + "/v1/completions", data=b"{")).read()
        async with session.get(served.url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    ok = (("client", "-"), ("model", "gpt-4"), ("source", "upstream"), ("status", "200"))
    bad = (("client", "-"), ("model", "none"), ("source", "tcproxy"), ("status", "400"))
    assert samples[("tcproxy_requests_total", ok)] == 3
    assert samples[("tcproxy_requests_total", bad)] == 1
    completion = (("client", "-"), ("kind", "completion"), ("model", "gpt-4"))
    assert samples[("tcproxy_tokens_total", completion)] == 48
    assert samples[("tcproxy_queue_wait_seconds_count", (("model", "gpt-4"),))] == 3
    assert samples[("tcproxy_upstream_latency_seconds_count", (("model", "gpt-4"),))] == 3
    assert samples[("tcproxy_limit_rpm", (("model", "gpt-4"),))] == 6000
    assert samples[("tcproxy_queue_depth", (("model", "gpt-4"),))] == 0
    assert samples[("tcproxy_released_last_minute", (("model", "gpt-4"),))] == 3
    assert samples[("tcproxy_upstream_up", ())] == 1
    assert "tcproxy_info" in families
    assert TOKEN not in text


async def test_ready_reflects_the_upstream(served):
    await served.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url + "/-/ready") as response:
            assert response.status == 200  # not tried yet counts as fine
        await served.upstream.close()  # the upstream goes away
        served.upstream = None
        async with session.post(
            served.url + "/v1/completions", json={"model": "gpt-4"}
        ) as response:
            assert response.status == 502
        async with session.get(served.url + "/-/ready") as response:
            assert response.status == 503
            assert "could not be reached" in (await response.json())["problems"][0]


async def test_journald_lines_keep_structure_without_a_second_timestamp(served):
    await served.start(env={"JOURNAL_STREAM": "8:12345"})
    async with aiohttp.ClientSession() as session:
        await (await session.post(served.url + "/v1/completions", json={"model": "gpt-4"})).read()
    await served.process.stop()
    lines = served.process.stdout.decode().splitlines()
    assert lines and all(line.startswith("<6>{") or line.startswith("<4>{") for line in lines)
    records = [json.loads(line[3:]) for line in lines]
    assert all("timestamp" not in record for record in records)
    assert any(record["event"] == "request" for record in records)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_unit_exposure_is_at_most_1_5():
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=15", str(UNIT)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    score = float(last.split("level for tcproxy.service:")[1].split()[0])
    assert score <= 1.5, last


async def test_reload_that_would_leave_a_wide_listen_without_keys_is_refused(stack, logs):
    import dataclasses

    from tcproxy.clients import new_key
    from tcproxy.config import ListenConfig, parse_config
    from tcproxy.service import Service, Source

    _, digest = new_key()
    s = await stack(f"clients:\n  alice: {{key_sha256: {digest}}}\n")
    state = s.state
    # As if it were running on the LAN: listen is restart-only, so a reload keeps it.
    state.config = dataclasses.replace(state.config, listen=ListenConfig("0.0.0.0", 8787))
    edited = parse_config(f"upstream: {{base_url: '{s.upstream.url}'}}\n")  # clients removed
    service = Service(Source(lambda: edited, token=state.token), logs.control)
    assert service.reload(state) is False
    assert state.clients.required  # alice's key is still needed
    rejected = [e for e in logs.events() if e["event"].startswith("reload rejected")]
    assert "reachable from the network" in rejected[-1]["problems"][0]
