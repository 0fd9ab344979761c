"""Two hubs on one store, one killed: its viewers reconnect to the other, re-join the
room and keep receiving bubbles; senders on both keep gifting; nothing acked is lost.

Hub A holds four viewers of ``alice`` and three senders; hub B holds alice
herself, two viewers and three senders. After 60 acks A gets SIGKILL. Its
viewers reconnect to B (``Client.open`` re-joins their rooms) and its senders'
gifts are retried there with their keys. Once every viewer is back, a second
round of gifts must reach each of them: on the rejoined connection a viewer
gets every bubble from its first one on, in ``seq`` order, up to the room's
last; B's viewers, never disconnected, get every bubble of the run.
"""

from __future__ import annotations

import asyncio
import signal

from tests.conftest import T
from tests.faults.clients import Load
from tests.faults.cluster import Cluster
from tests.faults.conftest import SLOW

KILL_AT = 60  # acks before the kill
AFTER = 60  # acks in the round after every viewer is back


async def test_viewers_of_a_killed_hub_follow_the_room_elsewhere(cluster: Cluster) -> None:
    a, b = await asyncio.gather(cluster.start_hub(), cluster.start_hub())
    alice = await cluster.viewer("alice", b, "alice")  # the creator: joined as creator
    await alice.client.request("go_live")
    moving = [await cluster.viewer(f"va{i}", a, "alice") for i in range(4)]
    staying = [await cluster.viewer(f"vb{i}", b, "alice") for i in range(2)]
    for v in moving:
        v.follow(within=2 * T)
    senders = [
        await cluster.sender(f"s{i}", a if i < 3 else b, ["alice"], coins=10_000) for i in range(6)
    ]

    first = Load(senders, "alice", seed=1)

    async def kill_mid_load() -> None:
        await first.reached(KILL_AT)
        assert await a.kill9(T) == -signal.SIGKILL
        async with asyncio.timeout(2 * T):  # every viewer of A is back, on B
            for v in moving:
                await v.wait_reconnects(1)
        first.stop()

    async with asyncio.timeout(SLOW), asyncio.TaskGroup() as tg:
        tg.create_task(first.run())
        tg.create_task(kill_mid_load())
    mid = await cluster.room_seq("alice")

    second = Load(senders, "alice", seed=2)

    async def stop_after() -> None:
        await second.reached(AFTER)
        second.stop()

    async with asyncio.timeout(SLOW), asyncio.TaskGroup() as tg:
        tg.create_task(second.run())
        tg.create_task(stop_after())

    acks = first.acks + second.acks
    for s in senders:
        assert not s.pending
        assert s.acks[-1].url == b.url
    problems = await cluster.violations(acks, creators={"alice": 0})
    assert not problems, problems
    rc, out = await cluster.audit()
    assert rc == 0, out

    last = await cluster.room_seq("alice")
    assert last == len({x.transfer for x in acks}), "one seq per gift, nothing else"
    for v in [alice, *moving, *staying]:
        try:
            async with asyncio.timeout(T):
                await v.wait_seq(last)
        except TimeoutError:
            raise AssertionError(
                f"{v.user} stopped at seq {v.last_seq} of {last} "
                f"(reconnects {v.reconnects}, errors {dict(v.reconnect_errors)})"
            ) from None

    for v in [alice, *staying]:
        assert v.by_gen() == {0: list(range(1, last + 1))}, v.user
    for v in moving:
        assert v.reconnects == 1 and v.client.url == b.url, v.user
        gens = v.by_gen()
        assert 1 in gens and set(gens) <= {0, 1}, (v.user, set(gens))
        again = gens[1]
        # from its first bubble after the rejoin: all of them, in order, to the last
        assert again == list(range(again[0], last + 1)), v.user
        assert again[0] <= mid + 1, f"{v.user} missed bubbles of the second round"
        before = gens.get(0, [])  # none if A died with its first batch unsent
        assert before == list(range(1, len(before) + 1)), v.user
