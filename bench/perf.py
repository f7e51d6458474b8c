"""How much tcproxy costs: the same load straight to an upstream, through a bare aiohttp
pass-through, and through tcproxy with its features on, side by side.

    python bench/perf.py [--runs 3] [--seconds 10] [--connections 64]

Starts a fast fixed-answer upstream (bench/upstream.py). With two or more cores the proxy under
test is pinned to core 0 and everything else (upstream, load generator, this script) to core 1.
Each run measures every target in turn, on fresh processes: throughput at CONNECTIONS
connections, latency at one connection, time to the first byte of a streamed answer, and the
proxy's peak RSS. The table shows medians over the runs and ratios to the bare pass-through.

The load generator is wrk when it is installed (``apt-get install wrk``), else a bounded aiohttp
client (slower: it shares a core with the upstream, so absolute figures drop).

Targets:
    direct            the upstream itself
    bare              bench/bare_proxy.py, the floor for an aiohttp proxy
    tcproxy           defaults: JSON access log to a file, metrics, usage ledger, pacing with a
                      limit too high to throttle
    tcproxy-noledger  the same with ledger: false (the ledger's cost per request)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
from common import free_port, peak_rss_mib

HERE = Path(__file__).resolve().parent
BODY = b'{"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 16}'
STREAM_BODY = b'{"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 5, "stream": true}'
TARGETS = ("direct", "bare", "tcproxy", "tcproxy-noledger")


def pinned(core: int | None, argv: list[str]) -> list[str]:
    return (
        ["taskset", "-c", str(core), *argv]
        if core is not None and shutil.which("taskset")
        else argv
    )


async def spawn(
    argv: list[str], log: Path | None = None, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    if log is None:
        out: int | IO[bytes] = asyncio.subprocess.DEVNULL
    else:
        out = log.open("ab")  # the child process owns it from here
    return await asyncio.create_subprocess_exec(
        *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})}
    )


async def wait_listening(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()


# -- load ---------------------------------------------------------------------------------------


def wrk_script(folder: Path) -> Path:
    script = folder / "post.lua"
    body = BODY.decode().replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


async def wrk(
    url: str, connections: int, seconds: float, script: Path, core: int | None
) -> tuple[float, float]:
    """(requests per second, p50 latency in ms) from wrk."""
    argv = pinned(
        core,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
    )
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out = (await process.communicate())[0].decode()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    value, unit = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
    p50 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors[1]} error responses under load")
    return rate, p50


async def python_load(url: str, connections: int, seconds: float) -> tuple[float, float]:
    """The same figures from an aiohttp client (when wrk is not installed)."""
    connector = aiohttp.TCPConnector(limit=connections)
    latencies: list[float] = []
    count = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with session.post(
                    url, data=BODY, headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                latencies.append((time.perf_counter() - started) * 1000)
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return count / elapsed, statistics.median(latencies)


async def first_byte_ms(url: str, count: int = 300) -> float:
    """Median time from sending a streamed request to its first SSE event."""
    times = []
    async with aiohttp.ClientSession() as session:
        for i in range(count + 20):
            started = time.perf_counter()
            async with session.post(
                url, data=STREAM_BODY, headers={"Content-Type": "application/json"}
            ) as r:
                first = await r.content.readany()
                elapsed = (time.perf_counter() - started) * 1000
                assert b"data:" in first, first
                await r.read()
            if i >= 20:  # after a warm-up
                times.append(elapsed)
    return statistics.median(times)


# -- targets ------------------------------------------------------------------------------------


@dataclass
class Figures:
    rate: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)


async def start_target(
    name: str, upstream: str, folder: Path, core: int | None
) -> tuple[str, asyncio.subprocess.Process | None]:
    if name == "direct":
        return upstream, None
    port = free_port()
    if name == "bare":
        argv = [
            sys.executable,
            str(HERE / "bare_proxy.py"),
            "--port",
            str(port),
            "--upstream",
            upstream,
        ]
        process = await spawn(pinned(core, argv))
    else:
        config = folder / f"{name}.yaml"
        ledger = (
            "ledger: false\n"
            if name == "tcproxy-noledger"
            else f"ledger: {{path: '{folder / 'usage.db'}'}}\n"
        )
        config.write_text(
            f"listen: 127.0.0.1:{port}\nupstream: {{base_url: '{upstream}'}}\n"
            "limits: {models: {gpt-4: {rpm: 10000000}}, max_queue: 100000}\n" + ledger
        )
        argv = [sys.executable, "-m", "tcproxy", "serve", "--config", str(config)]
        process = await spawn(
            pinned(core, argv), log=folder / f"{name}.log", env={"TOKENCHEAP_API_KEY": "bench"}
        )
    url = f"http://127.0.0.1:{port}"
    await wait_listening(url + ("/-/healthy" if name.startswith("tcproxy") else "/"))
    return url, process


def split_cores() -> tuple[int, int | None, int | None]:
    """(cores, the proxy's core, everyone else's core); this process moves to the latter."""
    cores = os.cpu_count() or 1
    proxy_core, other_core = (0, 1) if cores >= 2 else (None, None)
    if other_core is not None:
        os.sched_setaffinity(0, {other_core})
    return cores, proxy_core, other_core


async def start_upstream(core: int | None) -> tuple[asyncio.subprocess.Process, str]:
    """bench/upstream.py on a free port, pinned to ``core``, once it answers."""
    port = free_port()
    process = await spawn(
        pinned(core, [sys.executable, str(HERE / "upstream.py"), "--port", str(port)])
    )
    url = f"http://127.0.0.1:{port}"
    await wait_listening(url + "/")
    return process, url


async def main(runs: int, seconds: float, connections: int) -> None:
    cores, proxy_core, other_core = split_cores()
    use_wrk = shutil.which("wrk") is not None
    folder = Path(tempfile.mkdtemp(prefix="tcproxy-perf-"))
    upstream_process, upstream = await start_upstream(other_core)
    script = wrk_script(folder)
    figures = {name: Figures() for name in TARGETS}
    print(
        f"{cores} cores; proxy pinned to core {proxy_core}, upstream and load on core {other_core};"
        f" load generator: {'wrk' if use_wrk else 'aiohttp client'}; {runs} runs of {seconds:g} s",
        flush=True,
    )
    try:
        for run in range(runs):
            for name in TARGETS:
                url, process = await start_target(name, upstream, folder, proxy_core)
                target = url + "/v1/completions"
                try:

                    async def load(c: int, target: str = target) -> tuple[float, float]:
                        if use_wrk:
                            return await wrk(target, c, seconds, script, other_core)
                        return await python_load(target, c, seconds)

                    await load(8)  # warm up
                    rate, _ = await load(connections)
                    _, p50 = await load(1)
                    ttfb = await first_byte_ms(target)
                    rss = peak_rss_mib(process.pid) if process else float("nan")
                finally:
                    if process is not None:
                        await stop(process)
                f = figures[name]
                f.rate.append(rate)
                f.p50.append(p50)
                f.ttfb.append(ttfb)
                f.rss.append(rss)
                print(
                    f"  run {run + 1} {name:<17} {rate:8.0f} req/s  p50 {p50:6.3f} ms"
                    f"  first byte {ttfb:6.3f} ms  peak RSS {rss:5.1f} MiB",
                    flush=True,
                )
    finally:
        await stop(upstream_process)
    report(figures, connections)


def report(figures: dict[str, Figures], connections: int) -> None:
    med = {
        name: {k: statistics.median(getattr(f, k)) for k in ("rate", "p50", "ttfb", "rss")}
        for name, f in figures.items()
    }
    direct = med["direct"]
    bare = med["bare"]
    bare_added = bare["p50"] - direct["p50"]
    bare_ttfb = bare["ttfb"] - direct["ttfb"]
    print(
        f"\n{'target':<17} {f'req/s @{connections}':>11} {'vs bare':>8} {'added p50 @1':>13}"
        f" {'vs bare':>8} {'peak RSS':>9} {'stream 1st byte +':>18}"
    )
    for name, m in med.items():
        added = m["p50"] - direct["p50"]
        ttfb = m["ttfb"] - direct["ttfb"]
        if name == "direct":
            print(f"{name:<17} {m['rate']:>11.0f} {'':>8} {'—':>13} {'':>8} {'—':>9} {'—':>18}")
            continue
        print(
            f"{name:<17} {m['rate']:>11.0f} {m['rate'] / bare['rate'] * 100:>7.1f}%"
            f" {added:>10.3f} ms {added / bare_added if bare_added > 0 else float('nan'):>7.2f}x"
            f" {m['rss']:>5.1f} MiB {ttfb:>15.3f} ms"
        )
    tc = med["tcproxy"]
    print("\ntargets (tcproxy vs bare, same run):")
    checks = [
        (
            "throughput >= 90% of bare",
            tc["rate"] >= 0.9 * bare["rate"],
            f"{tc['rate'] / bare['rate'] * 100:.1f}%",
        ),
        (
            "added p50 <= 1.2x bare's",
            tc["p50"] - direct["p50"] <= 1.2 * bare_added,
            f"{(tc['p50'] - direct['p50']) / bare_added:.2f}x" if bare_added > 0 else "n/a",
        ),
        (
            "stream first byte <= bare + 0.3 ms",
            tc["ttfb"] - direct["ttfb"] <= bare_ttfb + 0.3,
            f"{tc['ttfb'] - direct['ttfb'] - bare_ttfb:+.3f} ms",
        ),
        ("peak RSS <= 60 MiB", tc["rss"] <= 60, f"{tc['rss']:.1f} MiB"),
    ]
    for text, ok, value in checks:
        print(f"  {'met ' if ok else 'MISS'}  {text:<36} {value}")
    noledger = med["tcproxy-noledger"]
    print(
        f"\nthe usage ledger: {noledger['rate']:.0f} req/s without it, {tc['rate']:.0f} with it"
        f" (it costs {(1 - tc['rate'] / noledger['rate']) * 100:.1f}% of throughput)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.seconds, args.connections))
