"""Brand campaigns through the real hub, a real socket and a real Valkey: escrow,
joins, rewards paid inside the gift's own step, closing and expiry (two hubs
sweeping one store), and the audit of escrow accounts."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gifting.store import EmbeddedStore
from protocol import errors
from protocol.client import new_key
from tests.conftest import T, balances, token, topup

HOUR = 3600 * 1000
OBJECT_KEYS = {
    "id",
    "title",
    "brand",
    "budget",
    "escrow",
    "reward",
    "metric",
    "threshold",
    "ends",
    "status",
    "joined",
    "progress",
    "rewarded",
}


def now_ms() -> int:
    return int(time.time() * 1000)


async def brand(hub, connect, user="acme", name="Acme", coins=10_000):
    """A connection with a brand token (and ``coins`` topped up)."""
    c = await connect(hub)
    await c.request("auth", token=token(user, name, brand=True))
    if coins:
        left = await topup(hub, user, coins)
        # Taken here, so that it cannot reach a connection opened later (the
        # hub handles one store message for all of a user's connections).
        async with asyncio.timeout(T):
            assert await c.next_event("balance") == {"ev": "balance", "coins": left}
    return c


def spec(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "campaign": "summer",
        "title": "Summer of gifts",
        "budget": 1000,
        "reward": 100,
        "metric": "gifts",
        "threshold": 5,
        "ends": now_ms() + HOUR,
        "key": new_key(),
    }
    args.update(over)
    return {k: v for k, v in args.items() if v is not None}


async def create(b, **over: Any) -> dict[str, Any]:
    res = await b.request("campaign_create", **spec(**over))
    campaign: dict[str, Any] = res["campaign"]
    return campaign


async def live(hub, connect, creator="alice", viewers=("bob",), coins=10_000):
    """A live creator (its connection joined as creator) and topped-up viewers in the room."""
    c = await connect(hub, creator)
    await c.request("go_live")
    vs = []
    for v in viewers:
        cl = await connect(hub, v)
        await topup(hub, v, coins)
        await cl.request("join", room=creator)
        vs.append(cl)
    return c, vs


async def journal(hub, kind: str | None = None) -> list[dict[str, str]]:
    rows = await hub.ledger.r.xrange(hub.ledger.key("journal"))
    out = [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]
    return [e for e in out if kind is None or e["kind"] == kind]


async def view(hub, campaign: str, viewer: str) -> dict[str, Any]:
    found = await hub.ledger.campaigns.get(campaign, viewer)
    assert found is not None
    return found.wire(now_ms())


async def until(ms: int) -> None:
    """Until the wall clock reaches ``ms``: the passing of time is the condition."""
    await asyncio.sleep(max(0, ms - now_ms() + 2) / 1000)
    assert now_ms() >= ms


async def next_sweeps(hub, n: int = 2) -> None:
    """Until ``hub`` has finished ``n`` more sweeps (each may have failed)."""
    sw = hub.campaigns
    target = sw.sweeps + n
    async with asyncio.timeout(T), sw.swept:
        await sw.swept.wait_for(lambda: sw.sweeps >= target)


# -- campaign_create ---------------------------------------------------------


async def test_create_holds_the_budget_in_escrow(hub, connect):
    b = await brand(hub, connect)
    other = await brand(hub, connect, coins=0)  # the brand's second connection
    ends = now_ms() + HOUR
    res = await b.request("campaign_create", **spec(budget=600, ends=ends, key="k1"))
    assert res == {
        "campaign": {
            "id": "summer",
            "title": "Summer of gifts",
            "brand": {"user": "acme", "name": "Acme"},
            "budget": 600,
            "escrow": 600,
            "reward": 100,
            "metric": "gifts",
            "threshold": 5,
            "ends": ends,
            "status": "open",
            "joined": False,
            "progress": 0,
            "rewarded": False,
        },
        "duplicate": False,
    }
    bals = await balances(hub)
    assert bals["acme"] == 9400 and bals["~escrow:summer"] == 600 and sum(bals.values()) == 0
    async with asyncio.timeout(T):
        assert await other.next_event("balance") == {"ev": "balance", "coins": 9400}
    assert not b.drain("balance")  # the calling connection has its answer
    (h, _topup) = (await b.request("history"))["entries"]
    assert h["kind"] == "escrow" and h["coins"] == -600 and h["campaign"] == "summer"
    (entry,) = await journal(hub, "escrow")
    assert entry["step"] == "hold" and entry["post"] == "acme=-600;~escrow:summer=600"
    assert (await b.request("campaigns"))["campaigns"] == [res["campaign"]]


async def test_create_replays_by_key_on_any_connection_and_id(hub, connect):
    b = await brand(hub, connect)
    b2 = await brand(hub, connect, coins=0)
    args = spec(key="same")
    first = await b.request("campaign_create", **args)
    again = await b2.request("campaign_create", **args)
    assert again == {**first, "duplicate": True}
    # Copies at once: still one escrow.
    burst = spec(campaign="burst", key="k2")
    copies = await asyncio.gather(*(c.request("campaign_create", **burst) for c in [b, b2] * 4))
    assert sum(not r["duplicate"] for r in copies) == 1
    # The same campaign under a new key is the same campaign, not a second escrow.
    assert (await b.request("campaign_create", **{**args, "key": "new"}))["duplicate"]
    bals = await balances(hub)
    assert bals["acme"] == 8000 and bals["~escrow:summer"] == bals["~escrow:burst"] == 1000
    assert len(await journal(hub, "escrow")) == 2
    before = await balances(hub)
    # The key with another body, or the id with another body or brand: conflict.
    with pytest.raises(errors.Conflict):
        await b.request("campaign_create", **{**args, "budget": 999})
    with pytest.raises(errors.Conflict):
        await b.request("campaign_create", **spec(title="Other", key="k3"))
    rival = await brand(hub, connect, "rival", coins=5000)
    with pytest.raises(errors.Conflict):
        await rival.request("campaign_create", **args)
    assert await balances(hub) == {**before, "rival": 5000, "~issuer": before["~issuer"] - 5000}


async def test_create_key_shared_with_gifts(hub, connect):
    """Keys share one space per user: a gift's key cannot create a campaign."""
    await live(hub, connect, creator="alice", viewers=())
    b = await brand(hub, connect)
    await b.request("join", room="alice")
    await b.request("gift", room="alice", gift="rose", key="k")
    before = await balances(hub)
    with pytest.raises(errors.Conflict):
        await b.request("campaign_create", **spec(key="k"))
    await create(b, key="c")
    with pytest.raises(errors.Conflict):
        await b.request("gift", room="alice", gift="rose", key="c")
    assert (await balances(hub))["acme"] == before["acme"] - 1000


async def test_create_forbidden_for_non_brands_and_insufficient_funds(hub, connect):
    alice = await connect(hub, "alice")
    await topup(hub, "alice", 5000)
    b = await brand(hub, connect, coins=500)
    before = await balances(hub)
    with pytest.raises(errors.Forbidden):
        await alice.request("campaign_create", **spec())
    with pytest.raises(errors.InsufficientFunds):
        await b.request("campaign_create", **spec(budget=501, reward=1, key="k"))
    assert await balances(hub) == before
    # A key that moved nothing is not remembered: topped up, it works.
    await topup(hub, "acme", 1)
    res = await b.request("campaign_create", **spec(budget=501, reward=1, key="k"))
    assert not res["duplicate"] and (await balances(hub))["acme"] == 0


HOSTILE: list[tuple[str, Any]] = [
    ("campaign", None),
    ("campaign", ""),
    ("campaign", "x" * 65),
    ("campaign", "has space"),
    ("campaign", "a:b"),
    ("campaign", 7),
    ("title", None),
    ("title", ""),
    ("title", "t" * 81),
    ("title", 5),
    ("title", ["t"]),
    ("budget", None),
    ("budget", 0),
    ("budget", -5),
    ("budget", 10**12 + 1),
    ("budget", 10.0),
    ("budget", "1000"),
    ("budget", True),
    ("reward", None),
    ("reward", 0),
    ("reward", 1001),  # above the budget
    ("reward", "100"),
    ("reward", False),
    ("metric", None),
    ("metric", "likes"),
    ("metric", ""),
    ("metric", 1),
    ("threshold", None),
    ("threshold", 0),
    ("threshold", 10**9 + 1),
    ("threshold", 2.5),
    ("ends", None),
    ("ends", 0),
    ("ends", -1),
    ("ends", "soon"),
    ("ends", 2**60),
    ("ends", "past"),  # replaced below: a time already gone
    ("ends", "far"),  # replaced below: more than a year ahead
    ("creators", "alice"),
    ("creators", []),
    ("creators", ["ok", "not ok"]),
    ("creators", [5]),
    ("creators", {"alice": 1}),
    ("creators", ["u"] * 1001),
    ("key", None),
    ("key", ""),
    ("key", "k" * 65),
    ("key", "tab\there"),
    ("key", 12),
]


@pytest.mark.parametrize(("field", "value"), HOSTILE)
async def test_create_hostile_input_is_bad_request(hub, connect, field, value):
    b = await brand(hub, connect)
    if value == "past":
        value = now_ms() - 1000
    elif value == "far":
        value = now_ms() + 400 * 24 * HOUR
    args = spec()
    if value is None:
        del args[field]
    else:
        args[field] = value
    before = await balances(hub)
    with pytest.raises(errors.BadRequest):
        await b.request("campaign_create", **args)
    assert await balances(hub) == before
    assert (await b.request("campaigns"))["campaigns"] == []


# -- campaign_join and campaigns ---------------------------------------------


async def test_join_twice_and_listing(hub, connect):
    b = await brand(hub, connect)
    await create(b)
    await create(b, campaign="vip", creators=["carol"])
    alice = await connect(hub, "alice")
    carol = await connect(hub, "carol")
    seen = (await alice.request("campaigns"))["campaigns"]
    assert [c["id"] for c in seen] == ["summer"] and set(seen[0]) == OBJECT_KEYS
    assert sorted(c["id"] for c in (await carol.request("campaigns"))["campaigns"]) == [
        "summer",
        "vip",
    ]
    joined = (await alice.request("campaign_join", campaign="summer"))["campaign"]
    assert joined["joined"] and joined["progress"] == 0 and not joined["rewarded"]
    again = (await alice.request("campaign_join", campaign="summer"))["campaign"]
    assert again == joined
    listed = (await alice.request("campaigns"))["campaigns"]
    assert listed == [joined]
    # The brand sees its own, newest first, with nothing joined for itself.
    own = (await b.request("campaigns"))["campaigns"]
    assert [c["id"] for c in own] == ["vip", "summer"] and not own[1]["joined"]


async def test_join_errors_in_order(start_hub, connect):
    hub = await start_hub(campaign_sweep=3600)  # no sweep during the test
    b = await brand(hub, connect)
    alice = await connect(hub, "alice")
    with pytest.raises(errors.BadRequest):
        await alice.request("campaign_join", campaign="no such id")
    with pytest.raises(errors.UnknownItem):
        await alice.request("campaign_join", campaign="nope")
    await create(b, campaign="vip", creators=["carol"])
    with pytest.raises(errors.Forbidden):
        await alice.request("campaign_join", campaign="vip")
    await create(b, campaign="shut", creators=["carol"])
    await b.request("campaign_close", campaign="shut")
    with pytest.raises(errors.Closed):  # checked before forbidden
        await alice.request("campaign_join", campaign="shut")
    # Ended, though the sweeper has not run: shown closed, joining is closed.
    ends = now_ms() + 300
    await create(b, campaign="brief", ends=ends)
    await until(ends)
    shown = await view(hub, "brief", "alice")
    assert shown["status"] == "closed" and shown["escrow"] == 1000
    with pytest.raises(errors.Closed):
        await alice.request("campaign_join", campaign="brief")
    assert not any(c["id"] == "brief" for c in (await alice.request("campaigns"))["campaigns"])


async def test_eleventh_open_campaign_is_forbidden(hub, connect):
    b = await brand(hub, connect, coins=100_000)
    alice = await connect(hub, "alice")
    for i in range(11):
        await create(b, campaign=f"c{i}")
    for i in range(10):
        await alice.request("campaign_join", campaign=f"c{i}")
    with pytest.raises(errors.Forbidden):
        await alice.request("campaign_join", campaign="c10")
    # Joining one already joined is fine; only open campaigns count.
    await alice.request("campaign_join", campaign="c3")
    await b.request("campaign_close", campaign="c0")
    res = await alice.request("campaign_join", campaign="c10")
    assert res["campaign"]["joined"]


# -- rewards -----------------------------------------------------------------


async def test_gifts_metric_pays_once_with_events_to_creator_brand_and_room(hub, connect):
    b = await brand(hub, connect, name="Acme Inc")
    creator, (bob, carol) = await live(hub, connect, viewers=("bob", "carol"))
    await create(b, threshold=5, reward=100, budget=1000)
    await creator.request("campaign_join", campaign="summer")
    await bob.request("gift", room="alice", gift="rose", count=3, key="g1")
    shown = await view(hub, "summer", "alice")
    assert shown["progress"] == 3 and not shown["rewarded"]
    async with asyncio.timeout(T):
        first = await carol.next_event("bubble")
        assert (await bob.next_event("bubble")) == first
        await creator.next_event("balance")
    await carol.request("gift", room="alice", gift="rose", count=2, key="g2")
    async with asyncio.timeout(T):
        bubble = await bob.next_event("bubble")
        room_reward = await bob.next_event("reward")
        brand_reward = await b.next_event("reward")
        creator_rewards = [await creator.next_event("reward") for _ in range(2)]
        creator_balance = await creator.next_event("balance")
    assert first["seq"] == 1 and bubble["seq"] == 2
    expected = {
        "ev": "reward",
        "campaign": "summer",
        "title": "Summer of gifts",
        "brand": {"user": "acme", "name": "Acme Inc"},
        "creator": {"user": "alice", "name": "Alice"},
        "coins": 100,
    }
    assert brand_reward == expected
    assert room_reward == {
        **expected,
        "room": "alice",
        "session": bubble["session"],
        "seq": 3,
        "time": room_reward["time"],
    }
    assert room_reward["time"] >= bubble["time"]
    # The creator: once on the user channel, once in the room.
    assert sorted(creator_rewards, key=len) == [expected, room_reward]
    # 1 + 1 coins earned (half of 3 and of 2 roses, rounded down), then the reward.
    assert creator_balance == {"ev": "balance", "coins": 1 + 1 + 100}
    bals = await balances(hub)
    assert bals["alice"] == 102 and bals["~escrow:summer"] == 900
    entries = (await creator.request("history"))["entries"]
    assert {"kind": "reward", "coins": 100, "campaign": "summer", "room": "alice"}.items() <= (
        entries[0].items()
    )
    (paid,) = await journal(hub, "reward")
    assert paid["post"] == "~escrow:summer=-100;alice=100" and paid["creator"] == "alice"
    shown = await view(hub, "summer", "alice")
    assert shown["progress"] == 5 and shown["rewarded"] and shown["escrow"] == 900
    # More gifts, then a new session reaching the threshold again: no second reward.
    await bob.request("gift", room="alice", gift="rose", count=10, key="g3")
    await creator.request("end_live")
    await creator.request("go_live")
    await bob.request("gift", room="alice", gift="rose", count=20, key="g4")
    assert len(await journal(hub, "reward")) == 1
    assert (await balances(hub))["~escrow:summer"] == 900
    assert not b.drain("reward")


@pytest.mark.parametrize(
    ("metric", "threshold", "gifts"),
    [
        ("gifts", 4, [("bob", "rose", 2), ("bob", "rose", 2)]),
        ("gift_coins", 20, [("bob", "star", 1), ("carol", "star", 1)]),
        ("gifters", 2, [("bob", "rose", 1), ("carol", "rose", 1)]),
    ],
)
async def test_each_metric_pays_once_per_campaign(hub, connect, metric, threshold, gifts):
    b = await brand(hub, connect)
    creator, viewers = await live(hub, connect, viewers=("bob", "carol"))
    by = dict(zip(("bob", "carol"), viewers, strict=True))
    await create(b, metric=metric, threshold=threshold, budget=300, reward=100)
    await creator.request("campaign_join", campaign="summer")
    for session in range(2):
        for i, (who, gift, count) in enumerate(gifts):
            assert not (await view(hub, "summer", "alice"))["rewarded"] or session
            await by[who].request("gift", room="alice", gift=gift, count=count, key=f"{session}{i}")
        # The last gift reached the threshold: paid in the first session only.
        assert len(await journal(hub, "reward")) == 1
        shown = await view(hub, "summer", "alice")
        assert shown["rewarded"] and shown["status"] == "open" and shown["escrow"] == 200
        await creator.request("end_live")
        await creator.request("go_live")
    async with asyncio.timeout(T):
        assert (await b.next_event("reward"))["coins"] == 100
    assert not b.drain("reward")


async def test_create_is_a_money_move_under_the_rate_limit(start_hub, connect):
    hub = await start_hub(gift_rate=0.001, gift_burst=1)
    b = await brand(hub, connect)
    await create(b)
    before = await balances(hub)
    with pytest.raises(errors.RateLimited):
        await b.request("campaign_create", **spec(campaign="second"))
    assert await balances(hub) == before


async def test_gift_coins_metric_counts_what_senders_paid(hub, connect):
    b = await brand(hub, connect)
    creator, (bob,) = await live(hub, connect)
    await create(b, metric="gift_coins", threshold=100, reward=40, budget=40)
    await creator.request("campaign_join", campaign="summer")
    await bob.request("gift", room="alice", gift="star", count=9, key="g1")  # 90 coins
    assert (await view(hub, "summer", "alice"))["progress"] == 90
    await bob.request("gift", room="alice", gift="star", count=1, key="g2")  # 100
    async with asyncio.timeout(T):
        assert (await b.next_event("reward"))["coins"] == 40
    shown = await view(hub, "summer", "alice")
    # The only reward the budget held: exhausted, escrow empty.
    assert shown["rewarded"] and shown["status"] == "exhausted" and shown["escrow"] == 0


async def test_gifters_metric_counts_distinct_senders(hub, connect):
    b = await brand(hub, connect)
    creator, (bob, carol, dan) = await live(hub, connect, viewers=("bob", "carol", "dan"))
    await create(b, metric="gifters", threshold=3)
    await creator.request("campaign_join", campaign="summer")
    for i in range(3):
        await bob.request("gift", room="alice", gift="rose", key=f"b{i}")
    assert (await view(hub, "summer", "alice"))["progress"] == 1
    await carol.request("gift", room="alice", gift="rose", key="c")
    await bob.request("gift", room="alice", gift="rose", key="b9")
    assert (await view(hub, "summer", "alice"))["progress"] == 2
    assert not await journal(hub, "reward")
    await dan.request("gift", room="alice", gift="rose", key="d")
    async with asyncio.timeout(T):
        assert (await b.next_event("reward"))["creator"]["user"] == "alice"
    # SCAN, not KEYS: on a cluster KEYS asks one node, SCAN every master.
    match = hub.ledger.key("camp", "summer", "fans", "alice", "*")
    fans = [k async for k in hub.ledger.r.scan_iter(match=match)]
    assert fans and all([await hub.ledger.r.pttl(k) > 0 for k in fans])


async def test_progress_counts_from_the_join_within_a_session(hub, connect):
    b = await brand(hub, connect)
    creator, (bob,) = await live(hub, connect)
    await create(b, threshold=5)
    await bob.request("gift", room="alice", gift="rose", count=4, key="before")
    joined = (await creator.request("campaign_join", campaign="summer"))["campaign"]
    assert joined["progress"] == 0
    await bob.request("gift", room="alice", gift="rose", count=3, key="g1")
    assert (await view(hub, "summer", "alice"))["progress"] == 3
    # A new session starts from zero; the last session's value shows until a gift.
    await creator.request("end_live")
    assert (await view(hub, "summer", "alice"))["progress"] == 3
    await creator.request("go_live")
    assert (await view(hub, "summer", "alice"))["progress"] == 0
    await bob.request("gift", room="alice", gift="rose", count=4, key="g2")
    assert (await view(hub, "summer", "alice"))["progress"] == 4
    assert not await journal(hub, "reward")
    await bob.request("gift", room="alice", gift="rose", count=1, key="g3")
    assert len(await journal(hub, "reward")) == 1


async def test_twenty_creators_race_for_five_rewards(hub, connect):
    b = await brand(hub, connect)
    await create(b, budget=500, reward=100, threshold=3)
    rooms = []
    for i in range(20):
        creator, viewers = await live(
            hub, connect, creator=f"cr{i}", viewers=(f"fa{i}", f"fb{i}"), coins=100
        )
        await creator.request("campaign_join", campaign="summer")
        rooms.append((f"cr{i}", viewers))
    # Every creator's gifters at once; each creator crosses the threshold.
    await asyncio.gather(
        *(
            v.request("gift", room=room, gift="rose", count=2, key="k")
            for room, viewers in rooms
            for v in viewers
        )
    )
    paid = await journal(hub, "reward")
    assert len(paid) == 5 and len({p["creator"] for p in paid}) == 5
    bals = await balances(hub)
    assert bals["~escrow:summer"] == 0
    assert sorted(bals[f"cr{i}"] for i in range(20)) == [2] * 15 + [102] * 5
    shown = (await b.request("campaigns"))["campaigns"][0]
    assert shown["status"] == "exhausted" and shown["escrow"] == 0
    async with asyncio.timeout(T):
        rewards = [await b.next_event("reward") for _ in range(5)]
    assert {r["creator"]["user"] for r in rewards} == {p["creator"] for p in paid}
    latecomer = await connect(hub, "late")
    with pytest.raises(errors.Closed):
        await latecomer.request("campaign_join", campaign="summer")
    # Closing an exhausted campaign with an empty escrow returns nothing.
    res = await b.request("campaign_close", campaign="summer")
    assert res["refunded"] == 0 and res["campaign"]["status"] == "closed"
    assert not [e for e in await journal(hub, "escrow") if e["step"] == "return"]


# -- campaign_close and expiry -----------------------------------------------


async def test_close_returns_the_rest_once(hub, connect):
    b = await brand(hub, connect)
    b2 = await brand(hub, connect, coins=0)
    creator, (bob,) = await live(hub, connect)
    await create(b, budget=250, reward=100, threshold=1)
    await creator.request("campaign_join", campaign="summer")
    await bob.request("gift", room="alice", gift="rose", key="g1")
    stranger = await connect(hub, "alice")
    with pytest.raises(errors.BadRequest):
        await b.request("campaign_close", campaign="")
    with pytest.raises(errors.UnknownItem):
        await b.request("campaign_close", campaign="nope")
    with pytest.raises(errors.Forbidden):
        await stranger.request("campaign_close", campaign="summer")
    async with asyncio.timeout(T):
        await b2.next_event("balance")  # the budget held
    res = await b.request("campaign_close", campaign="summer")
    assert res["refunded"] == 150
    assert res["campaign"]["status"] == "closed" and res["campaign"]["escrow"] == 0
    async with asyncio.timeout(T):
        assert await b2.next_event("balance") == {"ev": "balance", "coins": 10_000 - 100}
    with pytest.raises(errors.Closed):
        await b.request("campaign_close", campaign="summer")
    h = (await b.request("history"))["entries"][0]
    assert h["kind"] == "escrow" and h["coins"] == 150 and h["campaign"] == "summer"
    # A joined creator's gifts after the close pay nothing.
    await creator.request("end_live")
    await creator.request("go_live")
    await bob.request("gift", room="alice", gift="rose", key="g2")
    bals = await balances(hub)
    assert bals["acme"] == 9900 and bals["~escrow:summer"] == 0 and bals["alice"] == 100
    returns = [e for e in await journal(hub, "escrow") if e["step"] == "return"]
    assert len(returns) == 1 and returns[0]["post"] == "~escrow:summer=-150;acme=150"
    # The creator still finds it among those they joined, closed, rewarded.
    (mine,) = (await creator.request("campaigns"))["campaigns"]
    assert mine["status"] == "closed" and mine["joined"] and mine["rewarded"]


async def test_expiry_with_two_hubs_returns_the_rest_exactly_once(start_hub, connect):
    one = await start_hub(campaign_sweep=0.05)
    two = await start_hub(prefix=one.config.prefix, campaign_sweep=0.05)
    b = await brand(one, connect)
    watcher = await brand(two, connect, coins=0)  # the brand, on the other hub
    creator, (bob,) = await live(two, connect)
    ends = now_ms() + 1000
    await create(b, budget=700, reward=100, threshold=1, ends=ends)
    await creator.request("campaign_join", campaign="summer")
    await bob.request("gift", room="alice", gift="rose", key="g")
    async with asyncio.timeout(T):
        assert await watcher.next_event("balance") == {"ev": "balance", "coins": 9300}
        assert await watcher.next_event("balance") == {"ev": "balance", "coins": 9900}
    # Both hubs sweep on: nothing more moves.
    await next_sweeps(one)
    await next_sweeps(two)
    returns = [e for e in await journal(one, "escrow") if e["step"] == "return"]
    assert len(returns) == 1 and returns[0]["post"] == "~escrow:summer=-600;acme=600"
    bals = await balances(one)
    assert bals["acme"] == 9900 and bals["~escrow:summer"] == 0 and bals["alice"] == 100
    shown = (await b.request("campaigns"))["campaigns"][0]
    assert shown["status"] == "closed" and shown["escrow"] == 0
    with pytest.raises(errors.Closed):
        await b.request("campaign_close", campaign="summer")
    assert not watcher.drain("balance")


@pytest.fixture
def own_store() -> Iterator[EmbeddedStore]:
    """A store this test stops; a short directory keeps it on a unix socket,
    whose URL survives the restart."""
    with tempfile.TemporaryDirectory(prefix="gc") as d:
        s = EmbeddedStore(Path(d))
        s.start()
        yield s
        s.stop()


async def test_sweeper_survives_the_store_going_down(own_store, start_hub):
    hub = await start_hub(url=own_store.url, campaign_sweep=0.05, store_timeout=1.0)
    await next_sweeps(hub, 1)
    failed = hub.metrics.store_errors["campaign_sweep"]
    try:
        await asyncio.to_thread(own_store.stop)
        await next_sweeps(hub, 3)
        assert hub.metrics.store_errors["campaign_sweep"] >= failed + 2
    finally:
        if own_store.proc is None:
            await asyncio.to_thread(own_store.start)
    # Still sweeping: a campaign that ends now is closed and its budget returned.
    led = hub.ledger
    await led.topup("acme", 500, "t")
    await led.campaigns.create(
        brand="acme",
        brand_name="Acme",
        key="k",
        campaign="quick",
        title="Quick",
        budget=500,
        reward=5,
        metric="gifts",
        threshold=1,
        ends=now_ms() + 200,
        creators=None,
    )
    async with asyncio.timeout(T):
        while (await view(hub, "quick", "acme"))["escrow"]:
            await next_sweeps(hub, 1)
    assert (await balances(hub))["acme"] == 500


# -- audit -------------------------------------------------------------------


async def test_audit_catches_a_tampered_escrow(hub, connect, redis_client):
    b = await brand(hub, connect)
    creator, (bob,) = await live(hub, connect)
    await create(b, threshold=1)
    await creator.request("campaign_join", campaign="summer")
    await bob.request("gift", room="alice", gift="rose", key="g")
    assert (await hub.ledger.audit()).ok
    bal = hub.ledger.bal
    # Coins moved from the platform into the escrow: the sum stays 0.
    await redis_client.hincrby(bal, "~escrow:summer", 7)
    await redis_client.hincrby(bal, "~platform", -7)
    try:
        report = await hub.ledger.audit()
        assert not report.ok
        assert any(
            d.startswith("campaign summer: escrow 907") and "= 900" in d for d in report.differences
        ), report.differences
    finally:
        await redis_client.hincrby(bal, "~escrow:summer", -7)
        await redis_client.hincrby(bal, "~platform", 7)
    # A closed campaign must hold nothing.
    await b.request("campaign_close", campaign="summer")
    await redis_client.hincrby(bal, "~escrow:summer", 3)
    await redis_client.hincrby(bal, "~platform", -3)
    try:
        report = await hub.ledger.audit()
        assert "campaign summer: closed with 3 left in escrow" in report.differences
    finally:
        await redis_client.hincrby(bal, "~escrow:summer", -3)
        await redis_client.hincrby(bal, "~platform", 3)
    assert (await hub.ledger.audit()).ok


async def test_a_listed_campaign_with_nothing_behind_it_leaves_the_sweep_queue(hub):
    key = hub.ledger.key("camps", "open")
    await hub.ledger.r.zadd(key, {"ghost": 1})  # ended long ago, no campaign hash
    await hub.campaigns.sweep()
    assert await hub.ledger.r.zscore(key, "ghost") is None
