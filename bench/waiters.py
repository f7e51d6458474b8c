"""10,000 requests waiting on one model: what they cost, and what they leave behind.

    python bench/waiters.py [--waiters 10000] [--cycles 5]

Starts the emulator and tcproxy (gpt-4 at 1 rpm, so every request but the first waits) as
separate processes. Each cycle opens WAITERS connections that each send one request, waits until
all are queued, measures the proxy's RSS and open files and how fast ``/-/healthy`` answers
meanwhile, then has every client hang up and checks that the queue empties. Repeated cycles show
whether anything is left behind. Then the same is measured once for bench/hold_server.py, a bare
aiohttp server whose handler reads the body and waits: aiohttp's own cost per waiting request,
the floor under tcproxy's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
from common import free_port, percentile, rss_mib, start_emulator, start_proxy

HERE = Path(__file__).resolve().parent
BODY = {"model": "gpt-4", "prompt": "wait", "max_tokens": 1}


async def depth(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/-/status") as response:
        status = await response.json()
    return int(status["models"].get("gpt-4", {}).get("queue_depth", 0))


async def healthy_latency(
    session: aiohttp.ClientSession, url: str, count: int = 200
) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.get(url + "/-/healthy") as response:
            await response.read()
        times.append((time.perf_counter() - started) * 1000)
    return times


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def cycle(number: int, url: str, waiters: int, probe: aiohttp.ClientSession, pid: int) -> str:
    # A source address per cycle, so closed connections in TIME_WAIT never exhaust ports.
    connector = aiohttp.TCPConnector(limit=0, local_addr=(f"127.0.0.{number + 2}", 0))
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as clients:
        tasks = [
            asyncio.create_task(clients.post(url + "/v1/completions", json=BODY))
            for _ in range(waiters)
        ]
        started = time.perf_counter()
        while await depth(probe, url) < waiters - 1:
            await asyncio.sleep(0.2)
            if time.perf_counter() - started > 120:
                raise RuntimeError("the waiters did not all queue within 120 s")
        queued_in = time.perf_counter() - started
        rss = rss_mib(pid)
        files = open_files(pid)
        latency = await healthy_latency(probe, url)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    started = time.perf_counter()
    while (left := await depth(probe, url)) > 0 and time.perf_counter() - started < 60:
        await asyncio.sleep(0.2)
    await asyncio.sleep(5)  # time for tcproxy's housekeeping to see the burst is over
    return (
        f"{number:>5} {waiters:>8} {queued_in:>8.1f}s {rss:>9.1f} {files:>7}"
        f" {percentile(latency, 50):>8.2f} {percentile(latency, 99):>8.2f}"
        f" {left:>6} {rss_mib(pid):>9.1f} {open_files(pid):>7}"
    )


async def main(waiters: int, cycles: int) -> None:
    emulator, upstream = await start_emulator()
    config = (
        "limits: {models: {gpt-4: {rpm: 1}}, max_queue: 100000, queue_timeout: 3600}\n"
        "log: {level: warning}\nserver: {keepalive_timeout: 3600}\n"
    )
    proxy, url = await start_proxy(upstream, config)
    pid = proxy.proc.pid
    try:
        async with aiohttp.ClientSession() as probe:
            async with probe.post(url + "/v1/completions", json=BODY) as first:
                assert first.status == 200  # takes the only slot of the minute
            idle_rss, idle_files = rss_mib(pid), open_files(pid)
            print(f"tcproxy idle: RSS {idle_rss:.1f} MiB, {idle_files} open files")
            print(
                f"{'cycle':>5} {'waiters':>8} {'queued':>9} {'RSS MiB':>9} {'files':>7}"
                f" {'healthy':>8} {'p99 ms':>8} {'left':>6} {'RSS after':>9} {'files':>7}"
            )
            rows = []
            for number in range(cycles):
                row = await cycle(number, url, waiters, probe, pid)
                rows.append(row)
                print(row, flush=True)
            per_waiter_kib = (float(rows[0].split()[3]) - idle_rss) * 1024 / waiters
            print(f"\nabout {per_waiter_kib:.1f} KiB per waiting request (first cycle, over idle)")
            print(
                "healthy = /-/healthy p50 ms while they wait; left = still queued after every"
                " client hung up; RSS/files after = 5 s after they are gone"
            )
    finally:
        await proxy.stop()
        await emulator.stop()
    await reference(waiters)


async def reference(waiters: int) -> None:
    """One cycle against bench/hold_server.py, for the floor aiohttp itself sets."""
    port = free_port()
    script = HERE / "hold_server.py"
    server = await asyncio.create_subprocess_exec(sys.executable, str(script), "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as probe:
            for _ in range(100):
                try:
                    await healthy_latency(probe, url, count=1)
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            idle_rss = rss_mib(server.pid)
            row = await cycle(0, url, waiters, probe, server.pid)
        held_rss = float(row.split()[3])
        print(
            f"\nbare aiohttp holding {waiters} requests (bench/hold_server.py): idle {idle_rss:.1f}"
            f" MiB, holding {held_rss:.1f} MiB, about"
            f" {(held_rss - idle_rss) * 1024 / waiters:.1f} KiB per waiting request"
        )
    finally:
        server.terminate()
        await server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.waiters, args.cycles))
