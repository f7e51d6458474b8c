"""Helpers the benchmarks share: processes on free loopback ports, percentiles, RSS."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.processes import Process, free_port

__all__ = [
    "Process",
    "free_port",
    "peak_rss_mib",
    "percentile",
    "rss_mib",
    "start_emulator",
    "start_proxy",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS:")


def peak_rss_mib(pid: int) -> float:
    """The most memory the process has held at once (its high-water mark)."""
    return _status_mib(pid, "VmHWM:")


async def start_emulator(*args: str, token: str = "bench-token") -> tuple[Process, str]:
    port = free_port()
    process = await Process.start(["emulate", "--port", str(port), "--token", token, *args])
    url = f"http://127.0.0.1:{port}"
    await process.wait_healthy(url + "/_emulator/stats")
    return process, url


async def start_proxy(
    upstream: str, config: str = "", token: str = "bench-token"
) -> tuple[Process, str]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        file.write(f"listen: 127.0.0.1:{port}\nupstream: {{base_url: '{upstream}'}}\n{config}")
    process = await Process.start(
        ["serve", "--config", file.name], env={"TOKENCHEAP_API_KEY": token}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await process.wait_healthy(url + "/-/healthy")
    finally:
        os.unlink(file.name)
    return process, url
