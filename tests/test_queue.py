"""The per-model waiting line: order, fairness, timeouts, a full line, clients that leave."""

from __future__ import annotations

import asyncio

import pytest

from tcproxy.errors import TooManyRequests
from tcproxy.pacing.queue import ModelQueue


class TickPacer:
    """A pacer that grants one slot each time the test calls ``tick()``."""

    interval = 1.0
    paused_until = 0.0

    def __init__(self) -> None:
        self._ticks: asyncio.Queue[None] = asyncio.Queue()
        self.granted = 0

    def ready(self, now: float) -> bool:
        return False

    async def acquire(self) -> None:
        await self._ticks.get()
        self.granted += 1

    def pause(self, until: float) -> None:
        self.paused_until = until

    async def tick(self, count: int = 1) -> None:
        for _ in range(count):
            self._ticks.put_nowait(None)
            await asyncio.sleep(0)
            await asyncio.sleep(0)


async def released_order(queue: ModelQueue, entries: list[tuple[str, str]]) -> list[asyncio.Task]:
    order: list[str] = []

    async def wait(client: str, name: str) -> None:
        await queue.wait_turn(client, timeout=60)
        order.append(name)

    tasks = []
    for client, name in entries:
        tasks.append(asyncio.create_task(wait(client, name)))
        await asyncio.sleep(0)
    return tasks, order


async def test_fifo_within_a_client():
    pacer = TickPacer()
    queue = ModelQueue("m", pacer, max_queue=100)
    tasks, order = await released_order(queue, [("a", f"a{i}") for i in range(5)])
    await pacer.tick(5)
    await asyncio.gather(*tasks)
    assert order == ["a0", "a1", "a2", "a3", "a4"]


async def test_round_robin_across_clients_one_cannot_starve_another():
    pacer = TickPacer()
    queue = ModelQueue("m", pacer, max_queue=1000)
    tasks, order = await released_order(queue, [("batch", f"A{i}") for i in range(200)])
    more, order_b = await released_order(queue, [("single", "B")])
    await pacer.tick(2)
    assert "B" in order_b and len(order) <= 2  # B went within a couple of slots
    await pacer.tick(200)
    await asyncio.gather(*tasks, *more)
    assert order == [f"A{i}" for i in range(200)]


async def test_waiter_that_leaves_leaves_no_residue():
    pacer = TickPacer()
    queue = ModelQueue("m", pacer, max_queue=100)
    tasks, order = await released_order(queue, [("a", f"a{i}") for i in range(10)])
    for task in tasks[::2]:
        task.cancel()
    await asyncio.sleep(0)
    assert queue.depth == 5
    await pacer.tick(5)
    await asyncio.gather(*tasks[1::2])
    assert order == ["a1", "a3", "a5", "a7", "a9"]
    assert queue.depth == 0 and not queue._lines and not queue._turns
    assert pacer.granted == 5  # no slot was spent on a waiter that had left


async def test_timeout_is_a_429_with_retry_after():
    queue = ModelQueue("gpt-4", TickPacer(), max_queue=10)
    with pytest.raises(TooManyRequests) as caught:
        await queue.wait_turn("a", timeout=0.05)
    assert caught.value.code == "queue_timeout"
    assert int(caught.value.headers()["Retry-After"]) >= 1
    assert queue.depth == 0


async def test_full_line_is_refused_at_once_but_a_retry_is_not():
    pacer = TickPacer()
    queue = ModelQueue("gpt-4", pacer, max_queue=2)
    tasks, _ = await released_order(queue, [("a", "1"), ("a", "2")])
    with pytest.raises(TooManyRequests) as caught:
        await queue.wait_turn("b", timeout=60)
    assert caught.value.code == "queue_full"
    retry = asyncio.create_task(queue.wait_turn("b", timeout=60, front=True))
    await asyncio.sleep(0)
    await pacer.tick()
    await retry  # the refused-then-retried request went first, despite the full line
    await pacer.tick(2)
    await asyncio.gather(*tasks)


async def test_slot_granted_to_a_waiter_that_just_left_passes_to_the_next():
    pacer = TickPacer()
    queue = ModelQueue("m", pacer, max_queue=10)
    tasks, order = await released_order(queue, [("a", "first"), ("a", "second")])
    pacer._ticks.put_nowait(None)
    await asyncio.sleep(0)  # the dispatcher grants "first" its slot...
    tasks[0].cancel()  # ...and its client leaves before it resumes
    await asyncio.gather(tasks[0], return_exceptions=True)
    await asyncio.wait_for(tasks[1], 1)
    assert order == ["second"]
    assert pacer.granted == 1


async def test_disconnect_while_queued_never_reaches_upstream(stack, logs):
    # gpt-4 at 2 rpm with a minute of one second: one release every half second.
    s = await stack(
        "limits:\n  models:\n    gpt-4: {rpm: 2}\n  safety_margin: 0.01\n", time_scale=60
    )
    first = await s.complete()
    assert first.status == 200
    waiting = asyncio.create_task(s.complete(prompt="never sent"))
    await asyncio.sleep(0.1)
    assert s.state.limiter.queue("gpt-4").depth == 1
    waiting.cancel()  # the client hangs up while its request waits for a slot
    await asyncio.gather(waiting, return_exceptions=True)
    await asyncio.sleep(1.2)  # well past when its slot would have come
    assert s.emulator.requests == 1
    assert s.state.limiter.queue("gpt-4").depth == 0
    gone = [line for line in logs.requests() if line["status"] == 499]
    assert gone and gone[0]["error"] == "client_gone"
    third = await s.complete()
    assert third.status == 200 and s.emulator.requests == 2


async def test_queue_timeout_over_http_is_429_with_retry_after(stack):
    s = await stack("limits:\n  models:\n    gpt-4: {rpm: 1}\n  queue_timeout: 0.3\n")
    assert (await s.complete()).status == 200
    response = await s.complete()
    assert response.status == 429
    assert response.headers["X-TCProxy-Error"] == "queue_timeout"
    assert int(response.headers["Retry-After"]) >= 1
    assert int(response.headers["X-TCProxy-Queue-Ms"]) >= 250
    assert s.emulator.requests == 1


async def test_full_queue_over_http_is_429_at_once(stack):
    s = await stack("limits:\n  models:\n    gpt-4: {rpm: 1}\n  max_queue: 1\n")
    assert (await s.complete()).status == 200
    queued = asyncio.create_task(s.complete())
    await asyncio.sleep(0.1)
    response = await s.complete()
    assert response.status == 429
    assert response.headers["X-TCProxy-Error"] == "queue_full"
    assert "Retry-After" in response.headers
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)


async def test_models_not_listed_get_the_default_limit(stack):
    from tcproxy.emulator import EmulatorSettings

    s = await stack(
        "limits:\n  default: {rpm: 1}\n  queue_timeout: 0.2\n",
        emulator=EmulatorSettings(unknown_model_rpm=1000),
    )
    assert (await s.complete(model="brand-new-model")).status == 200
    assert (await s.complete(model="brand-new-model")).status == 429  # paced at 1 rpm, not refused
    status = await (await s.session.get(f"{s.url}/-/status")).json()
    assert status["models"]["brand-new-model"]["rpm"] == 1


async def test_a_model_spelled_differently_shares_its_budget(stack):
    s = await stack("limits:\n  models:\n    GPT-4: {rpm: 1}\n  queue_timeout: 0.2\n")
    assert (await s.complete(model="gpt-4")).status == 200
    for spelling in ("GPT-4", " gpt-4 ", "Gpt-4"):  # no second budget by changing the case
        response = await s.complete(model=spelling)
        assert response.status == 429 and response.headers["X-TCProxy-Error"] == "queue_timeout"


async def test_invented_model_names_share_one_queue_past_a_cap(monkeypatch):
    import tcproxy.pacing as pacing
    from tcproxy.config import LimitsConfig

    monkeypatch.setattr(pacing, "_MAX_UNLISTED_QUEUES", 3)
    limiter = pacing.Limiter(LimitsConfig())
    queues = [limiter.queue(f"invented-{i}") for i in range(3)]
    for queue in queues:  # each has released just now: none is idle, none can be forgotten
        await queue.wait_turn("-", timeout=1)
    overflow = limiter.queue("invented-4")
    assert overflow.model == pacing.OTHER_MODELS
    assert limiter.queue("invented-5") is overflow
    assert limiter.queue("gpt-4").model == "gpt-4"  # listed models always get their own
