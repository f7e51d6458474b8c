"""10,000 idle keep-alive connections: what each costs, and whether new requests still flow.

    python bench/idle.py [--connections 10000]

Starts the emulator and tcproxy as separate processes. Opens CONNECTIONS connections that each
make one request and then sit idle (keep-alive), measures tcproxy's RSS and open files, and
times fresh requests on other connections meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp
from common import percentile, rss_mib, start_emulator, start_proxy

REQUEST = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"


async def hold(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(count):
        # A source address per thousand connections, so ports never run short.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(f"127.0.0.{2 + i // 1000}", 0)
        )
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(16)  # {"status": "ok"}
        writers.append(writer)
    return writers


async def latencies(url: str, count: int = 300) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, json={"model": "gpt-4", "prompt": "hi"}) as response:
                await response.read()
                assert response.status == 200
            times.append((time.perf_counter() - started) * 1000)
    return times


async def main(connections: int) -> None:
    emulator, upstream = await start_emulator("--rpm", "gpt-4=1000000")
    config = (
        "limits: {models: {gpt-4: {rpm: 1000000}}}\nlog: {level: warning}\n"
        "server: {keepalive_timeout: 3600}\nledger: false\n"
    )
    proxy, url = await start_proxy(upstream, config)
    pid = proxy.proc.pid
    port = int(url.rsplit(":", 1)[1])
    try:
        before = await latencies(url + "/v1/completions")
        idle_rss, idle_files = rss_mib(pid), len(os.listdir(f"/proc/{pid}/fd"))
        started = time.perf_counter()
        writers = await hold(port, connections)
        opened = time.perf_counter() - started
        await asyncio.sleep(2)
        rss, files = rss_mib(pid), len(os.listdir(f"/proc/{pid}/fd"))
        during = await latencies(url + "/v1/completions")
        print(f"{connections} idle keep-alive connections opened in {opened:.1f} s")
        print(
            f"tcproxy RSS: {idle_rss:.1f} MiB before, {rss:.1f} MiB with them open"
            f" ({(rss - idle_rss) * 1024 / connections:.1f} KiB per connection)"
        )
        print(f"open files: {idle_files} before, {files} with them open")
        print(
            f"a fresh request meanwhile: p50 {percentile(during, 50):.2f} ms,"
            f" p99 {percentile(during, 99):.2f} ms (before: p50 {percentile(before, 50):.2f} ms,"
            f" p99 {percentile(before, 99):.2f} ms)"
        )
        for writer in writers:
            writer.close()
        await asyncio.sleep(2)
        files = len(os.listdir(f"/proc/{pid}/fd"))
        print(f"after they close: RSS {rss_mib(pid):.1f} MiB, open files {files}")
    finally:
        await proxy.stop()
        await emulator.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().connections))
