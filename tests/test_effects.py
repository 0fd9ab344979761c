"""Effects: paid animations in a live room, through the real hub and a real Valkey.

Checks in the contract's order: bad_request, unknown_item, not_in_room, not_live,
rate_limited, conflict/duplicate, insufficient_funds (then the daily spend cap).
Every refused call is shown to move no coin.
"""

import asyncio

import pytest

from protocol import errors
from tests.conftest import T, balances, token, topup

SLOW = 0.001  # rate-limit refill per second: nothing comes back during a test


async def live_room(hub, connect, creator="alice", viewers=("bob",), coins=1000):
    c = await connect(hub, creator)
    await c.request("go_live", title="show")
    vs = []
    for v in viewers:
        cl = await connect(hub, v)
        if coins:
            await topup(hub, v, coins)
        await cl.request("join", room=creator)
        vs.append(cl)
    return c, vs


async def as_user(hub, connect, user, **claims):
    """A connection authenticated with a token carrying extra claims (avatar, minor)."""
    c = await connect(hub)
    await c.request("auth", token=token(user, **claims))
    return c


async def refused(client, exc, **args):
    """Send ``effect`` and expect ``exc``; the caller checks no coin moved."""
    with pytest.raises(exc):
        await client.request("effect", **args)


# -- the catalog and the happy path ----------------------------------------------


async def test_effects_lists_the_catalog(hub, connect):
    c = await connect(hub, "alice")
    effects = (await c.request("effects"))["effects"]
    assert effects == [{"id": e.id, "name": e.name, "coins": e.coins} for e in hub.config.effects]
    assert {"id": "confetti", "name": "Confetti", "coins": 20} in effects


async def test_effect_pays_the_platform_and_plays_for_the_whole_room(hub, connect):
    creator, (bob, carol) = await live_room(hub, connect, viewers=("bob", "carol"))
    bob2 = await connect(hub, "bob")  # another connection of the payer, not in the room
    res = await bob.request("effect", room="alice", effect="confetti", key="e1")
    assert res == {"transfer": res["transfer"], "coins": 980, "duplicate": False}
    async with asyncio.timeout(T):
        evs = [await c.next_event("effect") for c in (bob, carol, creator)]
        bal = await bob2.next_event("balance")
    assert evs[0] == evs[1] == evs[2]
    ev = evs[0]
    assert ev == {
        "ev": "effect",
        "room": "alice",
        "session": ev["session"],
        "seq": 1,
        "from": {"user": "bob", "name": "Bob", "avatar": None},
        "effect": "confetti",
        "time": ev["time"],
    }
    assert isinstance(ev["session"], int) and ev["time"] > 1_700_000_000_000
    assert bal == {"ev": "balance", "coins": 980}
    # The paying connection has its balance in the answer, so no event there
    # (a ping answered after bob2's event shows nothing else was on its way).
    await bob.request("ping")
    assert {"ev": "balance", "coins": 980} not in bob.drain("balance")
    bals = await balances(hub)
    assert bals["bob"] == 980 and bals["~platform"] == 20 and "alice" not in bals
    h, topped = (await bob.request("history"))["entries"]
    assert topped["kind"] == "topup"
    assert h == {
        "kind": "effect",
        "coins": -20,
        "transfer": res["transfer"],
        "time": h["time"],
        "room": "alice",
        "effect": "confetti",
    }
    report = await hub.ledger.audit()
    assert report.ok and report.entries == 3  # two top-ups and the effect


async def test_the_creator_may_play_an_effect_in_their_own_room(hub, connect):
    creator, (bob,) = await live_room(hub, connect)
    await topup(hub, "alice", 200)
    res = await creator.request("effect", room="alice", effect="fireworks", key="own")
    assert res["coins"] == 0 and not res["duplicate"]
    async with asyncio.timeout(T):
        ev = await bob.next_event("effect")
    assert ev["from"]["user"] == "alice" and ev["effect"] == "fireworks"


async def test_effect_carries_the_avatar(hub, connect):
    await live_room(hub, connect, viewers=())
    dana = await as_user(hub, connect, "dana", avatar="https://img.example/d.png")
    await topup(hub, "dana", 100)
    await dana.request("join", room="alice")
    await dana.request("effect", room="alice", effect="confetti", key="a")
    async with asyncio.timeout(T):
        ev = await dana.next_event("effect")
    assert ev["from"] == {"user": "dana", "name": "Dana", "avatar": "https://img.example/d.png"}


async def test_effects_and_bubbles_share_the_rooms_seq(hub, connect):
    creator, (bob, carol) = await live_room(hub, connect, viewers=("bob", "carol"))
    for i in range(3):
        await bob.request("gift", room="alice", gift="rose", key=f"g{i}")
        await carol.request("effect", room="alice", effect="confetti", key=f"e{i}")
    seen = []
    async with asyncio.timeout(T):
        while len(seen) < 6:
            ev = await creator.next_event()
            if ev["ev"] in ("bubble", "effect"):
                seen.append((ev["ev"], ev["seq"]))
    assert seen == [
        ("bubble", 1),
        ("effect", 2),
        ("bubble", 3),
        ("effect", 4),
        ("bubble", 5),
        ("effect", 6),
    ]


# -- idempotency -------------------------------------------------------------------


async def test_same_key_on_another_connection_is_one_move(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    first = await bob.request("effect", room="alice", effect="confetti", key="same")
    bob2 = await connect(hub, "bob")
    await bob2.request("join", room="alice")
    again = await bob2.request("effect", room="alice", effect="confetti", key="same")
    assert again == {**first, "duplicate": True}
    assert (await balances(hub))["bob"] == 980
    assert [h["kind"] for h in (await bob.request("history"))["entries"]] == ["effect", "topup"]


async def test_copies_of_one_key_at_once_are_one_move(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    conns = [bob]
    for _ in range(3):
        c = await connect(hub, "bob")
        await c.request("join", room="alice")
        conns.append(c)
    results = await asyncio.gather(
        *(c.request("effect", room="alice", effect="confetti", key="once") for c in conns * 3)
    )
    assert len({r["transfer"] for r in results}) == 1
    assert sum(not r["duplicate"] for r in results) == 1
    assert (await balances(hub))["bob"] == 980


async def test_key_reused_for_another_body_or_a_gift_is_conflict(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    await bob.request("effect", room="alice", effect="confetti", key="k")
    await bob.request("gift", room="alice", gift="rose", key="g")
    before = await balances(hub)
    await refused(bob, errors.Conflict, room="alice", effect="crown", key="k")
    await refused(bob, errors.Conflict, room="alice", effect="confetti", key="g")
    with pytest.raises(errors.Conflict):
        await bob.request("gift", room="alice", gift="rose", key="k")
    assert await balances(hub) == before


async def test_only_moves_that_happened_are_remembered(hub, connect):
    _, (bob,) = await live_room(hub, connect, coins=10)
    await refused(bob, errors.InsufficientFunds, room="alice", effect="confetti", key="later")
    await topup(hub, "bob", 10)
    res = await bob.request("effect", room="alice", effect="confetti", key="later")
    assert not res["duplicate"] and res["coins"] == 0


# -- checks, one test per step of the contract's order ---------------------------


async def test_bad_request_before_unknown_item(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    before = await balances(hub)
    # An unknown effect, but the key is missing / the room malformed: bad_request wins.
    await refused(bob, errors.BadRequest, room="alice", effect="nope")
    await refused(bob, errors.BadRequest, room="al ice", effect="nope", key="k")
    await refused(bob, errors.UnknownItem, room="alice", effect="nope", key="k")
    assert await balances(hub) == before


async def test_unknown_item_before_not_in_room(hub, connect):
    await live_room(hub, connect, viewers=())
    erin = await connect(hub, "erin")
    await topup(hub, "erin", 100)
    await refused(erin, errors.UnknownItem, room="alice", effect="nope", key="k")
    await refused(erin, errors.NotInRoom, room="alice", effect="confetti", key="k")
    assert (await balances(hub))["erin"] == 100


async def test_not_in_room_before_not_live(hub, connect):
    erin = await connect(hub, "erin")  # "alice" is not live, and erin has not joined
    await topup(hub, "erin", 100)
    await refused(erin, errors.NotInRoom, room="alice", effect="confetti", key="k")
    await erin.request("join", room="alice")
    await refused(erin, errors.NotLive, room="alice", effect="confetti", key="k")
    assert (await balances(hub))["erin"] == 100


async def test_not_live_before_rate_limited(start_hub, connect):
    hub = await start_hub(gift_rate=SLOW, gift_burst=1)
    creator = await connect(hub, "alice")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 100)
    await bob.request("join", room="alice")
    await refused(bob, errors.NotLive, room="alice", effect="confetti", key="1")  # token used
    await refused(bob, errors.NotLive, room="alice", effect="confetti", key="2")  # limited
    await creator.request("go_live")
    await refused(bob, errors.RateLimited, room="alice", effect="confetti", key="3")
    assert (await balances(hub))["bob"] == 100


async def test_rate_limited_before_conflict_and_duplicate(start_hub, connect):
    hub = await start_hub(gift_rate=SLOW, gift_burst=1)
    _, (bob,) = await live_room(hub, connect)
    await bob.request("effect", room="alice", effect="confetti", key="k")
    before = await balances(hub)
    await refused(bob, errors.RateLimited, room="alice", effect="confetti", key="k")
    await refused(bob, errors.RateLimited, room="alice", effect="crown", key="k")
    assert await balances(hub) == before


async def test_conflict_and_duplicate_before_insufficient_funds(hub, connect):
    _, (bob,) = await live_room(hub, connect, coins=20)
    first = await bob.request("effect", room="alice", effect="confetti", key="k")
    assert first["coins"] == 0  # broke from now on
    again = await bob.request("effect", room="alice", effect="confetti", key="k")
    assert again == {**first, "duplicate": True}
    await refused(bob, errors.Conflict, room="alice", effect="crown", key="k")
    await refused(bob, errors.InsufficientFunds, room="alice", effect="crown", key="k2")
    assert (await balances(hub))["bob"] == 0


async def test_insufficient_funds_before_the_spend_cap(start_hub, connect):
    hub = await start_hub(minor_daily_spend_cap=30)
    await live_room(hub, connect, viewers=())
    kid = await as_user(hub, connect, "kid", minor=True)
    await topup(hub, "kid", 10)
    await kid.request("join", room="alice")
    # crown (1000) is over both the balance and the cap: insufficient_funds wins.
    await refused(kid, errors.InsufficientFunds, room="alice", effect="crown", key="k")
    await topup(hub, "kid", 2000)
    await refused(kid, errors.SpendLimit, room="alice", effect="crown", key="k")
    assert (await balances(hub))["kid"] == 2010


async def test_the_spend_cap_counts_gifts_and_effects_together(start_hub, connect):
    hub = await start_hub(minor_daily_spend_cap=100)
    await live_room(hub, connect, viewers=())
    kid = await as_user(hub, connect, "kid", minor=True)
    await topup(hub, "kid", 1000)
    await kid.request("join", room="alice")
    await kid.request("gift", room="alice", gift="cake", key="g1")  # 50
    await kid.request("effect", room="alice", effect="confetti", key="e1")  # 70
    before = await balances(hub)
    await refused(kid, errors.SpendLimit, room="alice", effect="fireworks", key="e2")  # 270
    with pytest.raises(errors.SpendLimit):
        await kid.request("gift", room="alice", gift="cake", key="g2")  # 120
    assert await balances(hub) == before
    await kid.request("effect", room="alice", effect="confetti", key="e3")  # 90 is fine


async def test_not_live_after_end_live(hub, connect):
    creator, (bob,) = await live_room(hub, connect)
    await creator.request("end_live")
    await refused(bob, errors.NotLive, room="alice", effect="confetti", key="k")
    assert (await balances(hub))["bob"] == 1000


# -- hostile input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        {"room": 5, "effect": "confetti", "key": "k"},
        {"room": None, "effect": "confetti", "key": "k"},
        {"room": "a" * 65, "effect": "confetti", "key": "k"},
        {"room": "alice", "effect": 1, "key": "k"},
        {"room": "alice", "effect": ["confetti"], "key": "k"},
        {"room": "alice", "effect": {"id": "confetti"}, "key": "k"},
        {"room": "alice", "effect": "", "key": "k"},
        {"room": "alice", "effect": "x" * 65, "key": "k"},
        {"room": "alice", "effect": "confetti"},
        {"room": "alice", "effect": "confetti", "key": ""},
        {"room": "alice", "effect": "confetti", "key": "k" * 65},
        {"room": "alice", "effect": "confetti", "key": 7},
        {"room": "alice", "effect": "confetti", "key": "tab\there"},
    ],
)
async def test_malformed_effect_is_bad_request(hub, connect, args):
    _, (bob,) = await live_room(hub, connect)
    before = await balances(hub)
    await refused(bob, errors.BadRequest, **args)
    assert await balances(hub) == before
    assert [h["kind"] for h in (await bob.request("history"))["entries"]] == ["topup"]


async def test_unknown_effect_moves_nothing(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    for effect in ("nope", "CONFETTI", "rose"):  # a gift id is not an effect id
        await refused(bob, errors.UnknownItem, room="alice", effect=effect, key="k")
    assert (await balances(hub))["bob"] == 1000


async def test_effect_over_json(hub, connect):
    _, _ = await live_room(hub, connect, viewers=())
    bob = await connect(hub, "bob", json=True)
    await topup(hub, "bob", 50)
    await bob.request("join", room="alice")
    res = await bob.request("effect", room="alice", effect="confetti", key="j")
    assert res["coins"] == 30
    async with asyncio.timeout(T):
        ev = await bob.next_event("effect")
    assert ev["from"]["avatar"] is None
