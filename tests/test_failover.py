"""Failover of the master that holds the ledger, and ``--ack-replicas``.

On a cluster of its own (3 masters with 2 replicas each, ``tests/valkey_cluster.py``)
that the tests may break: each test picks a key prefix whose slot lives on a
master with both its replicas up.

- ``kill -9`` of the ledger's master in the middle of a gift load: the hub
  answers ``unavailable`` while a replica is promoted and recovers by itself;
  the senders retry with their keys; afterwards every acked gift is in the
  journal exactly once, nothing is paid twice and the audit is clean. With
  ``ack_replicas=1`` no acked gift is lost, and acks go on after the failover
  (the promoted master still has a replica). Without it, a gift acked in the
  last instant before the death may be lost (replication is asynchronous):
  the test counts those and checks that everything else holds.
- ``WAIT`` is honoured: on loopback replication lag is near zero, so losses
  are not what is counted; a replica stopped with SIGSTOP stops acking, and
  with ``ack_replicas=2`` so do the gifts (``unavailable``, moved but not
  acked, until it runs again); with ``ack_replicas=1`` they go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gifting import cluster
from gifting.hub import Hub, running_hub
from gifting.ledger import Ledger
from gifting.store import EmbeddedStore
from protocol import errors
from protocol.client import Client, new_key
from tests.conftest import T, base_config, ws_url
from tests.conftest import token as mint
from tests.faults.checks import StoreState, money_violations
from tests.faults.clients import PRICES, Ack
from tests.test_cli import cli
from tests.valkey_cluster import Node, ValkeyCluster

# Short, so that a test waiting for a stopped replica is short too.
ACK_TIMEOUT = 300
# A failover takes a few seconds (``cluster-node-timeout 2000``).
FAILOVER = 6 * T


@pytest.fixture(scope="module")
def vcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    with ValkeyCluster(tmp_path_factory.mktemp("failover")) as c:
        yield c


def bal_key(prefix: str) -> str:
    return "{" + prefix + "}:bal"


def prefix_on_full_shard(vc: ValkeyCluster) -> tuple[str, Node, list[Node]]:
    """A new prefix whose slot's master has all its replicas online."""
    for i in range(10_000):
        prefix = f"f{time.monotonic_ns() % 10**9}x{i}"
        master = vc.master_of(bal_key(prefix))
        replicas = vc.replicas_of(master)
        if len(replicas) == vc.replicas:
            return prefix, master, replicas
    raise RuntimeError("no master with all its replicas")


def seeds(vc: ValkeyCluster) -> str:
    return "redis+cluster://" + ",".join(n.address for n in vc.live())


@contextlib.asynccontextmanager
async def hub_on(vc: ValkeyCluster, prefix: str, **overrides: Any) -> AsyncIterator[Hub]:
    """A hub on the cluster, audited when it stops: no coin created or lost."""
    cfg = base_config(prefix=prefix, ack_timeout=ACK_TIMEOUT, **overrides)
    async with running_hub(cfg, seeds(vc)) as hub:
        yield hub
        report = await hub.ledger.audit()
        assert report.ok, report.differences


@contextlib.asynccontextmanager
async def clients(hub: Hub, *users: str) -> AsyncIterator[list[Client]]:
    cs = [await Client.connect(ws_url(hub), token=mint(u), timeout=T) for u in users]
    try:
        yield cs
    finally:
        for c in cs:
            await c.close()


async def store_state(hub: Hub) -> StoreState:
    lg = hub.ledger
    rows: Any = await lg.r.xrange(lg.key("journal"), "-", "+")
    journal = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]
    raw: Any = await lg.r.hgetall(lg.bal)
    return StoreState(journal, {k.decode(): int(v) for k, v in raw.items()})


# -- kill -9 of the ledger's master mid-load ------------------------------------


@dataclass
class Load:
    room: str
    gift: str = "heart"
    acks: list[Ack] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    unavailable: int = 0
    timeouts: int = 0
    grew: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, c: Client, user: str, stop: asyncio.Event) -> None:
        """Gifts one at a time, each retried with its key until it is acked."""
        while not stop.is_set():
            key = new_key()
            while True:
                try:
                    res = await c.request("gift", room=self.room, gift=self.gift, key=key)
                    break
                except errors.Unavailable:
                    self.unavailable += 1
                except TimeoutError:
                    self.timeouts += 1
                await asyncio.sleep(0.05)
            cost = PRICES[self.gift]
            ack = Ack(
                user, key, self.room, self.gift, 1, cost, res["transfer"], res["duplicate"], ""
            )
            self.acks.append(ack)
            self.acked_at.append(time.monotonic())
            self.grew.set()

    async def until(self, n: int) -> None:
        while len(self.acks) < n:
            self.grew.clear()
            await self.grew.wait()


@pytest.mark.parametrize("ack_replicas", [pytest.param(0, marks=pytest.mark.full), 1])
async def test_kill9_of_the_ledger_master_mid_load(
    vcluster: ValkeyCluster, ack_replicas: int
) -> None:
    prefix, master, _ = prefix_on_full_shard(vcluster)
    senders = [f"s{i}" for i in range(4)]
    topup = 100_000
    async with hub_on(vcluster, prefix, ack_replicas=ack_replicas) as hub:
        for s in senders:
            await hub.ledger.topup(s, topup, "top-" + s)
        async with clients(hub, "alice", *senders) as (creator, *cs):
            await creator.request("go_live", title="failover")
            for c in cs:
                await c.request("join", room="alice")
            load = Load("alice")
            stop = asyncio.Event()
            async with asyncio.timeout(4 * FAILOVER), asyncio.TaskGroup() as tg:
                for user, c in zip(senders, cs, strict=True):
                    tg.create_task(load.send(c, user, stop))
                await load.until(40)
                before = load.unavailable

                vcluster.kill(master)

                promoted = await asyncio.to_thread(
                    vcluster.wait_serving, bal_key(prefix), but=master, timeout=FAILOVER
                )
                served = time.monotonic()
                at_failover = len(load.acks)
                # The hub recovers by itself: acks go on (with ``ack_replicas=1``,
                # once the promoted master's other replica follows it).
                await load.until(at_failover + 40)
                stop.set()
        assert load.unavailable > before, "the hub never answered unavailable during the failover"
        after = sum(1 for t in load.acked_at if t > served)
        assert after >= 40
        assert await hub.ledger.ping()
        if ack_replicas:
            # The promoted master kept a replica, which is why acks went on.
            assert vcluster.replicas_of(promoted)

        state = await store_state(hub)
        # A gift acked just before the death, not yet on a replica, is gone from
        # the promoted master (its idempotency key with it; its transfer id may
        # be handed out again). With ``ack_replicas`` there is none.
        lost = []
        for a in load.acks:
            got = await hub.ledger.r.hget(hub.ledger.key("idem", a.user, a.key), "transfer")
            if got is None or int(got) != a.transfer:
                lost.append(a)
        if ack_replicas:
            assert lost == [], f"acked gifts lost in the failover: {lost[:5]}"
        kept = [a for a in load.acks if a not in lost]
        problems = money_violations(
            state,
            topups=dict.fromkeys(senders, topup),
            acks=kept,
            creators={"alice": 0},
        )
        assert problems == [], problems
        print(
            f"ack_replicas={ack_replicas}: {len(load.acks)} acked, {len(lost)} lost, "
            f"{load.unavailable} unavailable answers, {after} acked after the failover"
        )


# -- WAIT honoured ------------------------------------------------------------


R = TypeVar("R")


async def acked(call: Callable[[], Awaitable[R]]) -> R:
    """``call`` retried after ``unavailable``, as a client retries with its key."""
    async with asyncio.timeout(T):
        while True:
            try:
                return await call()
            except errors.Unavailable:
                await asyncio.sleep(0.05)


async def test_a_stopped_replica_stops_the_acks_only_when_it_is_needed(
    vcluster: ValkeyCluster,
) -> None:
    prefix, master, replicas = prefix_on_full_shard(vcluster)
    stopped = replicas[0]
    async with (
        hub_on(vcluster, prefix, ack_replicas=2) as two,
        hub_on(vcluster, prefix, ack_replicas=1) as one,
    ):
        lg = two.ledger
        await lg.topup("bob", 1000, "top-1")
        await lg.go_live("alice", "acks")
        async with (
            clients(two, "bob") as (bob2,),
            clients(one, "bob") as (bob1,),
        ):
            await bob2.request("join", room="alice")
            await bob1.request("join", room="alice")
            first = await bob2.request("gift", room="alice", gift="rose", key="g0")
            assert not first["duplicate"] and first["coins"] == 999

            with vcluster.paused(stopped):
                # Two replicas wanted, one acking: the gift happens, is not acked.
                t0 = time.monotonic()
                with pytest.raises(errors.Unavailable):
                    await bob2.request("gift", room="alice", gift="rose", key="g1")
                assert time.monotonic() - t0 >= ACK_TIMEOUT / 1000 * 0.9
                with master.client() as r:
                    assert int(r.hget(bal_key(prefix), "bob") or 0) == 998
                # Its retries are no ack either, whichever connection of the
                # hub's pipeline they take: a duplicate waits like the move.
                for _ in range(3):
                    with pytest.raises(errors.Unavailable):
                        await bob2.request("gift", room="alice", gift="rose", key="g1")
                # The other coin moves wait the same.
                with pytest.raises(errors.Unavailable):
                    await bob2.request("effect", room="alice", effect="confetti", key="e1")
                with pytest.raises(errors.Unavailable):
                    await lg.topup("bob", 100, "top-2")
                # One replica wanted: acks go on (and see what the other hub did).
                g2 = await bob1.request("gift", room="alice", gift="rose", key="g2")
                assert not g2["duplicate"] and g2["coins"] == 998 - 20 + 100 - 1
                assert (await one.ledger.topup("bob", 5, "top-3")).coins == 1077 + 5

            # Running again, the replica catches up: every retry is acked, with
            # the first answer's transfer, and nothing moved twice.
            g1 = await acked(lambda: bob2.request("gift", room="alice", gift="rose", key="g1"))
            assert g1["duplicate"] and first["transfer"] < g1["transfer"] < g2["transfer"]
            e1 = await acked(
                lambda: bob2.request("effect", room="alice", effect="confetti", key="e1")
            )
            assert e1["duplicate"]
            assert (await acked(lambda: lg.topup("bob", 100, "top-2"))).duplicate
            assert (await bob2.request("balance"))["coins"] == 1082
        state = await store_state(two)
        kinds = [(e["kind"], int(e["t"])) for e in state.journal if e["kind"] != "topup"]
        transfers = [first["transfer"], g1["transfer"], e1["transfer"], g2["transfer"]]
        assert kinds == list(zip(["gift", "gift", "effect", "gift"], transfers, strict=True))
        assert len([e for e in state.journal if e["kind"] == "topup"]) == 3
        assert state.balances["bob"] == 1082
        assert sum(state.balances.values()) == 0


# -- a single server, and the flag --------------------------------------------


async def test_with_no_replica_to_wait_for_every_move_is_unavailable(
    own_store: EmbeddedStore,
) -> None:
    """A standalone store with no replica: ``WAIT 1`` always falls short, so
    every coin move happens and is answered ``unavailable``; reads go on."""
    async with running_hub(base_config(ack_replicas=1, ack_timeout=50), own_store.url) as hub:
        lg = hub.ledger
        with pytest.raises(errors.Unavailable):
            await lg.topup("bob", 100, "t1")
        assert await lg.balance("bob") == 100
        await lg.go_live("alice", "no replica")
        async with clients(hub, "bob") as (bob,):
            await bob.request("join", room="alice")
            for _ in range(2):  # the retry too
                with pytest.raises(errors.Unavailable):
                    await bob.request("gift", room="alice", gift="rose", key="g1")
            assert (await bob.request("balance"))["coins"] == 99
        report = await lg.audit()
        assert report.ok and report.entries == 2, report
    # A ledger with no pipeline (as the CLI's) sends the script and its WAIT
    # on a connection of its own.
    r = cluster.client(own_store.url, timeout=T)
    try:
        lg = Ledger(r, prefix=hub.config.prefix, ack_replicas=1, ack_timeout=50, url=own_store.url)
        await lg.load({"rose": 1})
        with pytest.raises(errors.Unavailable):
            await lg.topup("bob", 5, "t2")
        assert (await Ledger(r, prefix=hub.config.prefix).topup("bob", 5, "t2")).duplicate
        with pytest.raises(ValueError):
            Ledger(r, ack_replicas=1)
    finally:
        await r.aclose()


async def test_serve_validates_ack_replicas(tmp_path: Path) -> None:
    d = ("--data-dir", str(tmp_path / "data"), "--no-demo")
    runs = await asyncio.gather(
        cli("serve", "--port", "0", "--ack-replicas", "6", *d),
        cli("serve", "--port", "0", "--ack-replicas", "-1", *d),
        cli("serve", "--port", "0", "--ack-replicas", "1", "--ack-timeout", "0", *d),
        cli("serve", "--port", "0", "--ack-timeout", "2001", *d),
    )
    for ran in runs:
        assert ran.rc == 2 and "must be" in ran.err, ran
    assert not (tmp_path / "data" / "store.json").exists()
