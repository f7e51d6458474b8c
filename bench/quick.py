"""A first look: latency through tcproxy vs. straight to the emulator, and a stream's timing.

    python bench/quick.py [--requests 500]

Starts ``tcproxy emulate`` and ``tcproxy serve`` as separate processes on free loopback ports,
sends the same requests one at a time to each, and prints p50/p99 latency; then streams one
completion through the proxy and prints when each SSE event arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.processes import Process, free_port

TOKEN = "bench-token"


async def timed(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    body = {"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 16}
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            await r.read()
            assert r.status == 200, r.status
        times.append((time.perf_counter() - started) * 1000)
    return times


def summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return f"{name:<22} p50 {statistics.median(times):6.2f} ms   p99 {p99:6.2f} ms"


async def main(requests: int) -> None:
    up, px = free_port(), free_port()
    emulator = await Process.start(
        [
            "emulate",
            "--port",
            str(up),
            "--token",
            TOKEN,
            "--stream-delay",
            "0.05",
            "--rpm",
            "gpt-4=1000000",
        ]
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(
            f"listen: 127.0.0.1:{px}\nupstream: {{base_url: 'http://127.0.0.1:{up}'}}\n"
            "limits: {models: {gpt-4: {rpm: 1000000}}}\nlog: {level: warning}\n"
        )
    proxy = await Process.start(
        ["serve", "--config", config.name], env={"TOKENCHEAP_API_KEY": TOKEN}
    )
    try:
        await emulator.wait_healthy(f"http://127.0.0.1:{up}/_emulator/stats")
        await proxy.wait_healthy(f"http://127.0.0.1:{px}/-/healthy")
        async with aiohttp.ClientSession() as session:
            direct_url = f"http://127.0.0.1:{up}/v1/completions"
            proxy_url = f"http://127.0.0.1:{px}/v1/completions"
            await timed(session, direct_url, 50)  # warm up both paths
            await timed(session, proxy_url, 50)
            direct = await timed(session, direct_url, requests)
            proxied = await timed(session, proxy_url, requests)
            print(f"{requests} sequential requests, one connection, {os.cpu_count()} cores")
            print(summary("direct to emulator", direct))
            print(summary("through tcproxy", proxied))
            added = statistics.median(proxied) - statistics.median(direct)
            print(f"{'added by tcproxy':<22} p50 {added:6.2f} ms")
            print("\nstreamed completion through tcproxy (emulator sends an event every 50 ms):")
            started = time.perf_counter()
            body = {"model": "gpt-4", "prompt": "stream", "max_tokens": 8, "stream": True}
            async with session.post(proxy_url, json=body) as response:
                async for chunk in response.content.iter_any():
                    for event in chunk.split(b"\n\n"):
                        if event.startswith(b"data:"):
                            at = (time.perf_counter() - started) * 1000
                            print(f"  +{at:7.1f} ms  {event[:60].decode()}...")
    finally:
        await proxy.stop()
        await emulator.stop()
        os.unlink(config.name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    asyncio.run(main(parser.parse_args().requests))
