"""Money safety: idempotency, concurrency and conservation, through the real hub."""

import asyncio

import pytest

from protocol import errors
from tests.conftest import balances, topup


async def _room(hub, connect, coins=100, viewer="bob"):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    v = await connect(hub, viewer)
    if coins:
        await topup(hub, viewer, coins)
    await v.request("join", room="alice")
    return creator, v


async def test_retry_same_key_is_duplicate_across_connections(hub, connect):
    _, bob = await _room(hub, connect)
    first = await bob.request("gift", room="alice", gift="star", count=2, key="same")
    bob2 = await connect(hub, "bob")
    await bob2.request("join", room="alice")
    again = await bob2.request("gift", room="alice", gift="star", count=2, key="same")
    assert again == {**first, "duplicate": True}
    assert (await balances(hub))["bob"] == 80


async def test_key_reuse_for_different_body_is_conflict(hub, connect):
    _, bob = await _room(hub, connect)
    await bob.request("gift", room="alice", gift="star", key="k")
    before = await balances(hub)
    for args in ({"gift": "rose"}, {"gift": "star", "count": 2}):
        with pytest.raises(errors.Conflict):
            await bob.request("gift", room="alice", key="k", **args)
    creator2 = await connect(hub, "erin")
    await creator2.request("go_live")
    await bob.request("join", room="erin")
    with pytest.raises(errors.Conflict):
        await bob.request("gift", room="erin", gift="star", key="k")
    assert await balances(hub) == before


async def test_keys_are_per_sender(hub, connect):
    _, bob = await _room(hub, connect)
    carol = await connect(hub, "carol")
    await topup(hub, "carol", 100)
    await carol.request("join", room="alice")
    a = await bob.request("gift", room="alice", gift="rose", key="shared")
    b = await carol.request("gift", room="alice", gift="rose", key="shared")
    assert not a["duplicate"] and not b["duplicate"] and a["transfer"] != b["transfer"]


async def test_key_is_remembered_with_ttl(hub, connect, redis_client):
    _, bob = await _room(hub, connect)
    await bob.request("gift", room="alice", gift="rose", key="ttl")
    ttl = await redis_client.ttl(hub.ledger.key("idem", "bob", "ttl"))
    assert ttl > 24 * 3600


async def test_concurrent_gifts_never_overspend(hub, connect):
    """100 concurrent gifts, balance for 10: exactly 10 succeed, none negative."""
    _, bob = await _room(hub, connect, coins=100)
    results = await asyncio.gather(
        *(bob.request("gift", room="alice", gift="star", key=f"c{i}") for i in range(100)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, dict)]
    failed = [r for r in results if not isinstance(r, dict)]
    assert len(ok) == 10
    assert all(isinstance(e, errors.InsufficientFunds) for e in failed)
    assert sorted(r["coins"] for r in ok) == list(range(0, 100, 10))
    bals = await balances(hub)
    assert bals["bob"] == 0 and bals["alice"] == 50 and bals["~platform"] == 50


async def test_concurrent_gifts_from_many_connections(hub, connect):
    _, bob = await _room(hub, connect, coins=100)
    conns = [bob]
    for _ in range(4):
        c = await connect(hub, "bob")
        await c.request("join", room="alice")
        conns.append(c)
    results = await asyncio.gather(
        *(conns[i % 5].request("gift", room="alice", gift="star", key=f"m{i}") for i in range(50)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, dict) for r in results) == 10
    assert (await balances(hub))["bob"] == 0


async def test_copies_of_one_key_at_once_get_one_transfer(hub, connect):
    _, bob = await _room(hub, connect, coins=100)
    others = []
    for _ in range(3):
        c = await connect(hub, "bob")
        await c.request("join", room="alice")
        others.append(c)
    results = await asyncio.gather(
        *(c.request("gift", room="alice", gift="star", key="once") for c in [bob, *others] * 5)
    )
    assert len({r["transfer"] for r in results}) == 1
    assert sum(not r["duplicate"] for r in results) == 1
    assert (await balances(hub))["bob"] == 90


async def test_sum_of_balances_is_zero(hub, connect):
    _, bob = await _room(hub, connect, coins=1000)
    for i in range(10):
        await bob.request("gift", room="alice", gift="heart", count=i + 1, key=f"s{i}")
    bals = await balances(hub)
    assert sum(bals.values()) == 0 and bals["~issuer"] == -1000
    report = await hub.ledger.audit()
    assert report.ok and report.entries == 11


async def test_audit_catches_tampering(hub, connect, redis_client):
    _, bob = await _room(hub, connect, coins=10)
    await redis_client.hincrby(hub.ledger.bal, "bob", 5)
    report = await hub.ledger.audit()
    assert not report.ok
    assert any("bob" in d for d in report.differences)
    assert any("sum to 5" in d for d in report.differences)
    await redis_client.hincrby(hub.ledger.bal, "bob", -5)  # leave it clean for teardown
    assert (await hub.ledger.audit()).ok


async def test_topup_is_idempotent_and_validated(hub):
    a = await hub.ledger.topup("zoe", 10, "t1")
    b = await hub.ledger.topup("zoe", 10, "t1")
    assert (a.coins, a.duplicate, b.coins, b.duplicate) == (10, False, 10, True)
    with pytest.raises(errors.Conflict):
        await hub.ledger.topup("zoe", 11, "t1")
    with pytest.raises(errors.Conflict):
        await hub.ledger.topup("zed", 10, "t1")
    for bad in (0, -5, 10**13, True, 1.5):
        with pytest.raises(errors.BadRequest):
            await hub.ledger.topup("zoe", bad, "t2")
    assert (await balances(hub))["zoe"] == 10


async def test_topup_sends_balance_event(hub, connect):
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 7)
    ev = await bob.next_event("balance")
    assert ev == {"ev": "balance", "coins": 7}


async def test_sender_other_connections_get_balance_event(hub, connect):
    _, bob = await _room(hub, connect)
    phone = await connect(hub, "bob")
    bob.drain()
    phone.drain()
    await bob.request("gift", room="alice", gift="rose", key="b1")
    assert (await phone.next_event("balance"))["coins"] == 99
    await bob.request("ping")
    assert not bob.drain("balance")  # the connection that sent it got the answer instead
