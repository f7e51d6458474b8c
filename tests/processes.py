"""Running ``tcproxy`` as a real process, as a user or systemd would."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A ``python -m tcproxy`` child with its output collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stdout = b""
        self.stderr = b""

    @staticmethod
    def argv(args: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "tcproxy", *args]

    @staticmethod
    def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")
        }
        # Default state (the usage ledger) goes to a throwaway folder, not the user's home.
        inherited["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="tcproxy-state-")
        return {**inherited, **(env or {})}

    @classmethod
    async def start(cls, args: Sequence[str], env: Mapping[str, str] | None = None) -> Process:
        proc = await asyncio.create_subprocess_exec(
            *cls.argv(args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cls.environment(env),
        )
        return cls(proc)

    async def wait_healthy(self, url: str, timeout: float = 15.0) -> None:
        async with aiohttp.ClientSession() as session:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                if self.proc.returncode is not None:
                    await self.finish()
                    raise AssertionError(
                        f"exited early: {self.stderr.decode()} {self.stdout.decode()}"
                    )
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                        if response.status < 500:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{url} did not answer within {timeout}s")
                await asyncio.sleep(0.1)

    async def finish(self, timeout: float = 30.0) -> int:
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.stdout += out or b""  # None when the output went to a file
        self.stderr += err or b""
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        return await self.finish(timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).decode(errors="replace")


async def run(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, str, str]:
    process = await Process.start(args, env)
    code = await process.finish(timeout)
    return code, process.stdout.decode(), process.stderr.decode()


async def serve_config(
    folder: Path,
    upstream_url: str,
    extra: str = "",
    *,
    token: str = "t0ken",
    env: Mapping[str, str] | None = None,
    stdout: Any = asyncio.subprocess.PIPE,
) -> tuple[Process, str, Path]:
    """``tcproxy serve --config`` in front of ``upstream_url``, on a free port, once it answers.

    Returns the process, its base URL and the config file (tests rewrite it and send SIGHUP).
    """
    port = free_port()
    config = folder / "config.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nupstream: {{base_url: '{upstream_url}'}}\n{extra}"
    )
    proc = await asyncio.create_subprocess_exec(
        *Process.argv(["serve", "--config", str(config)]),
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=Process.environment({"TOKENCHEAP_API_KEY": token, **(env or {})}),
    )
    process = Process(proc)
    base = f"http://127.0.0.1:{port}"
    await process.wait_healthy(base + "/-/healthy")
    return process, base, config
