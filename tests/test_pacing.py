"""Pacing against the emulator in each way of counting a minute, on a scaled clock.

A minute lasts two real seconds here (time scale 30). Both the emulator and the proxy run on
that scale; the safety margin is real time (it covers loopback jitter, not upstream behaviour).
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from tcproxy.config import ModelLimit
from tcproxy.emulator import EmulatorSettings, bucket_violations, max_in_window
from tcproxy.pacing.pacer import bucket_shape

SCALE = 30  # emulated seconds per real second
RPM = 120


def paced(rpm: int = RPM, extra: str = "", margin: float = 0.01) -> str:
    return f"limits:\n  models:\n    gpt-4: {{rpm: {rpm}{extra}}}\n  safety_margin: {margin}\n"


async def saturate(s, minutes: float, workers: int = 40) -> list[int]:
    """Keep the gpt-4 queue full for ``minutes`` emulated minutes; returns the statuses.

    The proxy and the emulator share this process with everything pytest has gathered so far: a
    full garbage collection of all that mid-run stalls both for long enough to cost a few of
    the scaled run's 17 ms slots. So everything alive now is collected and frozen first.
    """
    gc.collect()
    gc.freeze()
    try:
        return await _saturate(s, minutes, workers)
    finally:
        gc.unfreeze()


async def _saturate(s, minutes: float, workers: int) -> list[int]:
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + minutes * 60 / SCALE
    statuses: list[int] = []

    async def worker() -> None:
        while loop.time() < stop_at:
            response = await s.complete()
            await response.read()
            statuses.append(response.status)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return statuses


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
async def test_saturation_gets_no_429_and_uses_99_percent(stack, mode):
    minutes = 3
    s = await stack(
        paced(), emulator=EmulatorSettings(enforce=mode, rpm={"gpt-4": RPM}), time_scale=SCALE
    )
    statuses = await saturate(s, minutes)
    stats = s.emulator.models["gpt-4"]
    assert stats.rate_limited == 0
    assert set(statuses) == {200}
    arrivals = sorted(stats.arrivals)
    assert max_in_window(arrivals) <= RPM
    assert bucket_violations(arrivals, RPM) == 0
    in_run = [t for t in arrivals if t < arrivals[0] + minutes * 60]
    utilisation = len(in_run) / (RPM * minutes)
    assert utilisation >= 0.99, f"{utilisation:.4f}"


async def test_first_minute_and_after_idle_never_exceed_rpm(stack):
    s = await stack(
        paced(), emulator=EmulatorSettings(enforce="sliding", rpm={"gpt-4": RPM}), time_scale=SCALE
    )
    await saturate(s, 0.5)
    await asyncio.sleep(70 / SCALE)  # idle past a full window
    await saturate(s, 1.5)
    arrivals = sorted(s.emulator.models["gpt-4"].arrivals)
    assert s.emulator.models["gpt-4"].rate_limited == 0
    assert max_in_window(arrivals) <= RPM


async def test_a_larger_burst_goes_at_once_but_still_keeps_the_minute(stack):
    # Thirty requests released at once reach this in-process upstream over ~30 ms of real time
    # (most of an emulated second): the margin has to cover that spread.
    s = await stack(
        paced(extra=", burst: 30", margin=0.06),
        emulator=EmulatorSettings(enforce="sliding", rpm={"gpt-4": RPM}),
        time_scale=SCALE,
    )
    await asyncio.gather(*(s.complete() for _ in range(30)))
    arrivals = sorted(s.emulator.models["gpt-4"].arrivals)
    assert arrivals[-1] - arrivals[0] < 1.0  # thirty in the same emulated second
    await saturate(s, 1.5)
    arrivals = sorted(s.emulator.models["gpt-4"].arrivals)
    assert max_in_window(arrivals) <= RPM
    assert s.emulator.models["gpt-4"].rate_limited == 0


def test_default_burst_fits_a_per_second_bucket_less_the_margin():
    # 500 rpm: the upstream's bucket holds 8.33; 0.25 s of jitter at 0.12 s per request eats 2.08.
    capacity, period = bucket_shape(ModelLimit(500), margin=0.25)
    assert capacity == pytest.approx(500 / 60 - 0.25 / 0.12)
    assert period / capacity == pytest.approx(0.12)
    # 60 rpm: no room for a burst at all; requests are spaced wider than a second instead.
    capacity, period = bucket_shape(ModelLimit(60), margin=0.25)
    assert (capacity, period) == (1.0, pytest.approx(1.25))
    # A configured burst is taken as given.
    assert bucket_shape(ModelLimit(500, burst=50), margin=0.25) == (50, pytest.approx(6.0))


@pytest.mark.parametrize("fault", ["rate-limit=2", "rate-limit-bare", "rate-limit-date=1"])
async def test_an_upstream_429_is_absorbed_and_the_request_succeeds(stack, logs, fault):
    s = await stack(paced(rpm=6000), time_scale=SCALE)
    s.emulator.inject(fault)
    response = await s.complete()
    assert response.status == 200
    assert s.emulator.models["gpt-4"].rate_limited == 1
    line = (await logs.wait_requests(1))[-1]
    assert line["retries"] == 1 and line["status"] == 200
    if fault == "rate-limit=2":  # two emulated seconds of pause: 67 ms real
        assert int(response.headers["X-TCProxy-Queue-Ms"]) >= 60
    status = await (await s.session.get(f"{s.url}/-/status")).json()
    assert status["models"]["gpt-4"]["upstream_429"] == 1


async def test_a_429_pauses_the_whole_model_then_resumes(stack):
    s = await stack(paced(rpm=6000), time_scale=1)
    s.emulator.inject("rate-limit=1")
    first = asyncio.create_task(s.complete())
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    second = await s.complete()  # arrives during the pause: waits for it
    waited = asyncio.get_running_loop().time() - started
    assert second.status == 200 and (await first).status == 200
    assert 0.5 < waited < 2.0
    assert s.emulator.models["gpt-4"].rate_limited == 1


async def test_retries_stop_at_the_limit_and_the_upstream_429_passes_through(stack):
    s = await stack(paced(rpm=6000) + "  max_retries: 2\n", time_scale=SCALE)
    s.emulator.inject("rate-limit=1", count=5)
    response = await s.complete()
    assert response.status == 429
    assert "X-TCProxy-Error" not in response.headers  # the upstream's own answer
    assert s.emulator.models["gpt-4"].rate_limited == 3


async def test_a_429_past_the_deadline_reaches_the_client(stack):
    s = await stack(paced(rpm=6000) + "  queue_timeout: 0.5\n", time_scale=1)
    s.emulator.inject("rate-limit=30")
    response = await s.complete()
    assert response.status == 429
    assert response.headers["Retry-After"] == "30"
    assert s.emulator.models["gpt-4"].rate_limited == 1


async def test_spent_balance_is_logged_once_per_episode(stack, logs):
    s = await stack(paced(rpm=6000), time_scale=SCALE)
    s.emulator.inject("payment", count=3)
    for _ in range(3):
        assert (await s.complete()).status == 402
    assert (await s.complete()).status == 200
    assert s.emulator.models.get("gpt-4") is None or s.emulator.models["gpt-4"].rate_limited == 0
    errors = [e for e in logs.events() if e.get("alarm") == "balance_spent"]
    assert [e["level"] for e in errors] == ["error", "info"]


async def test_status_shows_the_queue_and_pace(stack):
    s = await stack(paced(rpm=60), time_scale=1)
    first = await s.complete()
    waiting = [asyncio.create_task(s.complete()) for _ in range(3)]
    await asyncio.sleep(0.3)
    status = await (await s.session.get(f"{s.url}/-/status")).json()
    gpt4 = status["models"]["gpt-4"]
    assert first.status == 200
    assert gpt4["rpm"] == 60 and gpt4["queue_depth"] == 3
    assert 0.2 <= gpt4["oldest_wait_s"] < 2
    assert gpt4["released_last_60s"] == 1
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
