"""Memory given back after a burst (tcproxy/housekeeping.py): when it cleans up; that it runs."""

from __future__ import annotations

import asyncio

import pytest

from tcproxy import housekeeping
from tcproxy.housekeeping import Housekeeper

BURST = housekeeping._MIN_DROP


class Blocks:
    """Allocated-block counts the test sets, in place of the interpreter's."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def keeper(blocks: Blocks) -> tuple[Housekeeper, list[int]]:
    cleaned: list[int] = []
    return Housekeeper(blocks, clean=lambda: cleaned.append(blocks.now)), cleaned


def test_a_burst_that_came_and_went_is_cleaned_up_once_its_fall_settles():
    blocks = Blocks(200_000)
    house, cleaned = keeper(blocks)
    for now in (500_000, 1_500_000, 1_500_000):  # rising, then held: nothing to give back
        blocks.now = now
        assert not house.check()
    blocks.now = 700_000  # the clients hang up: still falling fast
    assert not house.check()
    blocks.now = 300_000
    assert not house.check()
    blocks.now = 295_000  # settled
    assert house.check()
    assert cleaned == [295_000]
    for _ in range(3):  # and not again while nothing changes
        assert not house.check()
    assert cleaned == [295_000]


def test_steady_load_and_small_swings_are_left_alone():
    blocks = Blocks(1_000_000)
    house, cleaned = keeper(blocks)
    for now in (1_000_000 + BURST // 2, 1_000_000, 1_200_000, 1_200_000 - BURST, 1_000_000):
        blocks.now = now  # falls by BURST but less than a third of the peak
        house.check()
    assert cleaned == []


def test_a_second_burst_after_a_clean_up_is_cleaned_up_too():
    blocks = Blocks(200_000)
    house, cleaned = keeper(blocks)
    for now in (1_000_000, 250_000, 250_000, 900_000, 240_000, 240_000):
        blocks.now = now
        house.check()
    assert cleaned == [250_000, 240_000]


def test_the_real_clean_up_collects_trims_and_logs_what_came_back(logs):
    blocks = Blocks(200_000)
    house = Housekeeper(blocks)  # the real gc.collect() and malloc_trim()
    blocks.now = 2_000_000
    house.check()
    blocks.now = 200_000
    assert not house.check()  # still falling
    assert house.check()
    (line,) = logs.events("memory returned after a burst")
    assert line["rss_before_mib"] > 0 and line["rss_after_mib"] > 0
    assert line["took_ms"] >= 0


async def test_the_running_proxy_checks_every_second(stack, monkeypatch):
    monkeypatch.setattr(housekeeping, "_EVERY", 0.01)
    checks: list[None] = []
    original = Housekeeper.check

    def counted(self: Housekeeper) -> bool:
        checks.append(None)
        return original(self)

    monkeypatch.setattr(Housekeeper, "check", counted)
    s = await stack()
    assert (await s.complete()).status == 200
    await asyncio.sleep(0.2)
    assert len(checks) >= 5


async def test_a_failing_check_is_logged_and_the_checks_go_on(stack, monkeypatch, logs):
    monkeypatch.setattr(housekeeping, "_EVERY", 0.01)
    calls: list[None] = []

    def broken(self: Housekeeper) -> bool:
        calls.append(None)
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(Housekeeper, "check", broken)
    s = await stack()
    await asyncio.sleep(0.2)
    assert len(calls) >= 5
    assert logs.events("housekeeping failed")
    assert (await s.complete()).status == 200


@pytest.mark.skipif(not housekeeping._rss_mib(), reason="no /proc here")
def test_rss_is_read_from_proc():
    assert 1 < housekeeping._rss_mib() < 10_000
