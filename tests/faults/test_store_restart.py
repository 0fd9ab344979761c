"""The store restarts in the middle of a gift load: the hub answers ``unavailable``
while it is gone, reports it on ``/healthz``, and recovers by itself.

Five senders on one hub send gifts as fast as they are answered. After 80 were
acked the store is stopped (SIGTERM: it flushes its AOF and exits); the
hub must then say so (``/healthz`` 503, ``unavailable`` to a command and to the
gifts, which ``send_gift`` retries with their keys) and ack nothing. The store
is started again from the same directory, at the same address; ``/healthz``
turns 200 with no help and the load finishes on the same connections. Then the
money checks and ``gifting audit``.
"""

from __future__ import annotations

import asyncio

import pytest

from protocol import errors
from tests.conftest import T
from tests.faults.clients import Load
from tests.faults.cluster import Cluster
from tests.faults.conftest import SLOW

SENDERS = 5
STOP_AT = 80  # acks before the store stops
AFTER = 80  # acks after it is back, then the load stops


async def _any(events: list[asyncio.Event]) -> None:
    """Wait (under the caller's deadline) until one of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def test_store_restart_mid_load(cluster: Cluster) -> None:
    hub = await cluster.start_hub()
    await cluster.go_live("alice")
    senders = [await cluster.sender(f"s{i}", hub, ["alice"], coins=10_000) for i in range(SENDERS)]
    probe = await cluster.sender("probe", hub, [])
    load = Load(senders, "alice")
    acked: dict[str, int] = {}

    async def outage() -> None:
        await load.reached(STOP_AT)
        await cluster.stop_store()
        async with asyncio.timeout(T):
            await cluster.until_health(hub, 503)
        acked["down"] = len(load.acks)
        with pytest.raises(errors.Unavailable):
            await probe.client.request("balance")
        async with asyncio.timeout(T):  # the load is told too, and retries
            await _any([s.saw("unavailable") for s in senders])
        acked["restart"] = len(load.acks)
        await cluster.start_store()  # same dir, same address; AOF replayed
        async with asyncio.timeout(3 * T):  # by itself: nothing is done to the hub
            await cluster.until_health(hub, 200)
        await load.reached(acked["restart"] + AFTER)
        load.stop()

    async with asyncio.timeout(2 * SLOW), asyncio.TaskGroup() as tg:
        tg.create_task(load.run())
        tg.create_task(outage())

    assert len(load.acks) >= acked["restart"] + AFTER
    assert acked["restart"] == acked["down"], "a gift was acked while the store was down"
    assert hub.alive
    for s in senders:
        # the hub kept every connection: only ``unavailable`` was retried
        assert set(s.retry_errors) <= {"unavailable"}, (s.user, s.retry_errors)
        assert not s.pending
    assert sum(s.retry_errors["unavailable"] for s in senders) >= 1
    assert (await probe.client.request("balance"))["coins"] == 0

    problems = await cluster.violations(load.acks, creators={"alice": 0})
    assert not problems, problems
    rc, out = await cluster.audit()
    assert rc == 0, out
