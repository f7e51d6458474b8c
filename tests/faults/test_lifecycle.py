"""Faults around the process: its log output failing or stuck, its clock jumping."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tcproxy.config import ModelLimit
from tcproxy.emulator import EmulatorSettings, max_in_window
from tcproxy.pacing.pacer import bucket_shape
from tests.processes import Process, serve_config

SCALE = 30
RPM = 120


async def _hammer(url: str, count: int) -> list[float]:
    """Send ``count`` requests, 16 at a time; returns each one's latency in seconds."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(16)

        async def one() -> None:
            async with semaphore:
                started = time.perf_counter()
                async with session.post(url, json={"model": "gpt-4", "prompt": "hi"}) as response:
                    await response.read()
                    assert response.status == 200
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one() for _ in range(count)))
    return latencies


async def _lost_lines(base: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("tcproxy_log_lines_lost_total "):
                return float(line.split()[1])
    raise AssertionError("no tcproxy_log_lines_lost_total in /metrics")


async def _proxy_process(tmp_path, stdout) -> tuple[Process, str, object]:
    """tcproxy as a process with its stdout where the test says, in front of an emulator here."""
    from tcproxy.service import start_emulator

    upstream = await start_emulator(EmulatorSettings(token="t0ken", rpm={"gpt-4": 1_000_000}))
    extra = "limits: {models: {gpt-4: {rpm: 1000000}}}\nledger: false\n"
    process, base, _ = await serve_config(tmp_path, upstream.url, extra, stdout=stdout)
    return process, base, upstream


async def test_log_output_on_a_full_disk_does_not_stop_requests(tmp_path):
    full = await asyncio.to_thread(open, "/dev/full", "wb")  # every write fails with ENOSPC
    try:
        process, base, upstream = await _proxy_process(tmp_path, full)
    finally:
        full.close()  # the child has its own copy
    try:
        await _hammer(base + "/v1/completions", 500)
        await asyncio.sleep(0.3)
        assert await _lost_lines(base) >= 500
        assert await process.stop() == 0
    finally:
        process.kill()
        await upstream.close()


async def test_log_output_nobody_reads_does_not_stall_requests(tmp_path):
    read_end, write_end = os.pipe()  # a pipe this test never reads until the end
    try:
        process, base, upstream = await _proxy_process(tmp_path, write_end)
    finally:
        os.close(write_end)
    try:
        # The pipe holds 64 KiB, a few hundred log lines; then the log writer thread blocks on
        # it. Requests must not notice: latency stays low, nothing fails. The lines wait in
        # the writer's backlog (up to 20,000; past that they are dropped and counted).
        latencies = await _hammer(base + "/v1/completions", 3000)
        latencies.sort()
        assert latencies[int(len(latencies) * 0.99)] < 0.5
        process.proc.send_signal(signal.SIGTERM)
        drained = await asyncio.to_thread(_read_all, read_end)
        assert await process.finish() == 0
    finally:
        process.kill()
        os.close(read_end)
        await upstream.close()
    assert drained.count(b'"event":"request"') == 3000  # once read, nothing was lost


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
async def test_wall_clock_jump_during_load_does_not_disturb_pacing(stack, monkeypatch, jump):
    margin, seconds = 0.02, 3.0  # real seconds; a minute lasts 2 s here
    s = await stack(
        f"limits:\n  models:\n    gpt-4: {{rpm: {RPM}}}\n  safety_margin: {margin}\n",
        emulator=EmulatorSettings(enforce="fixed", rpm={"gpt-4": RPM}),
        time_scale=SCALE,
    )
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    real_time = time.time

    async def worker() -> None:
        while loop.time() < stop_at:
            response = await s.complete()
            assert response.status == 200

    async def jump_clock() -> None:
        await asyncio.sleep(seconds / 3)
        monkeypatch.setattr(time, "time", lambda: real_time() + jump)  # the wall clock leaps

    await asyncio.gather(jump_clock(), *(worker() for _ in range(20)))
    stats = s.emulator.models["gpt-4"]
    assert stats.rate_limited == 0
    assert max_in_window(sorted(stats.arrivals)) <= RPM
    # ...and the pace went on as before the jump: one release per bucket interval.
    capacity, period = bucket_shape(ModelLimit(RPM), margin, 60 / SCALE)
    assert len(stats.arrivals) >= 0.9 * seconds / (period / capacity)


async def test_sigterm_with_requests_in_flight_and_queued_answers_every_one(tmp_path):
    from tcproxy.service import start_emulator

    upstream = await start_emulator(EmulatorSettings(token="t0ken", latency=0.5))
    extra = "limits: {models: {gpt-4: {rpm: 2}}}\nserver: {shutdown_timeout: 3}\nledger: false\n"
    process, base, _ = await serve_config(tmp_path, upstream.url, extra)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{base}/v1/completions"
            requests = [
                asyncio.create_task(session.post(url, json={"model": "gpt-4", "prompt": str(i)}))
                for i in range(5)
            ]
            await asyncio.sleep(0.2)  # one in flight (0.5 s upstream latency), four queued
            process.proc.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*requests), 10)
            statuses = sorted(response.status for response in answers)
        assert statuses == [200, 503, 503, 503, 503]
        assert await process.finish() == 0
    finally:
        process.kill()
        await upstream.close()
