"""``kill -9`` of a hub in the middle of a gift load: its senders retry each gift with
the same key on another hub of the same store, and every coin stays accounted for.

Six senders on hub A send gifts as fast as they are answered, each gift with its
own key; after 80 were acked, A gets SIGKILL, and the load
goes on for 80 more. Each sender's
``send_gift`` sees the dropped connection (or a refused reconnect), its
``on_retry`` points it at hub B, and the gift is retried there with its key: a
gift A had committed before dying comes back ``duplicate`` with its transfer,
one it had not is made on B. Then: every ack is in the journal once, no key
paid twice, balances are top-up less acked costs, ``gifting audit`` passes.
"""

from __future__ import annotations

import asyncio
import signal

from tests.conftest import T
from tests.faults.clients import Load
from tests.faults.cluster import Cluster
from tests.faults.conftest import SLOW

SENDERS = 6
KILL_AT = 80  # acks before the kill
AFTER = 80  # acks after it, then the load stops


async def test_kill9_hub_mid_load(cluster: Cluster) -> None:
    a, b = await asyncio.gather(cluster.start_hub(), cluster.start_hub())
    await cluster.go_live("alice")
    senders = [await cluster.sender(f"s{i}", a, ["alice"], coins=10_000) for i in range(SENDERS)]
    load = Load(senders, "alice")
    at_kill: list[int] = []

    async def kill_mid_load() -> None:
        await load.reached(KILL_AT)
        at_kill.append(len(load.acks))
        assert await a.kill9(T) == -signal.SIGKILL
        await load.reached(at_kill[0] + AFTER)
        load.stop()

    async with asyncio.timeout(SLOW), asyncio.TaskGroup() as tg:
        tg.create_task(load.run())
        tg.create_task(kill_mid_load())

    assert len(load.acks) >= at_kill[0] + AFTER
    for s in senders:
        # each one saw A go (a lost answer or a refused reconnect) and moved to B
        assert s.retries >= 1, s.user
        assert set(s.retry_errors) <= {"ConnectionLost", "ConnectionRefusedError"}, s.retry_errors
        assert s.acks[-1].url == b.url
        assert not s.pending
    assert b.alive and await cluster.healthz(b) == 200

    problems = await cluster.violations(load.acks, creators={"alice": 0})
    assert not problems, problems
    rc, out = await cluster.audit()
    assert rc == 0, out
