"""One key shared by a team: client keys, quotas, fairness, TLS, the usage ledger and report."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import sqlite3
import ssl
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import trustme

from tcproxy.access import check_network
from tcproxy.clients import key_digest, new_key
from tcproxy.config import parse_config
from tcproxy.emulator import EmulatorSettings
from tcproxy.errors import Forbidden
from tcproxy.quotas import day_start
from tcproxy.service import start_emulator
from tests.conftest import SECRETS, UPSTREAM_TOKEN
from tests.processes import run, serve_config

ALICE, ALICE_HASH = new_key()
BOB, BOB_HASH = new_key()
ADMIN, ADMIN_HASH = new_key()
SECRETS.update({ALICE, BOB, ADMIN})


def team(extra_alice: str = "", extra_bob: str = "", more: str = "") -> str:
    return (
        "clients:\n"
        f"  alice: {{key_sha256: {ALICE_HASH}{extra_alice}}}\n"
        f"  bob: {{key_sha256: {BOB_HASH}{extra_bob}}}\n"
        f"{more}"
    )


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_hashed_and_printed_once():
    key, digest = new_key()
    assert key.startswith("tcp_") and len(key) > 40
    assert digest == key_digest(key) and len(digest) == 64 and key not in digest
    code, out, _ = await run(["keys", "new", "carol"])
    assert code == 0
    printed = next(line.strip() for line in out.splitlines() if line.strip().startswith("tcp_"))
    config = out[out.index("\nclients:\n") :]
    assert printed not in config
    parsed = parse_config(config.replace("    # ", "    #"))
    assert parsed.clients["carol"].key_sha256 == key_digest(printed)


async def test_two_clients_each_with_their_own_key(stack, logs):
    s = await stack(team())
    for key in (ALICE, BOB):
        response = await s.complete(headers=as_(key))
        assert response.status == 200
        # the upstream gets the stored token, never the client's key
        assert s.emulator.seen[-1]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
        assert key not in str(s.emulator.seen[-1])
    lines = await logs.wait_requests(2)
    assert [line["client"] for line in lines] == ["alice", "bob"]
    assert ALICE not in logs.text() and BOB not in logs.text()


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_client_key"),
        ({"Authorization": "Bearer tcp_not-a-real-key"}, "invalid_client_key"),
        ({"Authorization": f"Basic {ALICE}"}, "missing_client_key"),
        (
            {"Authorization": f"Bearer {ALICE_HASH}"},
            "invalid_client_key",
        ),  # the hash is not the key
    ],
)
async def test_missing_or_wrong_key_is_401_and_never_reaches_upstream(stack, headers, code):
    s = await stack(team())
    response = await s.complete(headers=headers)
    assert response.status == 401
    assert response.headers["X-TCProxy-Error"] == code
    assert (await response.json())["error"]["code"] == code
    assert s.emulator.requests == 0


async def test_non_loopback_listen_needs_client_keys():
    with pytest.raises(Exception, match="reachable from the network"):
        parse_config("listen: 0.0.0.0:8787\n")
    config = parse_config("listen: 0.0.0.0:8787\n" + team())
    assert not config.listen.is_loopback


async def test_daily_budget_stops_a_client_then_renews(stack):
    now = [day_start(1_790_000_000) + 3600.0]  # an hour into a UTC day
    s = await stack(team(extra_alice=", tokens_per_day: 30"), clock=lambda: now[0])
    statuses = []
    for _ in range(6):  # each answer uses 2 prompt + 5 completion tokens
        response = await s.complete(headers=as_(ALICE))
        statuses.append(response.status)
        if response.status == 402:
            body = await response.json()
    assert statuses == [200, 200, 200, 200, 200, 402]  # 35 >= 30 after five
    assert body["error"]["code"] == "quota_exceeded"
    assert "clients.alice.tokens_per_day" in body["error"]["message"]
    assert int(response.headers["Retry-After"]) == 23 * 3600
    assert s.emulator.requests == 5  # the refused one cost nothing upstream
    assert (await s.complete(headers=as_(BOB))).status == 200  # bob has no budget
    now[0] += 23 * 3600  # the next UTC day
    assert (await s.complete(headers=as_(ALICE))).status == 200


async def test_monthly_budget(stack):
    s = await stack(team(extra_alice=", tokens_per_month: 5"))
    assert (await s.complete(headers=as_(ALICE))).status == 200
    response = await s.complete(headers=as_(ALICE))
    assert response.status == 402
    assert "this month" in (await response.json())["error"]["message"]


async def test_client_rpm_cap_paces_that_client_only(stack):
    # alice: one request per 50 ms of real time; bob only shares gpt-4's 500 rpm
    s = await stack(
        team(extra_alice=", rpm: 60", more="limits: {safety_margin: 0.002}\n"), time_scale=20
    )
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(s.complete(headers=as_(ALICE)) for _ in range(6)))
    alice_took = asyncio.get_running_loop().time() - started
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(s.complete(headers=as_(BOB)) for _ in range(6)))
    bob_took = asyncio.get_running_loop().time() - started
    assert alice_took >= 0.2 and bob_took < alice_took / 2


async def test_round_robin_one_client_cannot_starve_another(stack):
    # gpt-4 at 600 rpm on a minute of 3 s: a slot every 5 ms; alice queues 200 at once.
    s = await stack(
        team() + "limits:\n  models:\n    gpt-4: {rpm: 600}\n  safety_margin: 0.002\n",
        time_scale=20,
    )
    alice = [
        asyncio.create_task(s.complete(headers={**as_(ALICE), "X-Request-Id": f"alice-{i}"}))
        for i in range(200)
    ]
    await asyncio.sleep(0.05)
    queued_before = s.state.limiter.queue("gpt-4").depth
    bob = await s.complete(headers={**as_(BOB), "X-Request-Id": "bob-1"})
    assert bob.status == 200
    order = [h["X-Request-Id"] for h in s.emulator.seen]
    alice_before_bob = len(order[: order.index("bob-1")])
    sent_when_bob_queued = 200 - queued_before
    assert alice_before_bob - sent_when_bob_queued <= 2  # bob went within a couple of slots
    await asyncio.gather(*alice)


async def test_revoked_key_after_reload(tmp_path):
    upstream = await start_emulator(EmulatorSettings(token="t0ken"))
    proxy, base, config = await serve_config(tmp_path, upstream.url, team() + "ledger: false\n")
    head = config.read_text().split("clients:")[0]
    try:
        url = f"{base}/v1/completions"
        body = {"model": "gpt-4", "prompt": "hi"}
        async with aiohttp.ClientSession() as session:
            assert (await session.post(url, json=body, headers=as_(BOB))).status == 200
            # bob's lines are deleted; carol is added; in-flight work carries on
            carol, carol_hash = new_key()
            config.write_text(
                head
                + f"clients:\n  alice: {{key_sha256: {ALICE_HASH}}}\n"
                + f"  carol: {{key_sha256: {carol_hash}}}\nledger: false\n"
            )
            proxy.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            revoked = await session.post(url, json=body, headers=as_(BOB))
            assert revoked.status == 401
            assert (await session.post(url, json=body, headers=as_(carol))).status == 200
            assert (await session.post(url, json=body, headers=as_(ALICE))).status == 200
        assert await proxy.stop() == 0
    finally:
        proxy.kill()
        await upstream.close()
    assert BOB not in proxy.output and carol not in proxy.output


async def test_tls_with_a_certificate_made_here(stack, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    s = await stack(
        "listen:\n  address: 127.0.0.1:0\n"
        f"  tls: {{cert: '{cert_file}', key: '{key_file}'}}\n" + team()
    )
    assert s.url.startswith("https://")
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as session:
        response = await session.post(
            f"{s.url}/v1/completions", json={"model": "gpt-4", "prompt": "hi"}, headers=as_(ALICE)
        )
        assert response.status == 200
    async with aiohttp.ClientSession() as session:  # a client that does not trust it
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{s.url}/-/healthy")
    with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
        await s.session.get(s.url.replace("https", "http") + "/-/healthy")


def test_client_networks_allow_list():
    allow = parse_config(
        "listen: {address: '127.0.0.1:1', allow: [192.168.1.0/24, 10.1.2.3]}\n"
    ).listen.allow

    def request(remote: str) -> SimpleNamespace:
        return SimpleNamespace(remote=remote)

    for remote in ("192.168.1.77", "10.1.2.3", "127.0.0.1", "::1", "::ffff:192.168.1.5"):
        check_network(request(remote), allow)  # type: ignore[arg-type]
    for remote in ("192.168.2.1", "10.1.2.4", "8.8.8.8", "fe80::1", None):
        with pytest.raises(Forbidden):
            check_network(request(remote), allow)  # type: ignore[arg-type]
    check_network(request("8.8.8.8"), ())  # type: ignore[arg-type]  # no list: anyone


async def test_management_pages_can_require_their_own_key(stack):
    s = await stack(team(more=f"management: {{access: key, key_sha256: {ADMIN_HASH}}}\n"))
    for path in ("/-/status", "/metrics"):
        assert (await s.session.get(s.url + path)).status == 401
        assert (await s.session.get(s.url + path, headers=as_(ALICE))).status == 401
        assert (await s.session.get(s.url + path, headers=as_(ADMIN))).status == 200
    assert (await s.session.get(s.url + "/-/healthy")).status == 200
    assert (await s.session.get(s.url + "/-/ready")).status == 200


async def test_ledger_after_a_clean_shutdown_and_the_usage_report(tmp_path):
    ledger = tmp_path / "state" / "usage.db"
    upstream = await start_emulator(EmulatorSettings(token="t0ken"))
    proxy, base, config = await serve_config(
        tmp_path, upstream.url, team() + f"ledger: {{path: '{ledger}'}}\n"
    )
    try:
        url = f"{base}/v1/completions"
        async with aiohttp.ClientSession() as session:
            for key, model, count in (
                (ALICE, "gpt-4", 3),
                (BOB, "claude-2", 2),
                (ALICE, "claude-2", 1),
            ):
                for _ in range(count):
                    body = {"model": model, "prompt": "one two three", "max_tokens": 10}
                    assert (await session.post(url, json=body, headers=as_(key))).status == 200
            await session.post(url, data=b"{", headers=as_(BOB))  # an error is recorded too
        assert await proxy.stop() == 0  # the rows still queued are written on the way out
    finally:
        proxy.kill()
        await upstream.close()
    with sqlite3.connect(ledger) as db:
        rows = db.execute(
            "SELECT client, model, status, prompt_tokens, completion_tokens, total_tokens"
            " FROM requests"
        ).fetchall()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(rows) == 7
    assert rows.count(("alice", "gpt-4", 200, 3, 10, 13)) == 3
    assert ("bob", None, 400, None, None, None) in rows
    code, table, _ = await run(["usage", "--db", str(ledger), "--period", "today"])
    assert code == 0
    assert [line.split()[:3] for line in table.splitlines() if line.startswith("alice")] == [
        ["alice", "gpt-4", "3"],
        ["alice", "claude-2", "1"],
    ]
    assert table.splitlines()[-1].split()[:3] == ["total", "7", "1"]
    code, text, _ = await run(["usage", "--db", str(ledger), "--by", "client", "--json"])
    by_client = {row["client"]: row for row in json.loads(text)["rows"]}
    assert by_client["alice"]["requests"] == 4 and by_client["alice"]["total_tokens"] == 52
    assert by_client["bob"]["requests"] == 3 and by_client["bob"]["errors"] == 1
    code, text, _ = await run(["usage", "--config", str(config), "--by", "model", "--csv"])
    rows_csv = list(csv.DictReader(io.StringIO(text)))
    assert {row["model"]: int(row["requests"]) for row in rows_csv} == {
        "claude-2": 3,
        "gpt-4": 3,
        "(none)": 1,
    }


async def test_budgets_survive_a_restart(stack, tmp_path):
    ledger = tmp_path / "usage.db"
    config = team(extra_alice=", tokens_per_day: 20")
    first = await stack(config, ledger_path=ledger)
    for _ in range(3):  # 7 tokens each: 21
        assert (await first.complete(headers=as_(ALICE))).status == 200
    await first.proxy.close()  # a clean stop writes the ledger
    second = await stack(config, ledger_path=ledger)
    response = await second.complete(headers=as_(ALICE))
    assert response.status == 402
    assert "21 of its 20 tokens" in (await response.json())["error"]["message"]


def test_usage_report_periods_and_bad_arguments(tmp_path: Path):
    from tcproxy.report import ReportError, period, summarise

    now = 1_790_000_000.0
    assert period("today", None, None, now).start == day_start(now)
    assert period("7d", None, None, now).start == now - 7 * 86400
    assert (
        period(None, "2026-11-01", "2026-11-02", now).end
        - period(None, "2026-11-01", None, now).start
        == 86400
    )
    for name in ("fortnight", "0x7d"):
        with pytest.raises(ReportError, match="unknown period"):
            period(name, None, None, now)
    with pytest.raises(ReportError, match="--since takes a date"):
        period(None, "yesterday-ish", None, now)
    with pytest.raises(ReportError, match="no usage ledger"):
        summarise(tmp_path / "absent.db", period("all", None, None, now), "client")


async def test_a_restart_within_the_minute_does_not_open_a_fresh_budget(stack, tmp_path):
    ledger = tmp_path / "usage.db"
    config = "limits:\n  models:\n    gpt-4: {rpm: 3, burst: 3}\n  queue_timeout: 0.3\n"
    first = await stack(config, ledger_path=ledger)
    for _ in range(3):  # the whole minute's budget
        assert (await first.complete()).status == 200
    await first.proxy.close()
    second = await stack(config, ledger_path=ledger)  # restarted seconds later
    response = await second.complete()
    assert response.status == 429  # waits for the old minute to pass, not a fresh one
    assert second.emulator.requests == 0
    status = await (await second.session.get(f"{second.url}/-/status")).json()
    assert status["models"]["gpt-4"]["released_last_60s"] == 3
