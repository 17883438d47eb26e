"""Fair shares of a replica's render places between API keys (:mod:`service.fairness`)."""

import asyncio

import pytest

from service.errors import Overloaded
from service.fairness import FairQueue


def test_a_burst_of_one_key_waits_behind_its_own_renders_not_in_front_of_anothers():
    async def scenario():
        fair = FairQueue(renders_at_once=1, waiting_per_key=10)
        order, release = [], {}

        async def render(owner: str, n: int):
            async with fair.place(owner):
                order.append(f"{owner}{n}")
                release[f"{owner}{n}"] = asyncio.Event()
                await release[f"{owner}{n}"].wait()

        tasks = [asyncio.create_task(render("a", n)) for n in range(4)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(render("b", 0)))  # arrives after a's whole burst
        tasks.append(asyncio.create_task(render("c", 0)))
        for _ in range(6):
            await asyncio.sleep(0.01)
            release[order[-1]].set()
        await asyncio.gather(*tasks)
        return order

    # a0 held the place; then the keys take turns: a1, b0, c0, a2, a3
    assert asyncio.run(scenario()) == ["a0", "a1", "b0", "c0", "a2", "a3"]


def test_a_key_over_its_waiting_cap_is_refused_and_others_are_not():
    async def scenario():
        fair = FairQueue(renders_at_once=1, waiting_per_key=2, retry_after_s=3)
        hold = asyncio.Event()

        async def render(owner: str):
            async with fair.place(owner):
                await hold.wait()

        tasks = [asyncio.create_task(render("a")) for _ in range(3)]  # one runs, two wait
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await render("a")
        other = asyncio.create_task(render("b"))  # another key still gets in line
        await asyncio.sleep(0.01)
        assert fair.waiting("a") == 2 and fair.waiting("b") == 1
        hold.set()
        await asyncio.gather(*tasks, other)
        return refused.value, fair.free

    refused, free = asyncio.run(scenario())
    assert refused.retry_after_s == 3 and "2 renders waiting" in str(refused)
    assert free == 1  # every place came back


def test_a_waiting_render_that_is_cancelled_gives_up_its_turn_and_loses_no_place():
    async def scenario():
        fair = FairQueue(renders_at_once=2, waiting_per_key=5)
        hold = asyncio.Event()

        async def render(owner: str):
            async with fair.place(owner):
                await hold.wait()

        running = [asyncio.create_task(render("a")) for _ in range(2)]
        waiting = [asyncio.create_task(render(k)) for k in ("a", "b", "b")]
        await asyncio.sleep(0.01)
        waiting[1].cancel()  # a client gone (a timeout, a disconnect)
        await asyncio.sleep(0.01)
        assert fair.waiting("b") == 1
        hold.set()
        await asyncio.gather(*running, waiting[0], waiting[2])
        return fair.free

    assert asyncio.run(scenario()) == 2
