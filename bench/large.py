"""Large prompts: what a 1 MiB and a 10 MiB request body cost through tcproxy, next to the bare
aiohttp pass-through and the upstream itself.

    python bench/large.py [--runs 3] [--requests 15] [--parallel 8]

For each target (direct, bare, tcproxy with its defaults) and each size, on fresh processes
pinned as in bench/perf.py:

- time: the median of REQUESTS one-at-a-time requests, from sending the body to the last byte
  of the answer, and what the proxy adds to the direct time;
- memory: PARALLEL such requests at once, and how far the proxy's peak RSS rose above its RSS
  just before them, in MiB and in bodies (``copies``: the rise divided by PARALLEL times the body
  size, i.e. how many copies of each body the proxy held at its peak beyond what the allocator
  kept from the one-at-a-time requests, which is the same for every target).

Medians over RUNS runs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from common import peak_rss_mib, rss_mib
from perf import split_cores, start_target, start_upstream, stop

MiB = 1024 * 1024
SIZES = {"1 MiB": MiB, "10 MiB": 10 * MiB}
TARGETS = ("direct", "bare", "tcproxy")


def body_of(size: int) -> bytes:
    """A completion request of about ``size`` bytes: the model first, then a long prompt (text with
    quotes, tabs and newlines to escape), then ``stream``, as clients write them."""
    line = 'A line of a long document, with "quotes", a tab\tand a newline.\n'

    def request(characters: int) -> bytes:
        prompt = (line * (characters // len(line) + 1))[:characters]
        return orjson.dumps({"model": "gpt-4", "prompt": prompt, "max_tokens": 16, "stream": False})

    characters = size
    for _ in range(3):  # escapes make the body longer than the prompt: converge on ``size``
        characters = characters * size // len(request(characters))
    return request(characters)


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {(await r.read())[:300]!r}")
    return (time.perf_counter() - started) * 1000


async def measure(
    url: str, body: bytes, requests: int, parallel: int, pid: int | None
) -> tuple[float, float]:
    """(median ms one at a time, peak RSS rise in MiB with ``parallel`` at once)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(3):
            await one(session, url, body)
        times = [await one(session, url, body) for _ in range(requests)]
        before = rss_mib(pid) if pid else float("nan")
        await asyncio.gather(*(one(session, url, body) for _ in range(parallel)))
        rise = peak_rss_mib(pid) - before if pid else float("nan")
    return statistics.median(times), rise


async def main(runs: int, requests: int, parallel: int) -> None:
    cores, proxy_core, other_core = split_cores()
    folder = Path(tempfile.mkdtemp(prefix="tcproxy-large-"))
    upstream_process, upstream = await start_upstream(other_core)
    bodies = {label: body_of(size) for label, size in SIZES.items()}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print(
        f"{cores} cores; proxy pinned to core {proxy_core}, upstream and client on core"
        f" {other_core}; {runs} runs; {requests} requests one at a time, then {parallel} at once",
        flush=True,
    )
    try:
        for run in range(runs):
            for name in TARGETS:
                for label, body in bodies.items():
                    # A fresh process per size, so one size's peak does not hide the next's.
                    url, process = await start_target(name, upstream, folder, proxy_core)
                    try:
                        pid = process.pid if process else None
                        ms, rise = await measure(
                            url + "/v1/completions", body, requests, parallel, pid
                        )
                    finally:
                        if process is not None:
                            await stop(process)
                    results.setdefault((name, label), []).append((ms, rise))
                    print(
                        f"  run {run + 1} {name:<8} {label:>6}: {ms:8.2f} ms"
                        f"  peak RSS +{rise:6.1f} MiB with {parallel} at once",
                        flush=True,
                    )
    finally:
        await stop(upstream_process)
        shutil.rmtree(folder, ignore_errors=True)
    report(results, bodies, parallel)


def report(
    results: dict[tuple[str, str], list[tuple[float, float]]],
    bodies: dict[str, bytes],
    parallel: int,
) -> None:
    med = {
        key: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for key, rs in results.items()
    }
    print(
        f"\n{'target':<8} {'body':>7} {'time':>10} {'added':>10} {'vs bare':>8}"
        f" {f'RSS rise @{parallel}':>13} {'copies':>7}"
    )
    for label, body in bodies.items():
        direct = med[("direct", label)][0]
        bare_added = med[("bare", label)][0] - direct
        for name in TARGETS:
            ms, rise = med[(name, label)]
            if name == "direct":
                print(f"{name:<8} {label:>7} {ms:>7.2f} ms {'—':>10} {'':>8} {'—':>13} {'—':>7}")
                continue
            added = ms - direct
            copies = rise * MiB / (parallel * len(body))
            print(
                f"{name:<8} {label:>7} {ms:>7.2f} ms {added:>7.2f} ms {added / bare_added:>7.2f}x"
                f" {rise:>9.1f} MiB {copies:>7.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.requests, args.parallel))
