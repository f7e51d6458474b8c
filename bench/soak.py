"""A long run with clients that hang up at random: does anything grow?

    python bench/soak.py [--minutes 30] [--workers 100] [--sample 30]

Starts the emulator (streams with a pause between events, a little latency) and tcproxy (gpt-4
paced low enough that requests queue) as separate processes. WORKERS clients loop: some complete
their request, some hang up while queued, some mid-stream, some mid-answer. Every SAMPLE seconds
it prints tcproxy's RSS, open files and queue depth, and at the end what the log holds: errors,
warnings, "Task exception was never retrieved", and the request count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from pathlib import Path

import aiohttp
from common import Process, free_port, rss_mib, start_emulator

BODY = {"model": "gpt-4", "prompt": "soak", "max_tokens": 20}


async def client(
    url: str, session: aiohttp.ClientSession, stop_at: float, tally: dict[str, int]
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        kind = random.choice(
            ("complete", "complete", "stream", "leave-queued", "leave-streaming", "leave-early")
        )
        body = {**BODY, "stream": kind in ("stream", "leave-streaming")}
        try:
            if kind in ("leave-queued", "leave-early"):
                task = asyncio.create_task(session.post(url, json=body))
                await asyncio.sleep(random.uniform(0.0, 0.5))
                task.cancel()  # the client hangs up, wherever its request is
                with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                    await task
            else:
                async with session.post(url, json=body) as response:
                    if kind == "leave-streaming":
                        await response.content.readuntil(b"\n\n")
                        response.close()
                    else:
                        await response.read()
            tally[kind] = tally.get(kind, 0) + 1
        except aiohttp.ClientError as exc:
            tally["client error " + type(exc).__name__] = (
                tally.get("client error " + type(exc).__name__, 0) + 1
            )


async def main(minutes: float, workers: int, sample: float) -> None:
    emulator, upstream = await start_emulator(
        "--stream-delay", "0.05", "--latency", "0.02", "--rpm", "gpt-4=100000"
    )
    port = free_port()
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    config = folder / f"tcproxy-soak-{port}.yaml"
    log_path = folder / f"tcproxy-soak-{port}.log"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nupstream: {{base_url: '{upstream}'}}\n"
        "limits: {models: {gpt-4: {rpm: 3000}}}\n"
        f"ledger: {{path: '{folder / f'tcproxy-soak-{port}.db'}'}}\n"
    )
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        *Process.argv(["serve", "--config", str(config)]),
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        env=Process.environment({"TOKENCHEAP_API_KEY": "bench-token"}),
    )
    proxy = Process(proc)
    base = f"http://127.0.0.1:{port}"
    tally: dict[str, int] = {}
    try:
        await proxy.wait_healthy(base + "/-/healthy")
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + minutes * 60
        connector = aiohttp.TCPConnector(limit=0)
        print(f"{'minute':>7} {'RSS MiB':>8} {'files':>6} {'queued':>7} {'done':>8}", flush=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [
                asyncio.create_task(client(base + "/v1/completions", session, stop_at, tally))
                for _ in range(workers)
            ]
            started = time.monotonic()
            while loop.time() < stop_at:
                async with session.get(base + "/-/status") as response:
                    queued = (
                        (await response.json())["models"].get("gpt-4", {}).get("queue_depth", 0)
                    )
                files = len(os.listdir(f"/proc/{proc.pid}/fd"))
                minute = (time.monotonic() - started) / 60
                done = sum(tally.values())
                print(
                    f"{minute:7.1f} {rss_mib(proc.pid):8.1f} {files:6d} {queued:7d} {done:8d}",
                    flush=True,
                )
                await asyncio.sleep(sample)
            await asyncio.gather(*clients)
        await asyncio.sleep(2)
        print(f"end     {rss_mib(proc.pid):8.1f} {len(os.listdir(f'/proc/{proc.pid}/fd')):6d}")
    finally:
        await proxy.stop()
        await emulator.stop()
        log_file.close()
    lines = log_path.read_text(errors="replace").splitlines()
    levels: dict[str, int] = {}
    for line in lines:
        try:
            levels[json.loads(line).get("level", "?")] = (
                levels.get(json.loads(line).get("level", "?"), 0) + 1
            )
        except ValueError:
            levels["not JSON"] = levels.get("not JSON", 0) + 1
    never = sum("Task exception was never retrieved" in line for line in lines)
    print(f"\nclients: {dict(sorted(tally.items()))}")
    print(f"log lines by level: {levels}; 'Task exception was never retrieved': {never}")
    for line in lines:
        if '"level": "error"' in line or "Traceback" in line:
            print("  ", line[:300])
    print(f"(log: {log_path})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--sample", type=float, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.workers, args.sample))
