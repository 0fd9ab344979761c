"""Rooms across hubs: two and three hubs on one store and prefix, as ``serve --workers`` runs them.

A room's viewers may be on any hub. ``viewers`` (in ``join`` and ``presence``)
and ``top`` are the room-wide values and agree on every hub within a tick (the
hubs here tick every 0.2 s; ``serve`` ticks every second). A hub that stops is
no longer counted: at once when it stops cleanly, within a few ticks when it
dies (its heartbeat expires). However many hubs serve a room, each connection
gets ``presence`` and ``top`` at most once a tick.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from gifting.hub import Hub, running_hub
from tests.conftest import T, base_config, topup


class Watch:
    """Every event one client receives, with its arrival time (the client's
    ``on_event``); ``until`` awaits a condition on them under a deadline."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    def __call__(self, ev: dict[str, Any]) -> None:
        self.events.append((asyncio.get_running_loop().time(), ev))
        self._changed.set()

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, ev) for t, ev in self.events if ev["ev"] == kind]

    def last(self, kind: str) -> dict[str, Any] | None:
        seen = self.of(kind)
        return seen[-1][1] if seen else None

    async def until(self, done: Callable[[], bool], timeout: float = T) -> float:
        """Wait for ``done``; return the loop time at which it held."""
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()
        return asyncio.get_running_loop().time()

    async def viewers(self, n: int, timeout: float = T) -> float:
        """Wait until the last ``presence`` says ``n``; return when it came."""

        def done() -> bool:
            ev = self.last("presence")
            return ev is not None and ev["viewers"] == n

        await self.until(done, timeout)
        return self.of("presence")[-1][0]


async def watched(connect, hub: Hub, user: str) -> tuple[Any, Watch]:
    w = Watch()
    return await connect(hub, user, on_event=w), w


async def test_viewers_and_top_are_room_wide_on_every_hub(start_hub, connect):
    h1 = await start_hub()
    h2 = await start_hub(prefix=h1.config.prefix)
    h3 = await start_hub(prefix=h1.config.prefix)
    hubs = (h1, h2, h3)
    creator, on_creator = await watched(connect, h1, "alice")
    session = (await creator.request("go_live"))["session"]
    # The creator's own connection is not a viewer; a user's second connection is.
    joins = []
    watches = [on_creator]
    for user, hub in (("v1", h1), ("v2", h2), ("v3", h3), ("v1", h3)):
        c, w = await watched(connect, hub, user)
        joins.append((await c.request("join", room="alice"))["viewers"])
        watches.append(w)
    assert joins == [1, 2, 3, 4]
    joined = asyncio.get_running_loop().time()
    # Every connection, whichever hub it is on, is told the room-wide count, soon.
    for w in watches:
        assert await w.viewers(4) - joined < 1.0
    assert [(await h.rooms.viewers(["alice"]))["alice"] for h in hubs] == [4, 4, 4]

    # Gifts sent on two hubs: every hub shows the same leaderboard, soon.
    g2, _ = await watched(connect, h2, "g2")
    g3, _ = await watched(connect, h3, "g3")
    for g in (g2, g3):
        await topup(h1, g.user, 100)
        await g.request("join", room="alice")
    await g2.request("gift", room="alice", gift="heart", key="a")  # 5 coins
    await g3.request("gift", room="alice", gift="star", key="b")  # 10 coins
    sent = asyncio.get_running_loop().time()
    top = await h1.ledger.top("alice", session)
    assert [(e["user"], e["coins"]) for e in top] == [("g3", 10), ("g2", 5)]
    for w in watches:
        assert (
            await w.until(lambda w=w: w.last("top") == {"ev": "top", "room": "alice", "top": top})
            - sent
            < 1.0
        )


async def test_a_hub_that_stops_or_dies_is_no_longer_counted(start_hub, connect, store_url):
    h1 = await start_hub()
    prefix = h1.config.prefix
    creator, on_creator = await watched(connect, h1, "alice")
    await creator.request("go_live")
    local = await connect(h1, "v1")
    await local.request("join", room="alice")
    # A second hub stops cleanly: it takes its counts out of the store as it goes.
    async with running_hub(base_config(prefix=prefix), store_url) as h2:
        c2 = await connect(h2, "v2")
        assert (await c2.request("join", room="alice"))["viewers"] == 2
        await on_creator.viewers(2)
    stopped = asyncio.get_running_loop().time()
    assert await on_creator.viewers(1) - stopped < 1.0

    # h2 "dies": it can no longer take its count out (no close, no stop), and
    # its heartbeat ends with its ticker, as when its process is killed.
    async with running_hub(base_config(prefix=prefix), store_url) as h2:
        c2 = await connect(h2, "v2")
        assert (await c2.request("join", room="alice"))["viewers"] == 2
        await on_creator.viewers(2)

        async def nothing(*_args: object) -> None:
            pass

        h2.rooms.publish_presence = nothing  # type: ignore[method-assign]
        h2.rooms.stop = nothing  # type: ignore[method-assign]
    died = asyncio.get_running_loop().time()
    key = f"{prefix}:pres:alice"
    assert await h1.rooms.r.hget(key, h2.hub_id) == b"1", "the dead hub's count is still stored"
    # Counted until its last heartbeat (5 ticks ahead) expires: well within a few seconds.
    assert await on_creator.viewers(1) - died < 5 * h1.config.tick + 1.0
    assert (await local.request("join", room="alice"))["viewers"] == 1


async def test_presence_and_top_at_most_once_a_tick_per_connection(start_hub, connect):
    h1 = await start_hub()
    hubs = [h1, *[await start_hub(prefix=h1.config.prefix) for _ in range(2)]]
    tick = h1.config.tick
    creator, on_creator = await watched(connect, h1, "alice")
    await creator.request("go_live")
    watches = [on_creator]
    gifters = []
    for i, hub in enumerate(hubs):
        c, w = await watched(connect, hub, f"w{i}")
        await c.request("join", room="alice")
        watches.append(w)
        g = await connect(hub, f"g{i}")
        await topup(h1, f"g{i}", 10_000)
        await g.request("join", room="alice")
        gifters.append(g)
    churners = [await connect(hubs[i % 3], f"c{i}") for i in range(9)]
    for w in watches:
        await w.viewers(6)
    keys = itertools.count()
    changes = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    until = start + 8 * tick

    async def churn(c) -> None:
        nonlocal changes
        while loop.time() < until:
            await c.request("join", room="alice")
            await c.request("leave", room="alice")
            changes += 2

    async def gifts(g) -> None:
        nonlocal changes
        while loop.time() < until:
            await g.request("gift", room="alice", gift="rose", key=f"k{next(keys)}")
            changes += 1

    marks = [len(w.events) for w in watches]
    async with asyncio.timeout(T):
        await asyncio.gather(*map(churn, churners), *map(gifts, gifters))
    # One more viewer stays: every watcher is told the final count.
    await churners[0].request("join", room="alice")
    for w in watches:
        await w.viewers(7)
    end = loop.time()
    # Far more changes than ticks: sent as they happen they would be many more events.
    ticks = (end - start) / tick
    assert changes > 10 * (ticks + 2), (changes, ticks)
    for w, mark in zip(watches, marks, strict=True):
        for kind in ("presence", "top"):
            times = [t for t, ev in w.events[mark:] if ev["ev"] == kind]
            assert times, kind
            # At most one per tick, give or take one batch window of delivery.
            assert len(times) <= ticks + 2, (kind, len(times), ticks)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps, default=tick) > tick - h1.config.batch_window - 0.05, (kind, gaps)
