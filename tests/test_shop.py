"""Shops: products, pins, buys, orders and refunds, through the real hub and a real Valkey.

A buy's checks in the contract's order: bad_request, invalid_count, unknown_item,
forbidden (own shop), rate_limited, conflict/duplicate, price_changed, sold_out,
insufficient_funds (then the daily spend cap). Every refused call moves no coin.
"""

import asyncio

import pytest

from protocol import errors
from tests.conftest import T, balances, token, topup

SLOW = 0.001  # rate-limit refill per second: nothing comes back during a test


async def open_shop(hub, connect, seller="alice", *, live=True, **product):
    """``seller``'s connection, live (by default) with one product: mug, 30 coins, 5 left."""
    s = await connect(hub, seller)
    if live:
        await s.request("go_live")
    p = {"product": "mug", "name": "Mug", "coins": 30, "stock": 5, **product}
    await s.request("product_put", **p)
    return s


async def customer(hub, connect, user="bob", coins=1000, room="alice", **claims):
    if claims:
        c = await connect(hub)
        await c.request("auth", token=token(user, **claims))
    else:
        c = await connect(hub, user)
    if coins:
        await topup(hub, user, coins)
    if room:
        await c.request("join", room=room)
    return c


async def buy(client, key, *, shop="alice", product="mug", count=1, coins=30):
    return await client.request(
        "buy", shop=shop, product=product, count=count, coins=coins, key=key
    )


async def refused_buy(client, exc, **args):
    with pytest.raises(exc):
        await client.request("buy", **{"shop": "alice", "product": "mug", "coins": 30, **args})


async def stock_of(client, product="mug", shop="alice"):
    products = (await client.request("products", shop=shop))["products"]
    return {p["id"]: p["stock"] for p in products}[product]


# -- products ----------------------------------------------------------------------


async def test_product_put_creates_and_replaces_and_products_lists_them(hub, connect):
    alice = await connect(hub, "alice")
    res = await alice.request("product_put", product="mug", name="Mug", coins=30, stock=5)
    assert res == {"product": {"id": "mug", "name": "Mug", "coins": 30, "stock": 5, "image": None}}
    img = "https://img.example/cap.png"
    res = await alice.request(
        "product_put", product="cap", name="Cap", coins=12, stock=0, image=img
    )
    assert res["product"]["image"] == img and res["product"]["stock"] == 0
    await alice.request("product_put", product="mug", name="Big mug", coins=35, stock=9)
    bob = await connect(hub, "bob")
    listed = (await bob.request("products", shop="alice"))["products"]
    assert listed == [  # first-put order, a replacement keeps its place
        {"id": "mug", "name": "Big mug", "coins": 35, "stock": 9, "image": None},
        {"id": "cap", "name": "Cap", "coins": 12, "stock": 0, "image": img},
    ]
    assert (await bob.request("products", shop="nobody"))["products"] == []
    assert (await bob.request("products", shop="bob"))["products"] == []
    report = await hub.ledger.audit()
    assert report.ok and report.entries == 3  # three stock records, no coin moved


async def test_product_limits_are_inclusive(hub, connect):
    alice = await connect(hub, "alice")
    p = {
        "product": "p" * 64,
        "name": "n" * 80,
        "coins": 10**9,
        "stock": 10**9,
        "image": "https://x.example/" + "i" * (512 - 18),
    }
    assert (await alice.request("product_put", **p))["product"] == {
        "id": p["product"],
        "name": p["name"],
        "coins": p["coins"],
        "stock": p["stock"],
        "image": p["image"],
    }
    await alice.request("product_put", product="A-z_9", name="é", coins=1, stock=0)


@pytest.mark.parametrize(
    "change",
    [
        {"product": None},
        {"product": ""},
        {"product": "a" * 65},
        {"product": "mug!"},
        {"product": 7},
        {"name": None},
        {"name": ""},
        {"name": "n" * 81},
        {"name": 5},
        {"name": ["Mug"]},
        {"coins": None},
        {"coins": 0},
        {"coins": -30},
        {"coins": 10**9 + 1},
        {"coins": 2**64 - 1},
        {"coins": 1.5},
        {"coins": "30"},
        {"coins": True},
        {"stock": None},
        {"stock": -1},
        {"stock": 10**9 + 1},
        {"stock": 2.0},
        {"stock": False},
        {"image": "javascript:alert(1)"},
        {"image": "http://img.example/a.png"},
        {"image": "data:image/png;base64,AAAA"},
        {"image": "https://"},
        {"image": "//img.example/a.png"},
        {"image": "https://img.example/a b.png"},
        {"image": "https://img.example/\n.png"},
        {"image": ""},
        {"image": "https://x.example/" + "i" * (513 - 18)},
        {"image": 5},
        {"image": {"url": "https://img.example/a.png"}},
    ],
)
async def test_malformed_product_is_bad_request_and_stores_nothing(hub, connect, change):
    alice = await connect(hub, "alice")
    p = {"product": "mug", "name": "Mug", "coins": 30, "stock": 5, **change}
    with pytest.raises(errors.BadRequest):
        await alice.request("product_put", **{k: v for k, v in p.items() if v is not None})
    assert (await alice.request("products", shop="alice"))["products"] == []


async def test_products_needs_a_shop_id(hub, connect):
    bob = await connect(hub, "bob")
    for args in ({}, {"shop": ""}, {"shop": 1}, {"shop": "a/b"}):
        with pytest.raises(errors.BadRequest):
            await bob.request("products", **args)


# -- pin ---------------------------------------------------------------------------


async def test_pin_announces_to_the_room_and_join_shows_it(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    assert (await bob.request("join", room="alice"))["pinned"] is None
    assert await alice.request("pin", product="mug") == {"room": "alice"}
    mug = {"id": "mug", "name": "Mug", "coins": 30, "stock": 5, "image": None}
    async with asyncio.timeout(T):
        ev = await bob.next_event("pinned")
    assert ev == {"ev": "pinned", "room": "alice", "product": mug}
    carol = await customer(hub, connect, "carol")
    assert (await carol.request("join", room="alice"))["pinned"] == mug
    # A new price of the pinned product reaches the room at once.
    await alice.request("product_put", product="mug", name="Mug", coins=25, stock=5)
    async with asyncio.timeout(T):
        ev = await carol.next_event("pinned")
    assert ev["product"]["coins"] == 25
    assert await alice.request("pin", product=None) == {"room": "alice"}
    async with asyncio.timeout(T):
        ev = await carol.next_event("pinned")
    assert ev == {"ev": "pinned", "room": "alice", "product": None}
    assert (await carol.request("join", room="alice"))["pinned"] is None


async def test_a_pin_lasts_for_its_session(hub, connect):
    alice = await open_shop(hub, connect)
    await alice.request("pin", product="mug")
    bob = await customer(hub, connect, room=None)
    assert (await bob.request("join", room="alice"))["pinned"]["id"] == "mug"
    await alice.request("end_live")
    # members are told: the room's live event, then the pin gone
    async with asyncio.timeout(T):
        assert (await bob.next_event("live"))["live"] is False
        # (the pin itself may reach bob too: it joined within the room's batch window)
        while (ev := await bob.next_event("pinned"))["product"] is not None:
            pass
    assert ev == {"ev": "pinned", "room": "alice", "product": None}
    assert (await bob.request("join", room="alice"))["pinned"] is None
    await alice.request("go_live")
    assert (await bob.request("join", room="alice"))["pinned"] is None


async def test_pin_checks_bad_request_then_not_live_then_unknown_item(hub, connect):
    alice = await open_shop(hub, connect, live=False)
    for args in ({}, {"product": ""}, {"product": 5}, {"product": "a" * 65}):
        with pytest.raises(errors.BadRequest):
            await alice.request("pin", **args)
    # Not live: not_live, even for a product that does not exist.
    for product in ("mug", "nope", None):
        with pytest.raises(errors.NotLive):
            await alice.request("pin", product=product)
    await alice.request("go_live")
    with pytest.raises(errors.UnknownItem):
        await alice.request("pin", product="nope")
    bob = await customer(hub, connect, coins=0)
    await bob.request("product_put", product="hat", name="Hat", coins=3, stock=1)
    with pytest.raises(errors.NotLive):  # the room is always the caller's own
        await bob.request("pin", product="hat")
    with pytest.raises(errors.UnknownItem):  # another shop's product is not alice's
        await alice.request("pin", product="hat")


# -- buy ---------------------------------------------------------------------------


async def test_buy_moves_coins_stock_and_tells_everyone(hub, connect):
    alice = await open_shop(hub, connect)
    alice2 = await connect(hub, "alice")  # the seller's other connection, not in the room
    bob = await customer(hub, connect)
    bob2 = await connect(hub, "bob")
    carol = await customer(hub, connect, "carol", coins=0)
    res = await buy(bob, "b1", count=2)
    assert res == {"order": res["order"], "coins": 940, "stock": 3, "duplicate": False}
    async with asyncio.timeout(T):
        sales = [await c.next_event("sale") for c in (alice, bob, carol)]
        orders = [await c.next_event("order") for c in (alice, alice2)]
        await alice2.next_event("balance")
        bal = await bob2.next_event("balance")
    assert sales[0] == sales[1] == sales[2]
    sale = sales[0]
    assert sale == {
        "ev": "sale",
        "room": "alice",
        "session": sale["session"],
        "seq": 1,
        "from": {"user": "bob", "name": "Bob", "avatar": None},
        "product": {"id": "mug", "name": "Mug"},
        "count": 2,
        "stock": 3,
        "time": sale["time"],
    }
    assert (
        orders[0]
        == orders[1]
        == {
            "ev": "order",
            "order": res["order"],
            "shop": "alice",
            "buyer": {"user": "bob", "name": "Bob"},
            "product": "mug",
            "count": 2,
            "coins": 60,
            "status": "paid",
            "time": sale["time"],
            "earned": 54,
        }
    )
    assert bal == {"ev": "balance", "coins": 940}
    await bob.request("ping")  # the paying connection gets no balance event of its own
    assert {"ev": "balance", "coins": 940} not in bob.drain("balance")
    assert not carol.drain("order") and not bob.drain("order")
    bals = await balances(hub)
    assert bals["bob"] == 940 and bals["alice"] == 54 and bals["~platform"] == 6
    assert await stock_of(carol) == 3
    purchase = (await bob.request("history"))["entries"][0]
    sold = (await alice.request("history"))["entries"][0]
    assert purchase == {
        "kind": "purchase",
        "coins": -60,
        "transfer": purchase["transfer"],
        "time": purchase["time"],
        "order": res["order"],
        "shop": "alice",
        "product": "mug",
        "count": 2,
    }
    assert sold == {**purchase, "kind": "sale", "coins": 54, "buyer": "bob"}


async def test_no_sale_event_while_the_seller_is_not_live(hub, connect):
    alice = await open_shop(hub, connect, live=False)
    bob = await customer(hub, connect)
    await buy(bob, "b1")
    async with asyncio.timeout(T):
        await alice.next_event("order")
    await alice.request("go_live")
    async with asyncio.timeout(T):
        await bob.next_event("live")  # published after the buy: a sale would be before it
    assert not bob.drain("sale")
    await buy(bob, "b2")
    async with asyncio.timeout(T):
        sale = await bob.next_event("sale")
    assert sale["seq"] == 1 and sale["stock"] == 3


async def test_shares_are_computed_on_the_total_and_rounded_down(start_hub, connect):
    hub = await start_hub(seller_share_pct=33)
    await open_shop(hub, connect, coins=7, stock=10)
    bob = await customer(hub, connect)
    await buy(bob, "b1", count=3, coins=7)  # 21 coins: the seller floor(6.93) = 6
    bals = await balances(hub)
    assert bals["alice"] == 6 and bals["~platform"] == 15 and bals["bob"] == 979


async def test_buy_with_json_and_an_avatar(hub, connect):
    await open_shop(hub, connect)
    c = await connect(hub, json=True)
    await c.request("auth", token=token("dana", avatar="https://img.example/d.png"))
    await topup(hub, "dana", 100)
    await c.request("join", room="alice")
    res = await buy(c, "j1")
    assert res["coins"] == 70
    async with asyncio.timeout(T):
        sale = await c.next_event("sale")
    assert sale["from"] == {"user": "dana", "name": "Dana", "avatar": "https://img.example/d.png"}


# -- buy: checks, one test per step of the contract's order ----------------------


async def test_bad_request_before_invalid_count(hub, connect):
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    await refused_buy(bob, errors.BadRequest, count=0)  # no key
    await refused_buy(bob, errors.BadRequest, count=100, coins=0, key="k")
    await refused_buy(bob, errors.BadRequest, count="2", key="k")
    await refused_buy(bob, errors.InvalidCount, count=0, key="k")
    assert (await balances(hub))["bob"] == 1000


async def test_invalid_count_before_unknown_item(hub, connect):
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    for count in (0, -1, 100, 10**6):
        await refused_buy(bob, errors.InvalidCount, product="nope", count=count, key="k")
    await refused_buy(bob, errors.UnknownItem, product="nope", key="k")
    await refused_buy(bob, errors.UnknownItem, shop="nobody", key="k")
    assert (await balances(hub))["bob"] == 1000


async def test_unknown_item_before_forbidden(hub, connect):
    alice = await open_shop(hub, connect)
    await topup(hub, "alice", 100)
    await refused_buy(alice, errors.UnknownItem, product="nope", key="k")
    await refused_buy(alice, errors.Forbidden, key="k")
    assert (await balances(hub))["alice"] == 100 and await stock_of(alice) == 5


async def test_forbidden_before_rate_limited(start_hub, connect):
    hub = await start_hub(gift_rate=SLOW, gift_burst=1)
    alice = await open_shop(hub, connect)
    await topup(hub, "alice", 100)
    await refused_buy(alice, errors.Forbidden, key="k1")  # took the one token
    await refused_buy(alice, errors.Forbidden, key="k2")  # limited, but own shop first
    await open_shop(hub, connect, "erin")
    await refused_buy(alice, errors.RateLimited, shop="erin", key="k3")  # the bucket is empty
    assert (await balances(hub))["alice"] == 100


async def test_rate_limited_before_conflict_and_duplicate(start_hub, connect):
    hub = await start_hub(gift_rate=SLOW, gift_burst=1)
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    await buy(bob, "k")
    before = await balances(hub)
    await refused_buy(bob, errors.RateLimited, key="k")  # the same buy again
    await refused_buy(bob, errors.RateLimited, key="k", count=2)  # the key for another buy
    assert await balances(hub) == before


async def test_conflict_and_duplicate_before_price_changed(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    first = await buy(bob, "k")
    await alice.request("product_put", product="mug", name="Mug", coins=40, stock=5)
    again = await buy(bob, "k")  # the first answer, though the price moved since
    assert again == {**first, "duplicate": True}
    await refused_buy(bob, errors.Conflict, key="k", count=2)
    await refused_buy(bob, errors.PriceChanged, key="k2")
    assert (await balances(hub))["bob"] == 970


async def test_price_changed_before_sold_out(hub, connect):
    await open_shop(hub, connect, stock=0)
    bob = await customer(hub, connect)
    await refused_buy(bob, errors.PriceChanged, coins=29, key="k")
    await refused_buy(bob, errors.SoldOut, key="k")
    assert (await balances(hub))["bob"] == 1000


async def test_sold_out_before_insufficient_funds(hub, connect):
    await open_shop(hub, connect, stock=1)
    bob = await customer(hub, connect, coins=10)
    await refused_buy(bob, errors.SoldOut, count=2, key="k")
    await refused_buy(bob, errors.InsufficientFunds, count=1, key="k")
    assert (await balances(hub))["bob"] == 10


async def test_insufficient_funds_before_the_spend_cap(start_hub, connect):
    hub = await start_hub(minor_daily_spend_cap=50)
    await open_shop(hub, connect, stock=10)
    kid = await customer(hub, connect, "kid", coins=40, minor=True)
    await refused_buy(kid, errors.InsufficientFunds, count=2, key="k")  # 60: over both
    await topup(hub, "kid", 100)
    await refused_buy(kid, errors.SpendLimit, count=2, key="k")
    await buy(kid, "k")  # 30 fits
    with pytest.raises(errors.SpendLimit):  # 60 does not, and gifts count too
        await kid.request("gift", room="alice", gift="cake", key="g")
    assert (await balances(hub))["kid"] == 110


# -- concurrency -------------------------------------------------------------------


async def test_fifty_buyers_for_ten_units(hub, connect):
    alice = await open_shop(hub, connect, coins=5, stock=10)
    buyers = [await customer(hub, connect, f"u{i}", coins=100, room=None) for i in range(50)]
    results = await asyncio.gather(
        *(buy(c, "once", coins=5) for c in buyers), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, dict)]
    failed = [r for r in results if not isinstance(r, dict)]
    assert len(ok) == 10 and len({r["order"] for r in ok}) == 10
    assert all(isinstance(e, errors.SoldOut) for e in failed), failed
    assert sorted(r["stock"] for r in ok) == list(range(10))
    assert await stock_of(alice) == 0
    bals = await balances(hub)
    assert all(v >= 0 for a, v in bals.items() if a != "~issuer")
    assert sorted(bals[f"u{i}"] for i in range(50)) == [95] * 10 + [100] * 40
    assert bals["alice"] == 10 * 4 and bals["~platform"] == 10 * 1
    sold = (await alice.request("orders", role="seller"))["entries"]
    assert len(sold) == 10 and all(o["status"] == "paid" for o in sold)


async def test_a_price_change_racing_buys_never_charges_an_unseen_price(hub, connect):
    alice = await open_shop(hub, connect, coins=10, stock=10**6)
    buyers = [await customer(hub, connect, f"u{i}", coins=10_000, room=None) for i in range(20)]
    some_sold = asyncio.Event()

    async def keep_buying(c):
        paid = []
        for i in range(500):
            try:
                res = await buy(c, f"k{i}", coins=10)
            except errors.PriceChanged:
                return paid
            paid.append(res["order"])
            some_sold.set()
        raise AssertionError("the new price never reached this buyer")

    async def change_price():
        async with asyncio.timeout(T):
            await some_sold.wait()
        await alice.request("product_put", product="mug", name="Mug", coins=11, stock=10**6)

    async with asyncio.timeout(4 * T):
        *paid, _ = await asyncio.gather(*(keep_buying(c) for c in buyers), change_price())
    orders = (await alice.request("orders", role="seller", limit=500))["entries"]
    n = sum(len(p) for p in paid)
    assert n == len(orders) > 0
    assert all(o["coins"] == 10 for o in orders)  # the old price, never 11 unseen
    bals = await balances(hub)
    assert sum(10_000 - bals[f"u{i}"] for i in range(20)) == 10 * n


async def test_sales_and_bubbles_share_the_rooms_seq(hub, connect):
    await open_shop(hub, connect, coins=1, stock=100)
    bob = await customer(hub, connect)
    carol = await customer(hub, connect, "carol")
    dave = await customer(hub, connect, "dave", coins=0)

    async def buys():
        for i in range(10):
            await buy(carol, f"b{i}", coins=1)

    await asyncio.gather(
        buys(), *(bob.request("gift", room="alice", gift="rose", key=f"g{i}") for i in range(10))
    )
    seen = []
    async with asyncio.timeout(T):
        while len(seen) < 20:
            ev = await dave.next_event()
            if ev["ev"] in ("bubble", "sale"):
                seen.append(ev)
    assert [ev["seq"] for ev in seen] == list(range(1, 21))
    assert sum(ev["ev"] == "sale" for ev in seen) == 10
    sales = [ev["stock"] for ev in seen if ev["ev"] == "sale"]
    assert sales == list(range(99, 89, -1))


# -- idempotency -------------------------------------------------------------------


async def test_same_buy_key_on_another_connection_is_one_order(hub, connect):
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    first = await buy(bob, "same", count=2)
    bob2 = await connect(hub, "bob")  # another connection, not even in the room
    again = await buy(bob2, "same", count=2)
    assert again == {**first, "duplicate": True}
    assert (await balances(hub))["bob"] == 940
    assert len((await bob.request("orders", role="buyer"))["entries"]) == 1
    with pytest.raises(errors.Conflict):
        await bob.request("gift", room="alice", gift="rose", key="same")


async def test_copies_of_one_buy_key_at_once_are_one_order(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    conns = [bob] + [await connect(hub, "bob") for _ in range(3)]
    results = await asyncio.gather(*(buy(c, "once") for c in conns * 3))
    assert len({r["order"] for r in results}) == 1
    assert sum(not r["duplicate"] for r in results) == 1
    assert await stock_of(alice) == 4 and (await balances(hub))["bob"] == 970


async def test_a_refused_buy_is_not_remembered(hub, connect):
    await open_shop(hub, connect)
    bob = await customer(hub, connect, coins=10)
    await refused_buy(bob, errors.InsufficientFunds, key="later")
    await topup(hub, "bob", 20)
    assert not (await buy(bob, "later"))["duplicate"]


# -- orders ------------------------------------------------------------------------


async def test_orders_as_buyer_and_seller_newest_first(hub, connect):
    alice = await open_shop(hub, connect)
    await alice.request("product_put", product="cap", name="Cap", coins=12, stock=5)
    erin = await open_shop(hub, connect, "erin", coins=2)
    bob = await customer(hub, connect, name="Bobby")
    o1 = (await buy(bob, "1"))["order"]
    o2 = (await buy(bob, "2", product="cap", count=2, coins=12))["order"]
    o3 = (await buy(bob, "3", shop="erin", coins=2))["order"]
    o4 = (await buy(bob, "4", count=3))["order"]
    mine = (await bob.request("orders", role="buyer"))["entries"]
    assert [o["order"] for o in mine] == [o4, o3, o2, o1]
    assert mine[2] == {
        "order": o2,
        "shop": "alice",
        "buyer": {"user": "bob", "name": "Bobby"},
        "product": "cap",
        "count": 2,
        "coins": 24,
        "status": "paid",
        "time": mine[2]["time"],
    }
    older = await bob.request("orders", role="buyer", before=o3, limit=1)
    assert [o["order"] for o in older["entries"]] == [o2]
    sold = (await alice.request("orders", role="seller"))["entries"]
    assert [o["order"] for o in sold] == [o4, o2, o1]
    assert [o["order"] for o in (await erin.request("orders", role="seller"))["entries"]] == [o3]
    assert (await alice.request("orders", role="buyer"))["entries"] == []
    assert (await bob.request("orders", role="seller"))["entries"] == []


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"role": "admin"},
        {"role": 1},
        {"role": "buyer", "limit": 0},
        {"role": "buyer", "limit": 501},
        {"role": "buyer", "limit": "5"},
        {"role": "buyer", "before": 0},
        {"role": "buyer", "before": -3},
        {"role": "buyer", "before": "1"},
        {"role": "buyer", "before": 2**64 - 1},
    ],
)
async def test_malformed_orders_is_bad_request(hub, connect, args):
    bob = await connect(hub, "bob")
    with pytest.raises(errors.BadRequest):
        await bob.request("orders", **args)


# -- refund ------------------------------------------------------------------------


async def test_refund_undoes_the_purchase(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    bob2 = await connect(hub, "bob")
    order = (await buy(bob, "b", count=2))["order"]
    before = await balances(hub)
    res = await alice.request("refund", order=order, key="r")
    assert res == {"order": order, "status": "refunded", "coins": 0, "duplicate": False}
    async with asyncio.timeout(T):
        while (await bob2.next_event("balance"))["coins"] != 1000:
            pass
    bals = await balances(hub)
    assert bals["bob"] == 1000 and bals["alice"] == 0 and bals["~platform"] == 0
    assert before["bob"] == 940 and await stock_of(bob) == 5
    for who, role in ((bob, "buyer"), (alice, "seller")):
        (o,) = (await who.request("orders", role=role))["entries"]
        assert o["status"] == "refunded" and o["order"] == order
    back = (await bob.request("history"))["entries"][0]
    taken = (await alice.request("history"))["entries"][0]
    assert back == {
        "kind": "refund",
        "coins": 60,
        "transfer": back["transfer"],
        "time": back["time"],
        "order": order,
        "shop": "alice",
        "product": "mug",
        "count": 2,
    }
    assert taken == {**back, "coins": -54, "buyer": "bob"}
    # The same key again, on another connection: the first answer, nothing moved.
    alice2 = await connect(hub, "alice")
    again = await alice2.request("refund", order=order, key="r")
    assert again == {**res, "duplicate": True}
    with pytest.raises(errors.Conflict):  # a new key for a refunded order
        await alice.request("refund", order=order, key="r2")
    assert await balances(hub) == bals
    report = await hub.ledger.audit()
    assert report.ok, report.differences


async def test_refund_checks_in_order(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    order = (await buy(bob, "b"))["order"]
    bad = ({"order": order}, {"order": "1", "key": "r"}, {"order": 0, "key": "r"},
           {"order": -1, "key": "r"}, {"order": 1.0, "key": "r"}, {"order": True, "key": "r"},
           {"order": 2**64 - 1, "key": "r"}, {"order": order, "key": ""})  # fmt: skip
    for args in bad:  # bad_request, before anything else
        with pytest.raises(errors.BadRequest):
            await alice.request("refund", **args)
    with pytest.raises(errors.UnknownItem):  # unknown_item before forbidden
        await bob.request("refund", order=order + 1, key="r")
    for who in (bob, await connect(hub, "carol")):  # only the shop's owner
        with pytest.raises(errors.Forbidden):
            await who.request("refund", order=order, key="r")
    assert (await balances(hub))["bob"] == 970
    await alice.request("refund", order=order, key="r")
    with pytest.raises(errors.Forbidden):  # forbidden before duplicate
        await bob.request("refund", order=order, key="r")
    # duplicate before "already refunded", both before insufficient_funds (alice has 0)
    assert (await alice.request("refund", order=order, key="r"))["duplicate"]
    with pytest.raises(errors.Conflict):
        await alice.request("refund", order=order, key="r2")
    assert (await balances(hub))["bob"] == 1000


async def test_refund_the_seller_cannot_cover_moves_nothing(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    order = (await buy(bob, "b"))["order"]  # alice earns 27
    await alice.request("effect", room="alice", effect="confetti", key="e")  # 7 left
    before = await balances(hub)
    with pytest.raises(errors.InsufficientFunds):
        await alice.request("refund", order=order, key="r")
    assert await balances(hub) == before and await stock_of(bob) == 4
    await topup(hub, "alice", 20)
    with pytest.raises(errors.Conflict):  # a key used for an effect is not a refund's
        await alice.request("refund", order=order, key="e")
    res = await alice.request("refund", order=order, key="r")  # a refused key is not kept
    assert not res["duplicate"] and res["coins"] == 0


async def test_two_refunds_racing_make_one(hub, connect):
    alice = await open_shop(hub, connect)
    alice2 = await connect(hub, "alice")
    bob = await customer(hub, connect)
    order = (await buy(bob, "b"))["order"]
    results = await asyncio.gather(
        alice.request("refund", order=order, key="r1"),
        alice2.request("refund", order=order, key="r2"),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, dict)]
    assert len(ok) == 1 and not ok[0]["duplicate"]
    assert sum(isinstance(r, errors.Conflict) for r in results) == 1
    bals = await balances(hub)
    assert bals["bob"] == 1000 and bals["alice"] == 0 and await stock_of(bob) == 5


async def test_refunds_and_admin_reversals_never_both_undo_a_purchase(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    first = (await buy(bob, "b1"))["order"]
    second = (await buy(bob, "b2"))["order"]
    hist = (await bob.request("history"))["entries"]
    paid = {h["order"]: h["transfer"] for h in hist if h["kind"] == "purchase"}
    # An admin reversed the first purchase: its order can no longer be refunded.
    await hub.ledger.reverse(paid[first], "rev-1")
    with pytest.raises(errors.Conflict):
        await alice.request("refund", order=first, key="r1")
    # The second was refunded: an admin cannot reverse it again.
    await alice.request("refund", order=second, key="r2")
    with pytest.raises(errors.Conflict):
        await hub.ledger.reverse(paid[second], "rev-2")
    # ... nor reverse the refund itself (the buyer would pay again for a refunded order).
    refunded = [h for h in (await bob.request("history"))["entries"] if h["kind"] == "refund"]
    with pytest.raises(errors.Forbidden):
        await hub.ledger.reverse(refunded[0]["transfer"], "rev-3")
    bals = await balances(hub)
    assert bals["bob"] == 1000 and bals["alice"] == 0 and bals["~platform"] == 0


# -- hostile buys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"shop": None},
        {"shop": 5},
        {"shop": "a" * 65},
        {"shop": "al:ice"},
        {"product": None},
        {"product": ["mug"]},
        {"product": "m*"},
        {"coins": None},
        {"coins": 0},
        {"coins": -30},
        {"coins": 10**9 + 1},
        {"coins": 2**64 - 1},
        {"coins": 30.0},
        {"coins": "30"},
        {"coins": True},
        {"count": 1.0},
        {"count": "1"},
        {"count": True},
        {"count": [1]},
        {"key": None},
        {"key": "k" * 65},
        {"key": 1},
        {"key": "\u00e9"},
    ],
)
async def test_malformed_buy_is_bad_request_and_moves_nothing(hub, connect, change):
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    args = {"shop": "alice", "product": "mug", "coins": 30, "key": "k", **change}
    with pytest.raises(errors.BadRequest):
        await bob.request("buy", **{k: v for k, v in args.items() if v is not None})
    assert (await balances(hub))["bob"] == 1000 and await stock_of(bob) == 5


# -- audit -------------------------------------------------------------------------


async def test_audit_replays_orders_and_stock(hub, connect):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    o = (await buy(bob, "b1", count=2))["order"]
    await buy(bob, "b2")
    await alice.request("refund", order=o, key="r")
    await alice.request("product_put", product="mug", name="Mug", coins=30, stock=50)
    await buy(bob, "b3", count=3)
    report = await hub.ledger.audit()
    assert report.ok, report.differences
    assert report.entries == 1 + 2 + 3 + 1  # a top-up, two puts, three buys, a refund


async def test_audit_catches_a_tampered_stock(hub, connect, redis_client):
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    await buy(bob, "b")
    key = hub.ledger.key("prod", "alice", "mug")
    await redis_client.hset(key, "stock", 40)
    report = await hub.ledger.audit()
    assert not report.ok
    assert any("alice/mug" in d and "stock 40" in d for d in report.differences)
    await redis_client.hset(key, "stock", 4)  # leave it clean for teardown
    assert (await hub.ledger.audit()).ok


async def test_audit_catches_a_tampered_order_status(hub, connect, redis_client):
    await open_shop(hub, connect)
    bob = await customer(hub, connect)
    order = (await buy(bob, "b"))["order"]
    key = hub.ledger.key("order", str(order))
    await redis_client.hset(key, "status", "refunded")
    report = await hub.ledger.audit()
    assert not report.ok
    assert any(f"order {order}" in d and "refunded" in d for d in report.differences)
    await redis_client.hset(key, "status", "paid")
    assert (await hub.ledger.audit()).ok


async def test_audit_catches_a_refund_without_a_purchase(hub, connect, redis_client):
    alice = await open_shop(hub, connect)
    bob = await customer(hub, connect)
    order = (await buy(bob, "b"))["order"]
    await alice.request("refund", order=order, key="r")
    # Forge a second refund record of the same order (zero postings, so balances agree).
    journal = hub.ledger.key("journal")
    fields = {"t": 999, "kind": "refund", "ms": 0, "post": "", "order": order}
    fields |= {"shop": "alice", "product": "mug", "count": 0}
    entry = await redis_client.xadd(journal, fields)
    report = await hub.ledger.audit()
    assert any(f"order {order} refunded twice" in d for d in report.differences)
    await redis_client.xdel(journal, entry)
    assert (await hub.ledger.audit()).ok
