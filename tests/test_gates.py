"""UserGate and CountGate: the lean locks of the delivery hot path."""

from __future__ import annotations

import asyncio

from yate_sipgen.features.delivery import CountGate, UserGate


async def _hold(gate: UserGate, key: str, log: list[str], name: str, ev: asyncio.Event) -> None:
    waiter = gate.enter(key)
    if waiter is not None:
        await gate.wait(key, waiter)
    try:
        log.append(f"{name}+")
        await ev.wait()
        log.append(f"{name}-")
    finally:
        gate.leave(key)


def test_user_gate_serves_one_holder_per_key_in_fifo_order_and_forgets_idle_keys() -> None:
    async def scenario() -> None:
        gate, log = UserGate(), []
        evs = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.ensure_future(_hold(gate, "bob", log, n, e))
                 for n, e in zip("abc", evs)]
        other = asyncio.ensure_future(_hold(gate, "alice", log, "z", asyncio.Event()))
        await asyncio.sleep(0)
        assert log == ["a+", "z+"]  # another key is not held up
        for ev in evs:
            ev.set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert [x for x in log if x[0] in "abc"] == ["a+", "a-", "b+", "b-", "c+", "c-"]
        assert not gate.locked("bob")
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        assert gate._held == {}

    asyncio.run(scenario())


def test_user_gate_passes_on_when_a_waiter_is_cancelled() -> None:
    async def scenario() -> None:
        gate, log = UserGate(), []
        first, third = asyncio.Event(), asyncio.Event()
        a = asyncio.ensure_future(_hold(gate, "k", log, "a", first))
        b = asyncio.ensure_future(_hold(gate, "k", log, "b", asyncio.Event()))
        c = asyncio.ensure_future(_hold(gate, "k", log, "c", third))
        await asyncio.sleep(0)
        b.cancel()  # b gives up while waiting
        first.set()
        third.set()
        await asyncio.gather(a, c, b, return_exceptions=True)
        assert log == ["a+", "a-", "c+", "c-"]
        assert not gate.locked("k")

    asyncio.run(scenario())


def test_count_gate_admits_up_to_its_limit_and_queues_the_rest_fifo() -> None:
    async def scenario() -> None:
        gate, order, release = CountGate(2), [], asyncio.Event()

        async def job(n: int) -> None:
            w = gate.enter()
            if w is not None:
                await gate.wait(w)
            try:
                order.append(n)
                assert gate.active <= 2
                await release.wait()
            finally:
                gate.leave()

        tasks = [asyncio.ensure_future(job(n)) for n in range(5)]
        await asyncio.sleep(0)
        assert order == [0, 1] and gate.active == 2
        release.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4] and gate.active == 0

    asyncio.run(scenario())
