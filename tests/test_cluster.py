"""The hub on a real Valkey Cluster: 3 masters with 2 replicas each, in every run.

The whole suite runs on a cluster too, under ``scripts/test --full`` (the
``cluster`` kind of the session's ``store``). What stays in the default run is
this smoke test, on a cluster of its own that it may break: gifts, their
bubbles and the creator's feed, the CLI, an audit; the hub going on after the
node named in its URL dies, and after the master that holds its ledger dies
and a replica takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gifting import cluster
from gifting.hub import Hub, running_hub
from protocol import errors
from protocol.client import Client
from tests.conftest import T, base_config, token, ws_url
from tests.test_cli import cli
from tests.valkey_cluster import Node, ValkeyCluster

# A failover takes a few seconds (``cluster-node-timeout 2000``): a client
# retries with its key meanwhile, for up to this long.
FAILOVER = 6 * T


@contextlib.asynccontextmanager
async def hub_on(url: str, prefix: str, **overrides: Any) -> AsyncIterator[Hub]:
    """A hub on ``url``, audited when it stops: no coin created or lost."""
    async with running_hub(base_config(prefix=prefix, **overrides), url) as hub:
        yield hub
        report = await hub.ledger.audit()
        assert report.ok, report.differences


@contextlib.asynccontextmanager
async def clients(hub: Hub, *users: str) -> AsyncIterator[list[Client]]:
    cs = [await Client.connect(ws_url(hub), token=token(u), timeout=T) for u in users]
    try:
        yield cs
    finally:
        for c in cs:
            await c.close()


def new_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


async def request(c: Client, op: str, **args: Any) -> dict[str, Any]:
    """A command sent as a client should: after ``unavailable`` retried, the
    same (a gift with the same key). While a master fails over, what lives on
    its shard is unavailable: a gift's ledger, or a room's presence (presence
    keys carry no tag, so they are spread over every shard)."""
    async with asyncio.timeout(FAILOVER):
        while True:
            try:
                return await c.request(op, **args)
            except (errors.Unavailable, TimeoutError):
                await asyncio.sleep(0.2)


async def gift(viewer: Client, room: str, key: str) -> dict[str, Any]:
    return await request(viewer, "gift", room=room, gift="rose", key=key)


async def bubbles(c: Client, n: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(FAILOVER):
        return [await c.next_event("bubble", timeout=FAILOVER) for _ in range(n)]


def bus_node(hub: Hub) -> tuple[str, int] | None:
    return hub.rooms.bus.connector.node


async def test_gifts_feed_cli_and_audit_survive_the_death_of_the_seed_node(
    vcluster: ValkeyCluster,
) -> None:
    prefix = new_prefix()
    ledger = vcluster.master_of("{" + prefix + "}:bal")
    # The URL names one node: a master, but not the one holding this ledger.
    seed: Node = next(n for n in vcluster.nodes[: vcluster.masters] if n is not ledger)
    url = vcluster.url_of(seed)
    cli_args = ("--prefix", prefix, "--redis-url", f"redis://{seed.address}", "--cluster")
    topped = await cli("topup", "bob", "100", "--key", "t1", *cli_args)
    assert topped.rc == 0 and topped.out == "100\n", topped
    async with hub_on(url, prefix) as hub, clients(hub, "alice", "bob", "carol") as (a, b, c):
        assert isinstance(hub.ledger.r, cluster.RedisCluster)
        # The bus subscribed where the scripts publish: the ledger's master.
        assert bus_node(hub) == ("127.0.0.1", ledger.port)
        await a.request("go_live", title="on a cluster")
        await b.request("join", room="alice")
        first = await gift(b, "alice", "k1")
        assert first["coins"] == 99 and not first["duplicate"]
        assert [x["seq"] for x in await bubbles(b, 1)] == [1]

        vcluster.kill(seed)

        # A room joined after the death: the bus subscribes on a live master.
        await request(c, "join", room="alice")
        second = await gift(b, "alice", "k2")
        assert second["coins"] == 98
        assert (await gift(b, "alice", "k2"))["duplicate"]
        assert [x["seq"] for x in await bubbles(c, 1)] == [2]
        assert [x["seq"] for x in await bubbles(b, 1)] == [2]
        gifts = [await a.next_event("gift") for _ in range(2)]
        feed = await a.request("feed", room="alice")
        assert [e["transfer"] for e in feed["entries"]] == [g["transfer"] for g in gifts]
        assert [e["transfer"] for e in feed["entries"]] == [first["transfer"], second["transfer"]]
        assert await hub.ledger.ping()
    # The CLI reaches the cluster through any seed that is still up, once the
    # failover is over (a client built during one may fail: redis-py asks the
    # first master it is told of, the dead one, for COMMAND).
    await asyncio.to_thread(vcluster.wait_failover, seed)
    live = next(n for n in vcluster.live() if n is not seed)
    seeds = f"redis+cluster://{seed.address},{live.address}"
    audit = await cli("audit", "--prefix", prefix, "--redis-url", seeds)
    assert audit.rc == 0 and "audit: OK" in audit.out, audit.err


async def test_the_hub_follows_its_ledger_to_the_new_master_after_a_failover(
    vcluster: ValkeyCluster,
) -> None:
    prefix = new_prefix()
    key = "{" + prefix + "}:bal"
    ledger = vcluster.wait_serving(key)
    # Every live node as a seed: the ledger's master, which dies, among them.
    url = "redis+cluster://" + ",".join(n.address for n in vcluster.live())
    async with hub_on(url, prefix) as hub, clients(hub, "alice", "bob") as (a, b):
        assert bus_node(hub) == ("127.0.0.1", ledger.port)
        await hub.ledger.topup("bob", 50, "t1")
        await a.request("go_live", title="failover")
        await b.request("join", room="alice")
        first = await gift(b, "alice", "k1")
        assert [x["seq"] for x in await bubbles(b, 1)] == [1]
        vcluster.wait_replicated(ledger)  # what was acknowledged survives the failover

        vcluster.kill(ledger)

        # The viewer joined before the failover: the bus has to find the new
        # master and subscribe there again for this bubble to arrive.
        second = await gift(b, "alice", "k2")
        assert second["coins"] == 48 and second["transfer"] > first["transfer"]
        assert [x["seq"] for x in await bubbles(b, 1)] == [2]
        promoted = vcluster.master_of(key)
        assert promoted is not ledger
        assert bus_node(hub) == ("127.0.0.1", promoted.port)
        feed = await a.request("feed", room="alice")
        assert [e["transfer"] for e in feed["entries"]] == [first["transfer"], second["transfer"]]
        assert (await b.request("balance"))["coins"] == 48


def test_cluster_urls() -> None:
    seeds = cluster.parse("redis+cluster://u:p%40ss@h1:7000,h2:7001/0")
    assert seeds == cluster.Seeds((("h1", 7000), ("h2", 7001)), "u", "p@ss")
    assert cluster.parse("valkey+cluster://:pw@[::1]:7000").nodes == (("::1", 7000),)
    assert cluster.parse("redis+cluster://pw@h").password == "pw"
    assert cluster.as_cluster_url("redis://:pw@h:7000/0") == "redis+cluster://:pw@h:7000"
    assert cluster.as_cluster_url("redis+cluster://h:1") == "redis+cluster://h:1"
    assert cluster.is_cluster("redis+cluster://h:1") and not cluster.is_cluster("redis://h:1")
    for bad in ("unix:///tmp/s.sock", "redis+cluster://", "rediss+cluster://h:1"):
        with pytest.raises(ValueError):
            cluster.as_cluster_url(bad) if bad.startswith("unix") else cluster.parse(bad)
