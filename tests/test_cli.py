"""The ``tcproxy`` command as a new user meets it, run as real processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp
import pytest

from tcproxy import __version__
from tests.processes import Process, free_port, run

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tc-cli-secret-TOKEN-0d9e8f7a6b5c"


async def test_version_and_help():
    code, out, _ = await run(["--version"])
    assert code == 0 and out.strip() == f"tcproxy {__version__}"
    code, out, _ = await run(["--help"])
    assert code == 0
    for command in ("serve", "emulate", "check-config", "serve --emulator"):
        assert command in out
    for command in ("serve", "emulate", "check-config"):
        code, out, _ = await run([command, "--help"])
        assert code == 0 and "usage: tcproxy " + command in out


async def test_check_config_accepts_the_example():
    code, out, _ = await run(
        ["check-config", str(ROOT / "config.example.yaml")], env={"TOKENCHEAP_API_KEY": TOKEN}
    )
    assert code == 0
    assert "OK" in out and "gpt-4 500 rpm" in out and "token     found" in out
    assert TOKEN not in out


async def test_check_config_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\nlimits:\n  models:\n    gpt-4: {rpm: 0}\n  max_queue: many\n")
    code, _, err = await run(["check-config", str(bad)])
    assert code == 2
    assert f"{bad}: line 1: listen:" in err
    assert f"{bad}: line 4: limits.models.gpt-4.rpm:" in err
    assert f"{bad}: line 5: limits.max_queue:" in err
    assert "3 problems" in err


async def test_serve_without_a_token_says_how_to_fix_it():
    code, _, err = await run(
        ["serve", "--listen", f"127.0.0.1:{free_port()}"], env={"TOKENCHEAP_API_KEY": ""}
    )
    assert code == 2
    assert "TOKENCHEAP_API_KEY" in err


async def test_serve_on_a_port_in_use_fails_clearly():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run(["serve", "--emulator", "--listen", f"127.0.0.1:{port}"])
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err


async def test_serve_emulator_works_offline_and_stops_cleanly():
    port = free_port()
    proxy = await Process.start(["serve", "--emulator", "--listen", f"127.0.0.1:{port}"])
    try:
        await proxy.wait_healthy(f"http://127.0.0.1:{port}/-/healthy")
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"http://127.0.0.1:{port}/v1/completions",
                headers={"Authorization": "Bearer your-token-here"},
                json={"model": "gpt-4", "prompt": "Hello, world!", "max_tokens": 100},
            )
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] == 100
        assert await proxy.stop(signal.SIGTERM) == 0
    finally:
        proxy.kill()
    lines = [json.loads(line) for line in proxy.stdout.decode().splitlines()]
    events = [line["event"] for line in lines]
    assert "tcproxy listening" in events and "stopped" in events
    request = next(line for line in lines if line["event"] == "request")
    assert request["status"] == 200 and request["total_tokens"] > 100


async def test_real_config_and_emulate_command_never_print_the_token(tmp_path):
    upstream_port, proxy_port = free_port(), free_port()
    emulator = await Process.start(["emulate", "--port", str(upstream_port), "--token", TOKEN])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{proxy_port}\nupstream:\n  base_url: http://127.0.0.1:{upstream_port}\n"
        "log:\n  level: debug\n"
    )
    proxy = await Process.start(
        ["serve", "--config", str(config)], env={"TOKENCHEAP_API_KEY": TOKEN}
    )
    answers = []
    try:
        await emulator.wait_healthy(f"http://127.0.0.1:{upstream_port}/_emulator/stats")
        await proxy.wait_healthy(f"http://127.0.0.1:{proxy_port}/-/healthy")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{proxy_port}"
            for fault in (
                "",
                "unauthorized",
                "redirect",
                "status=502",
                "close",
                "reset-mid-stream=1",
            ):
                response = await session.post(
                    f"{base}/v1/completions",
                    headers={"X-Emulator-Fault": fault} if fault else {},
                    json={"model": "gpt-4", "prompt": "hi", "stream": "reset" in fault},
                )
                try:
                    answers.append(str(response.headers) + await response.text())
                except aiohttp.ClientPayloadError:
                    answers.append(str(response.headers))
            for path in ("/-/status", "/-/ready", "/nope"):
                response = await session.get(base + path)
                answers.append(str(response.headers) + await response.text())
        assert await proxy.stop(signal.SIGINT) == 0
    finally:
        proxy.kill()
        emulator.kill()
        await emulator.finish()
    everything = proxy.output + "".join(answers)
    assert "upstream_auth_failed" in everything  # the scenarios ran
    assert TOKEN not in everything


@pytest.mark.parametrize("env", [{"AIOHTTP_NO_EXTENSIONS": "1"}])
async def test_refuses_the_pure_python_http_parser(env):
    code, _, err = await run(
        ["serve", "--emulator", "--listen", f"127.0.0.1:{free_port()}"], env=env
    )
    assert code == 1
    assert "C HTTP parser" in err


async def test_listen_override_cannot_open_the_proxy_to_the_network():
    code, _, err = await run(["serve", "--emulator", "--listen", f"0.0.0.0:{free_port()}"])
    assert code == 2
    assert "reachable from the network" in err and "client keys" in err
