"""The gift path through the real hub, a real socket and a real Valkey."""

import asyncio

import pytest

from protocol import errors
from tests.conftest import T, balances, topup


async def live_room(hub, connect, creator="alice", viewers=("bob",), coins=1000):
    c = await connect(hub, creator)
    await c.request("go_live", title="show")
    vs = []
    for v in viewers:
        cl = await connect(hub, v)
        await topup(hub, v, coins)
        await cl.request("join", room=creator)
        vs.append(cl)
    return c, vs


async def test_auth_result_and_balance(hub, connect):
    await topup(hub, "alice", 42)
    c = await connect(hub, "alice", name="Alice A")
    res = await c.request("auth", token=c.token)
    assert res == {"user": "alice", "name": "Alice A", "coins": 42}
    assert await c.request("balance") == {"coins": 42}


async def test_catalog(hub, connect):
    c = await connect(hub, "alice")
    gifts = (await c.request("catalog"))["gifts"]
    assert {"id": "rose", "name": "Rose", "coins": 1} in gifts
    assert all(set(g) == {"id", "name", "coins"} for g in gifts)


async def test_ping(hub, connect):
    c = await connect(hub, "alice")
    t = (await c.request("ping"))["time"]
    assert isinstance(t, int) and t > 1_700_000_000_000


async def test_gift_moves_coins_and_reaches_everyone(hub, connect):
    creator, (bob, carol) = await live_room(hub, connect, viewers=("bob", "carol"))
    creator2 = await connect(hub, "alice")  # a second creator connection, joined
    await creator2.request("join", room="alice")
    res = await bob.request("gift", room="alice", gift="star", count=3, key="k1")
    assert res == {"transfer": res["transfer"], "coins": 970, "combo": 1, "duplicate": False}
    async with asyncio.timeout(T):
        bubbles = [await cl.next_event("bubble") for cl in (bob, carol, creator, creator2)]
        gifts = [await cl.next_event("gift") for cl in (creator, creator2)]
        bal = await creator.next_event("balance")
    assert all(b == bubbles[0] for b in bubbles)
    b = bubbles[0]
    assert b["room"] == "alice" and b["gift"] == "star" and b["count"] == 3
    assert b["coins"] == 30 and b["combo"] == 1 and b["seq"] == 1
    assert b["from"] == {"user": "bob", "name": "Bob", "avatar": None}
    assert isinstance(b["session"], int) and isinstance(b["time"], int)
    g = gifts[0]
    assert gifts[0] == gifts[1]
    assert g["transfer"] == res["transfer"] and g["earned"] == 15 and g["total"] == 15
    assert g["coins"] == 30 and g["from"] == {"user": "bob", "name": "Bob"}
    assert isinstance(g["offset"], str)
    assert bal == {"ev": "balance", "coins": 15}
    # viewers never see the creator's gift event
    assert not bob.drain("gift") and not carol.drain("gift")
    bals = await balances(hub)
    assert bals["bob"] == 970 and bals["alice"] == 15 and bals["~platform"] == 15


async def test_creator_share_rounds_down(start_hub, connect):
    hub = await start_hub(creator_share_pct=33)
    creator, (bob,) = await live_room(hub, connect)
    await bob.request("gift", room="alice", gift="rose", count=2, key="k")
    async with asyncio.timeout(T):
        g = await creator.next_event("gift")
    assert g["earned"] == 0  # floor(2 * 0.33)
    await bob.request("gift", room="alice", gift="star", count=1, key="k2")
    async with asyncio.timeout(T):
        g = await creator.next_event("gift")
    assert g["earned"] == 3 and g["total"] == 3
    assert (await balances(hub))["~platform"] == 2 + 7


async def test_combo_counts_same_gift(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    combos = [
        (await bob.request("gift", room="alice", gift=g, key=f"k{i}"))["combo"]
        for i, g in enumerate(["rose", "rose", "rose", "heart", "heart", "rose"])
    ]
    assert combos == [1, 2, 3, 1, 2, 1]


async def test_seq_increases_in_order(hub, connect):
    _, (bob, carol) = await live_room(hub, connect, viewers=("bob", "carol"))
    for i in range(20):
        await bob.request("gift", room="alice", gift="rose", key=f"k{i}")
    async with asyncio.timeout(T):
        seqs = [(await carol.next_event("bubble"))["seq"] for _ in range(20)]
    assert seqs == list(range(1, 21))


async def test_top_and_presence_events(hub, connect):
    creator, (bob,) = await live_room(hub, connect)
    async with asyncio.timeout(T):
        while (await creator.next_event("presence"))["viewers"] != 1:
            pass
    carol = await connect(hub, "carol")
    j = await carol.request("join", room="alice")
    assert j["viewers"] == 2
    async with asyncio.timeout(T):
        while (await creator.next_event("presence"))["viewers"] != 2:
            pass
    await bob.request("gift", room="alice", gift="cake", key="k1")
    async with asyncio.timeout(T):
        top = await carol.next_event("top")
    assert top == {
        "ev": "top",
        "room": "alice",
        "top": [{"user": "bob", "name": "Bob", "coins": 50}],
    }
    j = await carol.request("join", room="alice")  # joining again is harmless
    assert j["top"] == top["top"] and j["viewers"] == 2
    await carol.request("leave", room="alice")
    async with asyncio.timeout(T):
        while (await creator.next_event("presence"))["viewers"] != 1:
            pass


async def test_join_result_and_live_events(hub, connect):
    bob = await connect(hub, "bob")
    j = await bob.request("join", room="alice")
    assert j == {
        "room": "alice",
        "role": "viewer",
        "live": False,
        "session": 0,
        "title": "",
        "viewers": 1,
        "top": [],
        "pinned": None,
    }
    creator = await connect(hub, "alice")
    live = await creator.request("go_live", title="first")
    async with asyncio.timeout(T):
        ev = await bob.next_event("live")
    assert ev == {
        "ev": "live",
        "room": "alice",
        "live": True,
        "session": live["session"],
        "title": "first",
    }
    end = await creator.request("end_live")
    assert end == {"room": "alice", "session": live["session"], "coins": 0}
    async with asyncio.timeout(T):
        ev = await bob.next_event("live")
    assert ev["live"] is False
    live2 = await creator.request("go_live")
    assert live2["session"] > live["session"]
    async with asyncio.timeout(T):
        assert (await bob.next_event("live"))["session"] == live2["session"]
    j = await creator.request("join", room="alice")
    assert j["role"] == "creator" and j["live"] is True


async def test_end_live_reports_session_earnings(hub, connect):
    creator, (bob,) = await live_room(hub, connect)
    await bob.request("gift", room="alice", gift="rocket", key="k")
    res = await creator.request("end_live")
    assert res["coins"] == 50
    with pytest.raises(errors.NotLive):
        await creator.request("end_live")
    with pytest.raises(errors.NotLive):
        await bob.request("gift", room="alice", gift="rose", key="k2")
    await creator.request("go_live")
    res = await bob.request("gift", room="alice", gift="rose", key="k2")
    assert res["duplicate"] is False


@pytest.mark.parametrize(
    "args, err",
    [
        ({"room": "alice", "gift": "rose", "count": 0}, errors.InvalidCount),
        ({"room": "alice", "gift": "rose", "count": 100}, errors.InvalidCount),
        ({"room": "alice", "gift": "rose", "count": -1}, errors.InvalidCount),
        ({"room": "alice", "gift": "rose", "count": 1.5}, errors.BadRequest),
        ({"room": "alice", "gift": "rose", "count": "2"}, errors.BadRequest),
        ({"room": "alice", "gift": "rose", "count": True}, errors.BadRequest),
        ({"room": "alice", "gift": "nope"}, errors.UnknownGift),
        ({"room": "alice", "gift": 5}, errors.BadRequest),
        ({"room": "alice"}, errors.BadRequest),
        ({"gift": "rose"}, errors.BadRequest),
        ({"room": "a b", "gift": "rose"}, errors.BadRequest),
        ({"room": "alice", "gift": "rose", "key": ""}, errors.BadRequest),
        ({"room": "alice", "gift": "rose", "key": "k" * 65}, errors.BadRequest),
        ({"room": "alice", "gift": "rose", "key": "ké"}, errors.BadRequest),
        ({"room": "alice", "gift": "rose", "key": 5}, errors.BadRequest),
        ({"room": "dave", "gift": "rose"}, errors.NotInRoom),
        ({"room": "bob", "gift": "rose"}, errors.SelfGift),
    ],
)
async def test_gift_errors_move_nothing(hub, connect, args, err):
    _, (bob,) = await live_room(hub, connect)
    before = await balances(hub)
    with pytest.raises(err):
        await bob.request("gift", **{"key": "k", **args})
    assert await balances(hub) == before
    assert (await bob.request("ping"))["time"]  # connection alive


async def test_check_order(hub, connect):
    """bad_request < invalid_count < unknown_gift < self_gift < not_in_room < not_live."""
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 10)
    with pytest.raises(errors.BadRequest):
        await bob.request("gift", room="bob", gift="nope", count=0, key="")
    with pytest.raises(errors.InvalidCount):
        await bob.request("gift", room="bob", gift="nope", count=0, key="k")
    with pytest.raises(errors.UnknownGift):
        await bob.request("gift", room="bob", gift="nope", key="k")
    with pytest.raises(errors.SelfGift):
        await bob.request("gift", room="bob", gift="rose", key="k")
    with pytest.raises(errors.NotInRoom):
        await bob.request("gift", room="alice", gift="rose", key="k")
    await bob.request("join", room="alice")
    with pytest.raises(errors.NotLive):
        await bob.request("gift", room="alice", gift="castle", key="k")
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    with pytest.raises(errors.InsufficientFunds) as exc:
        await bob.request("gift", room="alice", gift="castle", key="k")
    assert "500" in str(exc.value) and "10" in str(exc.value)
    # after an error the same key may be used again
    assert (await bob.request("gift", room="alice", gift="rose", key="k"))["coins"] == 9


async def test_creator_cannot_gift_in_own_room(hub, connect):
    creator, _ = await live_room(hub, connect, viewers=())
    await topup(hub, "alice", 10)
    with pytest.raises(errors.SelfGift):
        await creator.request("gift", room="alice", gift="rose", key="k")


async def test_gift_needs_a_key(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    before = await balances(hub)
    with pytest.raises(errors.BadRequest):
        await bob.request("gift", room="alice", gift="rose")
    with pytest.raises(errors.BadRequest):  # bad_request comes before invalid_count
        await bob.request("gift", room="alice", gift="rose", count=0)
    assert await balances(hub) == before


async def test_leave(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    assert await bob.request("leave", room="alice") == {"room": "alice"}
    with pytest.raises(errors.NotInRoom):
        await bob.request("leave", room="alice")
    with pytest.raises(errors.NotInRoom):
        await bob.request("gift", room="alice", gift="rose", key="k")
    with pytest.raises(errors.BadRequest):
        await bob.request("leave", room=None)


async def test_feed_and_resume(hub, connect):
    creator, (bob,) = await live_room(hub, connect)
    for i in range(7):
        await bob.request("gift", room="alice", gift="rose", key=f"k{i}")
    first = await creator.request("feed", room="alice", limit=3)
    assert [e["transfer"] for e in first["entries"]] == sorted(
        e["transfer"] for e in first["entries"]
    )
    assert first["next"] == first["entries"][-1]["offset"]
    seen = list(first["entries"])
    after = first["next"]
    while True:
        page = await creator.request("feed", room="alice", after=after, limit=3)
        seen += page["entries"]
        if not page["entries"]:
            assert page["next"] == after
            break
        after = page["next"]
    assert len(seen) == 7 and len({e["transfer"] for e in seen}) == 7
    # what a reconnecting creator gets: exactly the gifts after its last offset
    for i in range(7, 10):
        await bob.request("gift", room="alice", gift="rose", key=f"k{i}")
    rest = await creator.request("feed", room="alice", after=after)
    assert len(rest["entries"]) == 3
    async with asyncio.timeout(T):
        live_events = [await creator.next_event("gift") for _ in range(10)]
    assert [e["offset"] for e in live_events] == [e["offset"] for e in seen + rest["entries"]]
    entry = rest["entries"][0]
    assert set(entry) >= {"room", "offset", "transfer", "from", "gift", "count", "coins", "earned"}


async def test_feed_errors(hub, connect):
    creator, (bob,) = await live_room(hub, connect)
    with pytest.raises(errors.Forbidden):
        await bob.request("feed", room="alice")
    for bad in ({"after": "x"}, {"after": 5}, {"limit": 0}, {"limit": 501}, {"limit": "9"}):
        with pytest.raises(errors.BadRequest):
            await creator.request("feed", room="alice", **bad)
    with pytest.raises(errors.BadRequest):
        await creator.request("feed")


async def test_history(hub, connect):
    _, (bob,) = await live_room(hub, connect)
    for i in range(3):
        await bob.request("gift", room="alice", gift="heart", key=f"k{i}")
    h = (await bob.request("history"))["entries"]
    assert [e["kind"] for e in h] == ["gift", "gift", "gift", "topup"]
    assert h[0]["coins"] == -5 and h[-1]["coins"] == 1000
    assert h[0]["transfer"] > h[1]["transfer"]
    page = (await bob.request("history", before=h[1]["transfer"], limit=1))["entries"]
    assert page == [h[2]]
    creator_h = (await (await connect(hub, "alice")).request("history"))["entries"]
    assert [e["coins"] for e in creator_h] == [2, 2, 2]
    for bad in ({"before": "x"}, {"before": 0}, {"limit": 0}, {"limit": 501}):
        with pytest.raises(errors.BadRequest):
            await bob.request("history", **bad)


async def test_unauthenticated_until_auth(hub, connect):
    c = await connect(hub)
    for op in ("balance", "catalog", "join", "gift", "nope"):
        with pytest.raises(errors.Unauthenticated):
            await c.request(op, room="alice")
    with pytest.raises(errors.Unauthenticated):
        await c.request("auth", token="garbage")
    from tests.conftest import token

    res = await c.request("auth", token=token("zed"))
    assert res["user"] == "zed"
    with pytest.raises(errors.Forbidden):
        await c.request("auth", token=token("yan"))
    assert (await c.request("auth", token=token("zed")))["user"] == "zed"


async def test_unknown_op(hub, connect):
    c = await connect(hub, "alice")
    with pytest.raises(errors.UnknownOp):
        await c.request("transmogrify")
    assert await c.request("balance") == {"coins": 0}


async def test_json_encoding(hub, connect):
    creator = await connect(hub, "alice", json=True)
    await creator.request("go_live")
    bob = await connect(hub, "bob", json=True)
    await topup(hub, "bob", 10)
    await bob.request("join", room="alice")
    msgpack_viewer = await connect(hub, "carol")
    await msgpack_viewer.request("join", room="alice")
    await bob.request("gift", room="alice", gift="rose", key="k")
    async with asyncio.timeout(T):
        a = await bob.next_event("bubble")
        b = await msgpack_viewer.next_event("bubble")
    assert a == b


async def test_token_in_query(hub, connect):
    await topup(hub, "alice", 5)
    c = await connect(hub, "alice", token_in_query=True)
    assert await c.request("balance") == {"coins": 5}


async def test_bad_query_token_closes_4001(hub, connect):
    from protocol.client import Client
    from tests.conftest import ws_url

    c = await Client.connect(ws_url(hub), token="bad.token.here", token_in_query=True, timeout=T)
    try:
        assert await c.wait_closed(T) == 4001
        assert (await c.next_event("bye"))["code"] == 4001
    finally:
        await c.close()


async def test_auth_timeout_closes_4001(start_hub, connect):
    hub = await start_hub(auth_timeout=0.3)
    c = await connect(hub)
    assert await c.wait_closed(T) == 4001


async def test_auth_timeout_spares_authenticated_connections(start_hub, connect):
    from tests.conftest import token

    hub = await start_hub(auth_timeout=0.3)
    c = await connect(hub)
    await c.request("auth", token=token("alice"))
    q = await connect(hub, "bob", token_in_query=True)
    for conn in (c, q):  # well past the auth deadline, both still open
        with pytest.raises(TimeoutError):
            await conn.wait_closed(1.0)
        assert (await conn.request("ping"))["time"] > 0


async def test_admin_token_cannot_auth(hub, connect):
    from tests.conftest import token

    c = await connect(hub)
    with pytest.raises(errors.Unauthenticated):
        await c.request("auth", token=token("admin", admin=True))


async def test_two_hubs_share_rooms(start_hub, connect):
    h1 = await start_hub()
    h2 = await start_hub(prefix=h1.config.prefix)
    creator = await connect(h1, "alice")
    await creator.request("go_live")
    bob = await connect(h2, "bob")
    await topup(h1, "bob", 10)
    j = await bob.request("join", room="alice")
    assert j["live"] is True and j["viewers"] == 1
    carol = await connect(h1, "carol")
    assert (await carol.request("join", room="alice"))["viewers"] == 2
    await bob.request("gift", room="alice", gift="rose", key="k")
    async with asyncio.timeout(T):
        assert (await carol.next_event("bubble"))["from"]["user"] == "bob"
        assert (await creator.next_event("gift"))["from"]["user"] == "bob"
    # the same key on the other hub is a duplicate
    await carol.request("leave", room="alice")
    bob_on_h1 = await connect(h1, "bob")
    await bob_on_h1.request("join", room="alice")
    again = await bob_on_h1.request("gift", room="alice", gift="rose", key="k")
    assert again["duplicate"] is True and again["coins"] == 9


async def test_busy_room_gets_batches_in_order(start_hub, connect):
    hub = await start_hub(batch_window=0.05)
    creator, (bob, carol) = await live_room(hub, connect, viewers=("bob", "carol"))
    carol_json = await connect(hub, "dave", json=True)
    await carol_json.request("join", room="alice")
    await asyncio.gather(
        *(bob.request("gift", room="alice", gift="rose", key=f"b{i}") for i in range(60))
    )
    async with asyncio.timeout(T):
        for viewer in (carol, carol_json):
            seqs = [(await viewer.next_event("bubble"))["seq"] for _ in range(60)]
            assert seqs == list(range(1, 61))
        gifts = [await creator.next_event("gift") for _ in range(60)]
    assert len({g["transfer"] for g in gifts}) == 60
    assert carol.batches >= 1 and carol_json.batches >= 1
    assert carol.frames_in < 60 + 5  # fewer frames than events


async def test_batching_can_be_turned_off(start_hub, connect):
    hub = await start_hub(batch_window=0)
    _, (bob, carol) = await live_room(hub, connect, viewers=("bob", "carol"))
    await asyncio.gather(
        *(bob.request("gift", room="alice", gift="rose", key=f"b{i}") for i in range(20))
    )
    async with asyncio.timeout(T):
        seqs = [(await carol.next_event("bubble"))["seq"] for _ in range(20)]
    assert seqs == list(range(1, 21)) and carol.batches == 0
