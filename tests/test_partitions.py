"""The ledger partitioned by user (``serve --partitions N``): the real hub, a real store.

Every gift here crosses partitions (the sender's and the creator's differ),
so it is the three steps of docs/scaling.md §5: debit + outbox in the
sender's partition, credit (and bubble) in the creator's, ack. The hub
fixture audits every prefix at the end: balances replayed per partition, the
sum over partitions 0 and ``~transit`` equal to the coins still in outboxes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from gifting import cluster
from gifting.hub import running_hub
from gifting.ledger.partitioned import TRANSIT, PartitionedLedger, partition_of
from protocol import errors
from tests.conftest import HubFactory, T, base_config
from tests.valkey_cluster import ValkeyCluster

N = 4


def elsewhere(user: str, n: int = N, *, avoid: tuple[str, ...] = ()) -> str:
    """A user id in another partition than ``user`` (and than ``avoid``)."""
    taken = {partition_of(u, n) for u in (user, *avoid)}
    for i in range(1000):
        cand = f"v{i}"
        if partition_of(cand, n) not in taken:
            return cand
    raise AssertionError("no such user")


def ledger_of(hub: Any) -> PartitionedLedger:
    assert isinstance(hub.ledger, PartitionedLedger)
    return hub.ledger


async def all_balances(lg: PartitionedLedger) -> dict[str, int]:
    """Every account over every partition (system accounts summed)."""
    out: dict[str, int] = {}
    for k in range(lg.partitions):
        raw: Any = await lg.r.hgetall(lg.bal_at(k))
        for a, v in raw.items():
            out[a.decode()] = out.get(a.decode(), 0) + int(v)
    return out


async def live_room(hub: Any, connect: Any, viewers: list[str], coins: int = 1000) -> Any:
    c = await connect(hub, "alice")
    await c.request("go_live", title="show")
    vs = []
    for v in viewers:
        cl = await connect(hub, v)
        await ledger_of(hub).topup(v, coins, "t:" + uuid.uuid4().hex)
        await cl.request("join", room="alice")
        vs.append(cl)
    return c, vs


async def test_gift_across_partitions(start_hub: HubFactory, connect: Any) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    creator, (viewer,) = await live_room(hub, connect, [bob])
    assert lg.part(bob) != lg.part("alice")
    res = await viewer.request("gift", room="alice", gift="star", count=3, key="k1")
    assert res == {"transfer": res["transfer"], "coins": 970, "combo": 1, "duplicate": False}
    assert res["transfer"] % N == lg.part(bob)  # the sender's partition's id
    async with asyncio.timeout(T):
        bubbles = [await cl.next_event("bubble") for cl in (viewer, creator)]
        g = await creator.next_event("gift")
        bal = await creator.next_event("balance")
    assert bubbles[0] == bubbles[1]
    b = bubbles[0]
    assert (b["room"], b["gift"], b["count"], b["coins"], b["combo"], b["seq"]) == (
        "alice",
        "star",
        3,
        30,
        1,
        1,
    )
    assert b["from"] == {"user": bob, "name": bob.title(), "avatar": None}
    assert g["transfer"] == res["transfer"] and g["earned"] == 15 and g["total"] == 15
    assert bal == {"ev": "balance", "coins": 15}
    assert await viewer.request("balance") == {"coins": 970}
    assert await creator.request("balance") == {"coins": 15}
    # History in each user's partition, the feed and leaderboard in the creator's.
    h = (await viewer.request("history"))["entries"]
    assert [(e["kind"], e["coins"]) for e in h] == [("gift", -30), ("topup", 1000)]
    assert (await creator.request("history"))["entries"][0]["coins"] == 15
    feed = (await creator.request("feed", room="alice"))["entries"]
    assert [e["transfer"] for e in feed] == [res["transfer"]]
    j = await viewer.request("join", room="alice")
    assert j["top"] == [{"user": bob, "name": bob.title(), "coins": 30}]
    bals = await all_balances(lg)
    assert bals[TRANSIT] == 0 and bals["~platform"] == 15 and sum(bals.values()) == 0
    report = await lg.audit()
    assert report.ok and report.in_flight == 0, report.differences


async def test_retry_by_key_is_exactly_once(start_hub: HubFactory, connect: Any) -> None:
    hub = await start_hub(partitions=N)
    bob = elsewhere("alice")
    creator, (viewer,) = await live_room(hub, connect, [bob])
    other = await connect(hub, bob)  # the retry comes from another connection
    await other.request("join", room="alice")
    first = await viewer.request("gift", room="alice", gift="cake", key="same")
    again = await other.request("gift", room="alice", gift="cake", key="same")
    assert again == {**first, "duplicate": True}
    with pytest.raises(errors.Conflict):
        await other.request("gift", room="alice", gift="rose", key="same")
    # A later gift is the barrier: a room's bubbles arrive in seq order, so the
    # next bubble after the cake's is the rose's only if the cake had one bubble.
    await viewer.request("gift", room="alice", gift="rose", key="after")
    async with asyncio.timeout(T):
        cake = await creator.next_event("bubble")
        rose = await creator.next_event("bubble")
    assert (cake["gift"], rose["gift"]) == ("cake", "rose")  # one bubble, not two
    assert rose["seq"] == cake["seq"] + 1
    assert await viewer.request("balance") == {"coins": 949}
    assert await creator.request("balance") == {"coins": 25}  # + floor(50 % of 1)


async def test_refusals(start_hub: HubFactory, connect: Any) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    creator, (viewer,) = await live_room(hub, connect, [bob], coins=40)
    with pytest.raises(errors.InsufficientFunds):
        await viewer.request("gift", room="alice", gift="cake", key="k1")
    with pytest.raises(errors.UnknownGift):
        await viewer.request("gift", room="alice", gift="nope", key="k2")
    # Not partitioned yet: refused, nothing moves.
    with pytest.raises(errors.Forbidden, match="--partitions"):
        await viewer.request("effect", room="alice", effect="confetti", key="k3")
    with pytest.raises(errors.Forbidden, match="--partitions"):
        await creator.request("campaigns")
    with pytest.raises(errors.Forbidden, match="--partitions"):
        await lg.reverse(1, "r1")
    await creator.request("end_live")
    with pytest.raises(errors.NotLive):  # answered before any debit
        await viewer.request("gift", room="alice", gift="rose", key="k4")
    assert await viewer.request("balance") == {"coins": 40}
    assert [e["kind"] for e in (await viewer.request("history"))["entries"]] == ["topup"]


async def test_room_ended_between_debit_and_credit_is_refunded(
    start_hub: HubFactory, connect: Any
) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    creator, (viewer,) = await live_room(hub, connect, [bob], coins=100)
    res, entry = await lg.debit(
        sender=bob, room="alice", gift="star", count=1, key="k", name="B", avatar=None
    )
    assert entry is not None and (await lg.audit()).in_flight_coins == 10
    await creator.request("end_live")
    assert await lg.relay(min_age_ms=0) == 1  # credit says "refund"; refunded
    assert await lg.balance(bob) == 100 and await lg.balance("alice") == 0
    assert await lg.relay(min_age_ms=0) == 0
    report = await lg.audit()
    assert report.ok and report.in_flight == 0, report.differences
    # The key was dropped with the gift: its retry is checked anew.
    await creator.request("go_live")
    again = await viewer.request("gift", room="alice", gift="star", key="k")
    assert again["duplicate"] is False and again["coins"] == 90


async def test_concurrent_gifts_conserve_coins(start_hub: HubFactory, connect: Any) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    senders = [elsewhere("alice")]
    senders.append(elsewhere("alice", avoid=tuple(senders)))
    senders.append(elsewhere("alice", avoid=tuple(senders)))
    creator, viewers = await live_room(hub, connect, senders, coins=100)
    calls = [
        viewers[i % 3].request("gift", room="alice", gift="heart", count=1 + i % 2, key=f"g{i}")
        for i in range(30)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, dict)]
    assert len(ok) == 30, results
    async with asyncio.timeout(T):
        seqs = sorted([(await creator.next_event("bubble"))["seq"] for _ in range(30)])
    assert seqs == list(range(1, 31))
    bals = await all_balances(lg)
    assert sum(bals.values()) == 0 and bals[TRANSIT] == 0
    spent = sum(5 * (1 + i % 2) for i in range(30))
    assert sum(bals[s] for s in senders) == 300 - spent
    assert bals["alice"] + bals["~platform"] == spent
    report = await lg.audit()
    assert report.ok and report.in_flight == 0, report.differences


async def test_retry_by_key_finishes_a_dead_hubs_gift(
    start_hub: HubFactory, connect: Any, store_url: str
) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    creator, (viewer,) = await live_room(hub, connect, [bob], coins=100)
    # A "hub" that debits and dies: a ledger of its own, no relay of its own.
    client = cluster.client(store_url, timeout=T)
    try:
        dead = PartitionedLedger(client, partitions=N, prefix=hub.config.prefix)
        await dead.load({})
        res, entry = await dead.debit(
            sender=bob, room="alice", gift="cake", count=1, key="crash", name="Bob", avatar=None
        )
    finally:
        await client.aclose()
    assert entry is not None
    report = await lg.audit()
    assert report.ok and (report.in_flight, report.in_flight_coins) == (1, 50)
    # The client retries by key while the credit is still in flight: the same
    # transfer, and the retry finishes it at once (idempotent).
    again = await viewer.request("gift", room="alice", gift="cake", key="crash")
    assert again["transfer"] == res.transfer and again["duplicate"] is True
    # ... or, had it not, the running hub's relay would have (after RELAY_AGE_MS).
    async with asyncio.timeout(T):
        b = await creator.next_event("bubble")
    assert b["coins"] == 50
    assert await lg.relay(min_age_ms=0) == 0  # nothing left to credit: no second bubble
    assert creator.drain("bubble") == []  # credited once, one bubble
    assert await lg.balance("alice") == 25 and await lg.balance(bob) == 50
    report = await lg.audit()
    assert report.ok and report.in_flight == 0, report.differences


async def test_relay_alone_finishes_a_dead_hubs_gift(
    start_hub: HubFactory, connect: Any, store_url: str
) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    creator, _ = await live_room(hub, connect, [bob], coins=100)
    client = cluster.client(store_url, timeout=T)
    try:
        dead = PartitionedLedger(client, partitions=N, prefix=hub.config.prefix)
        await dead.debit(
            sender=bob, room="alice", gift="star", count=1, key="x", name="Bob", avatar=None
        )
    finally:
        await client.aclose()
    # Nobody retries: the hub's relay takes the entry once it is old enough.
    async with asyncio.timeout(T + 3):
        b = await creator.next_event("bubble")
    assert b["coins"] == 10 and b["from"]["user"] == bob
    assert await lg.relay(min_age_ms=0) == 0  # another pass: nothing more
    assert creator.drain("bubble") == []
    assert await lg.balance("alice") == 5
    report = await lg.audit()
    assert report.ok and report.in_flight == 0, report.differences


async def test_audit_detects_a_tampered_balance(start_hub: HubFactory, connect: Any) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    _, (viewer,) = await live_room(hub, connect, [bob], coins=100)
    await viewer.request("gift", room="alice", gift="rose", key="k")
    assert (await lg.audit()).ok
    bal = lg.bal_at(lg.part("alice"))
    await lg.r.hincrby(bal, "alice", 7)
    report = await lg.audit()
    assert not report.ok
    assert any("account alice" in d for d in report.differences)
    assert any("sum to 7" in d for d in report.differences)
    await lg.r.hincrby(bal, "alice", -7)
    assert (await lg.audit()).ok


async def test_partitions_on_different_masters(vcluster: ValkeyCluster, connect: Any) -> None:
    """On a real 3-master cluster the partitions sit on more than one master, and
    a gift crossing them delivers its bubble (the bus subscribes per partition)."""
    cfg = base_config(partitions=N)
    async with running_hub(cfg, vcluster.url) as hub:
        lg = ledger_of(hub)
        assert isinstance(lg.r, RedisCluster)
        masters = {vcluster.master_of(lg.bal_at(k)).port for k in range(N)}
        bob = next(
            f"v{i}"
            for i in range(1000)
            if vcluster.master_of(lg.bal_at(partition_of(f"v{i}", N))).port
            != vcluster.master_of(lg.bal_at(lg.part("alice"))).port
        )
        creator, (viewer,) = await live_room(hub, connect, [bob])
        res = await viewer.request("gift", room="alice", gift="rocket", key="k")
        assert res["coins"] == 900
        async with asyncio.timeout(T):
            b = await viewer.next_event("bubble")
            await creator.next_event("gift")
        assert b["coins"] == 100
        report = await lg.audit()
        assert report.ok and report.in_flight == 0, report.differences
        assert sum((await all_balances(lg)).values()) == 0
        for c in (creator, viewer):
            await c.close()
    assert len(masters) >= 2


async def test_cli_serve_topup_audit_with_partitions(tmp_path: Any) -> None:
    from tests.test_cli import cli, client, serving

    data = tmp_path / "data"
    d = ("--data-dir", str(data))
    p = ("--partitions", str(N))
    async with serving(data, "--no-demo", *p) as s:
        tok, first = await asyncio.gather(
            cli("token", "alice", "--name", "Alice", *d),
            cli("topup", "alice", "100", "--key", "k1", *p, *d),
        )
        assert first.rc == 0 and first.out == "100\n", first
        async with client(s.ws, tok.out.strip()) as c:
            me = await c.request("auth", token=tok.out.strip())
            assert me["coins"] == 100
            with pytest.raises(errors.Forbidden, match="--partitions"):
                await c.request("products", shop="alice")
        audit = await cli("audit", *p, *d)
        assert audit.rc == 0 and "audit: OK" in audit.out, audit
        rev = await cli("reverse", "1", "--key", "r", *p, *d)
        assert rev.rc == 1 and "forbidden" in rev.err, rev


async def test_serve_refuses_partitions_with_ack_replicas(tmp_path: Any) -> None:
    from tests.test_cli import cli

    ran = await cli(
        "serve", "--partitions", "2", "--ack-replicas", "1", "--data-dir", str(tmp_path)
    )
    assert ran.rc == 2 and "--partitions" in ran.err, ran


async def test_a_bad_outbox_entry_does_not_stop_the_relay(
    start_hub: HubFactory, connect: Any, store_url: str
) -> None:
    hub = await start_hub(partitions=N)
    lg = ledger_of(hub)
    bob = elsewhere("alice")
    creator, _ = await live_room(hub, connect, [bob], coins=100)
    out = lg.key_at(partition_of(bob, N), "out")
    await lg.r.hset(out, "1", b"not msgpack")  # sorts before bob's transfer
    client = cluster.client(store_url, timeout=T)
    try:
        dead = PartitionedLedger(client, partitions=N, prefix=hub.config.prefix)
        await dead.debit(
            sender=bob, room="alice", gift="star", count=1, key="x", name="Bob", avatar=None
        )
    finally:
        await client.aclose()
    assert await lg.relay(min_age_ms=0) == 1  # the bad entry is skipped, bob's finished
    async with asyncio.timeout(T):
        assert (await creator.next_event("bubble"))["from"]["user"] == bob
    await lg.r.hdel(out, "1")
    report = await lg.audit()
    assert report.ok and report.in_flight == 0, report.differences
