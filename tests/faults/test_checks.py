"""The fault tests' money checks catch what they are there to catch.

A few gifts are made through the ledger (no hub needed) and recorded as acked;
the checks pass. Then the store or the record is tampered with, one fault at a
time, and each must be reported: a gift paid twice under a second key nobody
was told about (which ``gifting audit`` alone cannot see: the journal still
matches the balances), an acked gift missing from the journal, a balance
changed behind the journal's back, a negative balance.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from gifting.ledger import Ledger
from protocol.client import new_key
from tests.faults.clients import PRICES, Ack
from tests.faults.cluster import Cluster


async def _gift(ledger: Ledger, user: str, gift: str, key: str | None = None) -> Ack:
    key = key or new_key()
    res = await ledger.gift(
        sender=user, room="alice", gift=gift, count=1, key=key, name=user, avatar=None
    )
    return Ack(user, key, "alice", gift, 1, PRICES[gift], res.transfer, res.duplicate, "-")


async def test_money_checks_and_audit_catch_tampering(cluster: Cluster) -> None:
    await cluster.go_live("alice")
    await cluster.topup("bob", 1000)
    r = aioredis.Redis.from_url(cluster.url)
    try:
        ledger = Ledger(r, prefix=cluster.prefix)
        await ledger.load(PRICES)
        acks = [await _gift(ledger, "bob", g) for g in ("rose", "star", "cake", "heart")]
        again = await _gift(ledger, "bob", "star", key=acks[1].key)  # a retry: no new spend
        assert again.duplicate and again.transfer == acks[1].transfer
        assert await cluster.violations(acks, creators={"alice": 0}) == []
        assert (await cluster.audit())[0] == 0

        # A retry under a new key pays a second time; the sender is told only once.
        await _gift(ledger, "bob", "star")
        problems = await cluster.violations(acks, creators={"alice": 0})
        assert any("no ack reported" in p for p in problems), problems
        assert any(p.startswith("bob: balance 924, expected") for p in problems), problems
        assert any(p.startswith("creator alice:") for p in problems), problems
        assert (await cluster.audit())[0] == 0, "the journal itself is consistent"

        # An acked gift vanishes from the journal.
        journal = f"{{{cluster.prefix}}}:journal"
        rows = await r.xrange(journal)
        victim = next(i for i, f in rows if int(f[b"t"]) == acks[0].transfer)
        await r.xdel(journal, victim)
        problems = await cluster.violations(acks, complete=False)
        assert any("in the journal 0 times" in p for p in problems), problems
        rc, out = await cluster.audit()
        assert rc == 1 and "DIFFERENCE" in out, out

        # Coins appear behind the journal's back; an account goes negative.
        await r.hincrby(f"{{{cluster.prefix}}}:bal", "carol", -5)
        problems = await cluster.violations(acks, complete=False)
        assert "account carol: negative balance -5" in problems, problems
        assert any("sum to" in p for p in problems), problems
        rc, out = await cluster.audit()
        assert rc == 1 and "carol" in out, out
    finally:
        await r.aclose()
