"""Memory given back after a burst (tcproxy/housekeeping.py): when it cleans up; that it runs."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import sys

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

    def clean() -> bool:
        cleaned.append(blocks.now)
        return True

    return Housekeeper(blocks, clean=clean), cleaned


def run(house: Housekeeper, blocks: Blocks, counts: list[int]) -> None:
    for now in counts:
        blocks.now = now
        house.check()


def test_a_burst_that_came_and_went_is_cleaned_up_once_its_fall_settles():
    blocks = Blocks(200_000)
    house, cleaned = keeper(blocks)
    run(house, blocks, [500_000, 1_500_000, 1_500_000, 1_500_000])  # rising, then held
    run(house, blocks, [700_000, 300_000, 299_000])  # the clients hang up
    assert cleaned == []  # not settled yet
    run(house, blocks, [298_000, 299_500])
    assert cleaned == [299_500]
    run(house, blocks, [299_000] * 10)  # and not again while nothing changes
    assert cleaned == [299_500]


def test_a_queue_drained_slowly_is_cleaned_up_once_it_is_empty_not_on_the_way():
    blocks = Blocks(200_000)
    queued = [10_000]
    house = Housekeeper(blocks, queued=lambda: queued[0], clean=lambda: bool(cleaned.append(1)))
    cleaned: list[int] = []
    run(house, blocks, [1_700_000] * 3)
    for now in range(1_700_000, 220_000, -150):  # one request a second leaves, for hours
        queued[0] = max(0, queued[0] - 1)
        blocks.now = now
        house.check()
    assert cleaned == []
    queued[0] = 0
    run(house, blocks, [220_000] * 3)
    assert cleaned == [1]


def test_a_fall_still_under_way_is_waited_out():
    blocks = Blocks(200_000)
    house, cleaned = keeper(blocks)
    run(house, blocks, [1_700_000] * 3)
    run(house, blocks, list(range(1_700_000, 230_000, -3_000)))  # 3,000 blocks a second
    assert cleaned == []
    run(house, blocks, [230_000] * (housekeeping._SETTLED + 1))  # its last steps, then flat
    assert cleaned == [230_000]


def test_small_swings_are_left_alone_however_big_the_process():
    blocks = Blocks(3_000_000)
    house, cleaned = keeper(blocks)
    run(house, blocks, [3_000_000 + BURST // 2, 3_000_000] * 20)
    assert cleaned == []
    run(house, blocks, [3_700_000, 3_000_000, 3_000_000, 3_000_000, 3_000_000])  # a real burst
    assert cleaned == [3_000_000]


def test_a_second_burst_after_a_clean_up_is_cleaned_up_too():
    blocks = Blocks(200_000)
    house, cleaned = keeper(blocks)
    run(house, blocks, [1_000_000] + [250_000] * 4 + [900_000] + [240_000] * 4)
    assert cleaned == [250_000, 240_000]


def test_a_clean_up_that_fails_is_not_retried_every_second():
    blocks = Blocks(200_000)
    attempts: list[int] = []

    def failing() -> bool:
        attempts.append(blocks.now)
        raise OSError("no heap to trim")

    house = Housekeeper(blocks, clean=failing)
    blocks.now = 1_000_000
    house.check()
    blocks.now = 200_000
    for _ in range(10):
        with contextlib.suppress(OSError):
            house.check()
    assert attempts == [200_000]


def test_the_real_clean_up_collects_trims_and_logs_what_came_back(logs):
    blocks = Blocks(200_000)
    house = Housekeeper(blocks)  # the real gc.collect() and malloc_trim()
    run(house, blocks, [2_000_000, 200_000, 200_000, 200_000, 200_000])
    (line,) = logs.events("memory returned after a burst")
    assert line["rss_before_mib"] > 0 and line["rss_after_mib"] > 0
    assert line["took_ms"] >= 0
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert line["heap_trimmed"] is True


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
