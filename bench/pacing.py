"""Saturate tcproxy against the emulator in real time and show what the upstream saw.

    python bench/pacing.py [--minutes 5] [--rpm 500 --rpm 3500] [--workers 100]

For every way the emulator can count a minute (fixed window, sliding 60 s window, per-second
bucket of rpm/60) and every rpm given, two stacks run side by side for the same minutes:

- tcproxy:         workers → tcproxy (its default pacing) → emulator
- AsyncLimiter:    workers → a plain ``aiolimiter.AsyncLimiter(rpm, 60)`` → emulator

Each prints: requests the upstream saw, upstream 429s, the most requests in any sliding 60 s
window (vs rpm), arrivals a per-second bucket would refuse, utilisation (requests accepted in the
run / rpm per minute), and p50/p99 of the wait before release. Every stack runs in separate
processes (emulator, proxy); the workers run in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
from aiolimiter import AsyncLimiter
from common import Process, percentile, start_emulator, start_proxy

from tcproxy.emulator import bucket_violations, max_in_window

BODY = {"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 8}


@dataclass
class Stack:
    pacer: str
    mode: str
    rpm: int
    emulator: Process
    emulator_url: str
    target: str  # where the workers send
    proxy: Process | None = None
    limiter: AsyncLimiter | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    waits_ms: list[float] = field(default_factory=list)


async def worker(stack: Stack, session: aiohttp.ClientSession, stop_at: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        started = loop.time()
        if stack.limiter is not None:
            await stack.limiter.acquire()
            stack.waits_ms.append((loop.time() - started) * 1000)
        async with session.post(
            stack.target, json=BODY, headers={"Authorization": "Bearer bench-token"}
        ) as response:
            await response.read()
            stack.statuses[response.status] = stack.statuses.get(response.status, 0) + 1
            if stack.limiter is None and "X-TCProxy-Queue-Ms" in response.headers:
                stack.waits_ms.append(float(response.headers["X-TCProxy-Queue-Ms"]))


async def build(pacer: str, mode: str, rpm: int) -> Stack:
    emulator, url = await start_emulator("--enforce", mode, "--rpm", f"gpt-4={rpm}")
    if pacer == "tcproxy":
        config = f"limits: {{models: {{gpt-4: {{rpm: {rpm}}}}}}}\nlog: {{level: warning}}\n"
        proxy, proxy_url = await start_proxy(url, config)
        return Stack(pacer, mode, rpm, emulator, url, proxy_url + "/v1/completions", proxy=proxy)
    return Stack(
        pacer, mode, rpm, emulator, url, url + "/v1/completions", limiter=AsyncLimiter(rpm, 60)
    )


async def report(stack: Stack, session: aiohttp.ClientSession, minutes: float) -> str:
    async with session.get(stack.emulator_url + "/_emulator/stats?arrivals=1") as response:
        stats = (await response.json())["models"].get("gpt-4", {})
    arrivals = sorted(stats.get("arrivals", []))
    refused = stats.get("rate_limited", 0)
    if arrivals:
        run_end = arrivals[0] + minutes * 60
        # Accepted requests within the run: all arrivals in it less the refused ones in it.
        in_run = sum(1 for t in arrivals if t < run_end)
        utilisation = (in_run - min(refused, in_run)) / (stack.rpm * minutes) * 100
        window = max_in_window(arrivals)
        bucket = bucket_violations(arrivals, stack.rpm)
    else:
        in_run = window = bucket = 0
        utilisation = 0.0
    p50, p99 = (percentile(stack.waits_ms, q) / 1000 for q in (50, 99))
    return (
        f"{stack.mode:<8} {stack.rpm:>5} {stack.pacer:<13} {len(arrivals):>8} {refused:>6}"
        f" {window:>6} / {stack.rpm:<5} {bucket:>7} {utilisation:>7.2f}%"
        f" {p50:>8.2f}s {p99:>7.2f}s"
    )


async def main(minutes: float, rpms: list[int], modes: list[str], workers: int) -> None:
    stacks = []
    for mode in modes:
        for rpm in rpms:
            for pacer in ("tcproxy", "AsyncLimiter"):
                stacks.append(await build(pacer, mode, rpm))
    print(
        f"{len(stacks)} stacks, {workers} workers each, {minutes:g} minutes of saturation",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + minutes * 60
    started = time.time()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            await asyncio.gather(
                *(worker(stack, session, stop_at) for stack in stacks for _ in range(workers))
            )
            print(f"ran {time.time() - started:.0f} s\n")
            print(
                f"{'mode':<8} {'rpm':>5} {'pacer':<13} {'upstream':>8} {'429s':>6}"
                f" {'max in 60 s':>14} {'bucket':>7} {'util':>8} {'wait p50':>9} {'p99':>8}"
            )
            for stack in stacks:
                print(await report(stack, session, minutes))
        finally:
            for stack in stacks:
                if stack.proxy is not None:
                    await stack.proxy.stop()
                await stack.emulator.stop()
    print(
        "\nupstream: requests the emulator saw; 429s: refused by it; max in 60 s: most arrivals in"
        " any sliding 60 s window; bucket: arrivals a per-second bucket of rpm/60 (burst rpm/60)"
        " would refuse; util: accepted in the run / (rpm x minutes); wait: time before release."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--rpm", type=int, action="append")
    parser.add_argument("--modes", default="fixed,sliding,bucket")
    parser.add_argument("--workers", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.rpm or [500, 3500], args.modes.split(","), args.workers))
