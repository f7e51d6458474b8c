"""Three tcproxy instances sharing one budget through Redis, saturated in real time.

    python bench/shared_pacing.py [--minutes 3] [--rpm 500 --rpm 3500] [--instances 3]
                                  [--redis redis://127.0.0.1:6379/15]

For each way the emulator counts a minute and each rpm: one emulator, INSTANCES tcproxy
processes with ``limits.backend`` pointing at Redis (a key prefix of their own), and WORKERS
clients per instance keeping every queue full. Prints what the upstream saw in aggregate (the
same figures as bench/pacing.py) and each instance's share and queue wait.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aiohttp
import redis.asyncio as aioredis
from common import Process, percentile, start_emulator, start_proxy

from tcproxy.emulator import bucket_violations, max_in_window

BODY = {"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 8}


class Instance:
    def __init__(self, process: Process, url: str) -> None:
        self.process = process
        self.url = url + "/v1/completions"
        self.statuses: dict[int, int] = {}
        self.waits_ms: list[float] = []


async def worker(instance: Instance, session: aiohttp.ClientSession, stop_at: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        async with session.post(instance.url, json=BODY) as response:
            await response.read()
            instance.statuses[response.status] = instance.statuses.get(response.status, 0) + 1
            if "X-TCProxy-Queue-Ms" in response.headers:
                instance.waits_ms.append(float(response.headers["X-TCProxy-Queue-Ms"]))


async def run_case(
    mode: str, rpm: int, args: argparse.Namespace, session: aiohttp.ClientSession
) -> list[str]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    emulator, upstream = await start_emulator("--enforce", mode, "--rpm", f"gpt-4={rpm}")
    config = (
        f"limits:\n  models: {{gpt-4: {{rpm: {rpm}}}}}\n  backend: '{args.redis}'\n"
        f"  redis_prefix: {prefix}\n  instances: {args.instances}\nlog: {{level: warning}}\n"
    )
    instances = [Instance(*await start_proxy(upstream, config)) for _ in range(args.instances)]
    try:
        stop_at = asyncio.get_running_loop().time() + args.minutes * 60
        await asyncio.gather(
            *(worker(i, session, stop_at) for i in instances for _ in range(args.workers))
        )
        async with session.get(upstream + "/_emulator/stats?arrivals=1") as response:
            stats = (await response.json())["models"].get("gpt-4", {})
    finally:
        for instance in instances:
            await instance.process.stop()
        await emulator.stop()
        client = aioredis.Redis.from_url(args.redis)
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    arrivals = sorted(stats.get("arrivals", []))
    refused = stats.get("rate_limited", 0)
    in_run = sum(1 for t in arrivals if t < arrivals[0] + args.minutes * 60) if arrivals else 0
    utilisation = (in_run - min(refused, in_run)) / (rpm * args.minutes) * 100
    waits = [w for i in instances for w in i.waits_ms]
    lines = [
        f"{mode:<8} {rpm:>5} {'all':<6} {len(arrivals):>8} {refused:>6}"
        f" {max_in_window(arrivals):>6} / {rpm:<5} {bucket_violations(arrivals, rpm):>7}"
        f" {utilisation:>7.2f}% {percentile(waits, 50) / 1000:>8.2f}s"
        f" {percentile(waits, 99) / 1000:>7.2f}s"
    ]
    total = sum(sum(i.statuses.values()) for i in instances) or 1
    for number, instance in enumerate(instances, 1):
        answered = sum(instance.statuses.values())
        failed = answered - instance.statuses.get(200, 0)
        lines.append(
            f"{'':<8} {'':>5} {f'#{number}':<6} {answered:>8} {failed:>6}"
            f" {'share':>14} {answered / total * 100:>6.1f}%"
            f" {'':>8} {percentile(instance.waits_ms, 50) / 1000:>8.2f}s"
            f" {percentile(instance.waits_ms, 99) / 1000:>7.2f}s"
        )
    return lines


async def main(args: argparse.Namespace) -> None:
    print(
        f"{args.instances} instances sharing Redis, {args.workers} workers each,"
        f" {args.minutes:g} minutes per case; the cases run at the same time",
        flush=True,
    )
    started = time.time()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        cases = [(mode, rpm) for mode in args.modes.split(",") for rpm in args.rpm]
        results = await asyncio.gather(*(run_case(mode, rpm, args, session) for mode, rpm in cases))
    print(f"ran {time.time() - started:.0f} s\n")
    print(
        f"{'mode':<8} {'rpm':>5} {'inst':<6} {'upstream':>8} {'429s':>6}"
        f" {'max in 60 s':>14} {'bucket':>7} {'util':>8} {'wait p50':>9} {'p99':>8}"
    )
    for lines in results:
        print("\n".join(lines))
    print(
        "\nall: what the emulator saw from every instance together (429s: refused by it; max in"
        " 60 s: most arrivals in any sliding 60 s window; bucket: arrivals a per-second bucket of"
        " rpm/60 would refuse; util: accepted in the run / (rpm x minutes)). #n: requests that"
        " instance answered, failures among them, and its share of all."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--rpm", type=int, action="append")
    parser.add_argument("--modes", default="fixed,sliding,bucket")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    arguments = parser.parse_args()
    arguments.rpm = arguments.rpm or [500, 3500]
    asyncio.run(main(arguments))
