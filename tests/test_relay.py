"""A proof of the partitioned ledger's cross-partition transfer (docs/scaling.md).

Not wired into the hub: a minimal, self-contained model of the design that lets
the ledger outgrow one slot, run against the session's real store: a single
Valkey, and (``full``) the 3-master cluster, where the four partitions are
slots served by different masters. Each partition is one hash tag
(``{<ns>:p<k>}``); every script below touches the keys of ONE partition only
(it derives them from ``KEYS[1]``, as ``gifting/ledger/*.lua`` do).

A gift from a sender in partition S to a creator in partition D is three steps:

  debit   (in S)  checks, then debits the sender AND writes the outbox entry and
                  the sender's idempotency key: one script, so all or nothing
  credit  (in D)  applies the outbox entry once (a second call with the same
                  transfer id changes nothing), then publishes the bubble
  ack     (in S)  drops the outbox entry

The hub runs the three in a row; a relay drains whatever a crash left in an
outbox (after a hub crash: debited, not credited; after a relay crash: credited,
not acked). The audit reads each partition atomically, in any order, while
transfers move, and still balances exactly: every coin is in a balance or in
a transfer debited but not yet credited (``in flight``).

Partition keys (T = the partition's tag):

    T:bal          HASH   account -> coins; "~issuer" (negative) and "~platform"
                          are per-partition sub-accounts of the global ones
    T:seq          STRING the partition's transfer counter; a transfer id is
                          "<T>#<n>", unique over all partitions
    T:out          HASH   the outbox: transfer -> "D|creator|earned|fee|sender"
    T:sent         HASH   transfer -> "coins|D", every debit ever made here
    T:applied      HASH   transfer -> coins, every credit ever applied here
    T:idem:<u>:<k> HASH   body, transfer (a sender's idempotency key)
    T:room:<room>  HASH   seq (the room's event counter); also the SPUBLISH channel
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from gifting import cluster

TOPUP = """
local bal = KEYS[1]
local user, coins = ARGV[1], tonumber(ARGV[2])
redis.call('HINCRBY', bal, '~issuer', -coins)
return redis.call('HINCRBY', bal, user, coins)
"""

# KEYS[1] S:bal. ARGV sender, dest tag, creator, coins, key, creator share %.
DEBIT = """
local bal = KEYS[1]
local T = string.sub(bal, 1, -5)
local sender, dest, creator, key = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local coins, share = tonumber(ARGV[4]), tonumber(ARGV[6])
if not coins or coins < 1 or coins ~= math.floor(coins) then
  return redis.error_reply('bad_request coins must be a positive integer')
end
local body = dest .. '|' .. creator .. '|' .. ARGV[4]
local idem = T .. ':idem:' .. sender .. ':' .. key
local seen = redis.call('HMGET', idem, 'body', 'transfer')
if seen[1] then
  if seen[1] ~= body then
    return redis.error_reply('conflict key already used for another transfer')
  end
  return {seen[2], 1}
end
local have = tonumber(redis.call('HGET', bal, sender) or '0')
if have < coins then
  return redis.error_reply('insufficient_funds need ' .. coins .. ', have ' .. have)
end
-- Every check passed: from here on, write (and nothing below can fail).
local xfer = T .. '#' .. redis.call('INCR', T .. ':seq')
local earned = math.floor(coins * share / 100)
redis.call('HINCRBY', bal, sender, -coins)
redis.call('HSET', T .. ':out', xfer,
  table.concat({dest, creator, earned, coins - earned, sender}, '|'))
redis.call('HSET', T .. ':sent', xfer, coins .. '|' .. dest)
redis.call('HSET', idem, 'body', body, 'transfer', xfer)
return {xfer, 0}
"""

# KEYS[1] D:bal. ARGV transfer, creator, earned, fee, sender.
CREDIT = """
local bal = KEYS[1]
local T = string.sub(bal, 1, -5)
local xfer, creator, sender = ARGV[1], ARGV[2], ARGV[5]
local earned, fee = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HEXISTS', T .. ':applied', xfer) == 1 then
  return 0
end
redis.call('HINCRBY', bal, creator, earned)
if fee > 0 then
  redis.call('HINCRBY', bal, '~platform', fee)
end
redis.call('HSET', T .. ':applied', xfer, earned + fee)
local room = T .. ':room:' .. creator
local seq = redis.call('HINCRBY', room, 'seq', 1)
redis.call('SPUBLISH', room, cmsgpack.pack({transfer = xfer, seq = seq, from = sender,
  coins = earned + fee}))
return 1
"""

# KEYS[1] S:bal. ARGV transfer.
ACK = """
local T = string.sub(KEYS[1], 1, -5)
return redis.call('HDEL', T .. ':out', ARGV[1])
"""

# KEYS[1] T:bal. One partition's state in one atomic read.
READ = """
local T = string.sub(KEYS[1], 1, -5)
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', T .. ':sent'),
  redis.call('HGETALL', T .. ':applied'), redis.call('HGETALL', T .. ':out')}
"""


class RelayCrash(Exception):
    """Raised by the relay where a test makes it die."""


def _pairs(flat: list[bytes]) -> dict[str, str]:
    it = iter(flat)
    return {k.decode(): v.decode() for k, v in zip(it, it, strict=True)}


@dataclass
class Audit:
    total: int  # the sum of every balance of every partition (issuers negative)
    in_flight: int  # transfers debited, not credited
    in_flight_coins: int
    ack_pending: int  # outbox entries already credited
    orphans: list[str]  # debited, not credited, not in the outbox: lost (see audit)

    @property
    def balanced(self) -> bool:
        return self.total + self.in_flight_coins == 0 and not self.orphans


class Ledger:
    """Partitions ``{<ns>:p0}`` ... of one namespace, and the model's scripts."""

    def __init__(self, r: Any, parts: int) -> None:
        self.r = r
        # Partitions in as many slots, and on a cluster on more than one master
        # (the draw rarely fails: a clash of slots is ~1 in 2,700).
        for _ in range(100):
            ns = "rl" + uuid.uuid4().hex[:8]
            self.tags = [f"{{{ns}:p{k}}}" for k in range(parts)]
            if len({key_slot(self.bal(t).encode()) for t in self.tags}) == parts and (
                len(self.masters()) != 1
            ):
                break
        self.topup_ = r.register_script(TOPUP)
        self.debit_ = r.register_script(DEBIT)
        self.credit_ = r.register_script(CREDIT)
        self.ack_ = r.register_script(ACK)
        self.read_ = r.register_script(READ)

    def masters(self) -> set[str]:
        """The masters serving the partitions (none named on a single server)."""
        if not isinstance(self.r, RedisCluster):
            return set()
        return {self.r.get_node_from_key(self.bal(t)).name for t in self.tags}

    def tag_of(self, user: str) -> str:
        """The user's partition (a fixed spread; production would hash the id)."""
        return self.tags[int(user.rsplit("u", 1)[1]) % len(self.tags)]

    def bal(self, tag: str) -> str:
        return f"{tag}:bal"

    def topup(self, user: str, coins: int) -> None:
        self.topup_(keys=[self.bal(self.tag_of(user))], args=[user, coins])

    def debit(self, sender: str, creator: str, coins: int, key: str, share: int = 50) -> str:
        res: Any = self.debit_(
            keys=[self.bal(self.tag_of(sender))],
            args=[sender, self.tag_of(creator), creator, coins, key, share],
        )
        return str(res[0].decode())

    def outbox(self, tag: str) -> dict[str, list[str]]:
        raw: Any = self.r.hgetall(f"{tag}:out")
        return {k.decode(): v.decode().split("|") for k, v in raw.items()}

    def credit(self, xfer: str, entry: list[str]) -> int:
        dest, creator, earned, fee, sender = entry
        return int(self.credit_(keys=[self.bal(dest)], args=[xfer, creator, earned, fee, sender]))

    def ack(self, xfer: str) -> int:
        return int(self.ack_(keys=[self.bal(xfer.split("#", 1)[0])], args=[xfer]))

    def gift(self, sender: str, creator: str, coins: int, key: str) -> str:
        """The hub's path: debit, credit, ack, one after the other."""
        xfer = self.debit(sender, creator, coins, key)
        self.credit(xfer, self.outbox(self.tag_of(sender))[xfer])
        self.ack(xfer)
        return xfer

    def relay(self, *, crash_after_credit: str | None = None, limit: int = 10_000) -> int:
        """Drain every outbox, oldest first; returns the credits it applied."""
        applied = 0
        for tag in self.tags:
            box = self.outbox(tag)
            for xfer in sorted(box, key=lambda x: int(x.rsplit("#", 1)[1]))[:limit]:
                applied += self.credit(xfer, box[xfer])
                if xfer == crash_after_credit:
                    raise RelayCrash(xfer)
                self.ack(xfer)
        return applied

    def read(self, tag: str) -> list[dict[str, str]]:
        raw: Any = self.read_(keys=[self.bal(tag)])
        return [_pairs(part) for part in raw]

    def audit(self, order: list[str] | None = None, between: Any = None) -> Audit:
        """Read each partition atomically, in ``order`` (``between()`` runs after
        each read: transfers keep moving), then balance the books by transfer id.

        A debit read without its credit is in flight (+coins); a credit read
        without its debit (the debit happened after its partition was read)
        is taken back (-coins). Whatever the order, each transfer then counts 0.

        Lost transfers (debited, never to be credited) are those in flight whose
        outbox entry is gone, counted only where the creator's partition was
        read after the sender's: an entry is acked only after its credit, so it
        cannot be gone from a sender read before a creator that lacks the credit.
        """
        total: int = 0
        sent: dict[str, str] = {}
        applied: dict[str, str] = {}
        out: dict[str, str] = {}
        when: dict[str, int] = {}
        for i, tag in enumerate(order or self.tags):
            bal, s, a, o = self.read(tag)
            when[tag] = i
            total += sum(int(v) for v in bal.values())
            sent.update(s)
            applied.update(a)
            out.update(o)
            if between is not None:
                between()
        flying = {x: v.split("|") for x, v in sent.items() if x not in applied}
        early = sum(int(c) for x, c in applied.items() if x not in sent)
        return Audit(
            total=total - early,
            in_flight=len(flying),
            in_flight_coins=sum(int(c) for c, _ in flying.values()),
            ack_pending=sum(1 for x in out if x in applied),
            orphans=sorted(
                x
                for x, (_, dest) in flying.items()
                if x not in out and when[dest] > when[x.split("#", 1)[0]]
            ),
        )

    def balance(self, user: str) -> int:
        return int(self.r.hget(self.bal(self.tag_of(user)), user) or 0)  # type: ignore[arg-type]

    def keys_count(self) -> int:
        return sum(1 for tag in self.tags for _ in self.r.scan_iter(match=f"{tag}*", count=1000))


def _client(url: str) -> Any:
    """A sync client for the session's store: one server, or a cluster, where
    the partitions really are slots on different masters."""
    if not cluster.is_cluster(url):
        return redis.Redis.from_url(url)
    seeds = cluster.parse(url)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds.nodes])


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    r = _client(store_url)
    lg = Ledger(r, 4)
    yield lg
    for tag in lg.tags:
        for k in list(r.scan_iter(match=f"{tag}*", count=1000)):
            r.delete(k)
    r.close()


def test_partitions_are_distinct_slots(ledger: Ledger) -> None:
    # Otherwise this would prove nothing about a cluster: every script call
    # names one partition's keys, and the partitions live in different slots.
    slots = {key_slot(ledger.bal(t).encode()) for t in ledger.tags}
    assert len(slots) == len(ledger.tags)
    if isinstance(ledger.r, RedisCluster):
        assert len(ledger.masters()) >= 2  # transfers really cross masters
    for tag in ledger.tags:
        keys = [f"{tag}:{k}" for k in ("bal", "seq", "out", "sent", "applied", "room:u1")]
        assert len({key_slot(k.encode()) for k in keys}) == 1


def test_debit_and_outbox_are_one_step(ledger: Ledger) -> None:
    ledger.topup("u1", 100)
    src = ledger.tag_of("u1")
    assert src != ledger.tag_of("u2")
    before = ledger.read(src)
    # Refused: nothing written, not even the transfer counter.
    with pytest.raises(redis.ResponseError, match="insufficient_funds"):
        ledger.debit("u1", "u2", 101, "k1")
    with pytest.raises(redis.ResponseError, match="bad_request"):
        ledger.debit("u1", "u2", 0, "k1")
    assert ledger.read(src) == before
    assert ledger.r.get(f"{src}:seq") is None
    # Accepted: the balance, the outbox entry and the key, together.
    xfer = ledger.debit("u1", "u2", 30, "k1")
    assert ledger.balance("u1") == 70
    assert ledger.outbox(src) == {xfer: [ledger.tag_of("u2"), "u2", "15", "15", "u1"]}
    assert ledger.balance("u2") == 0  # not credited yet: in flight
    a = ledger.audit()
    assert (a.in_flight, a.in_flight_coins, a.balanced) == (1, 30, True)
    # A retry with the key is the same transfer, with no second outbox entry;
    # the key for another body is refused and moves nothing.
    res: Any = ledger.debit_(
        keys=[ledger.bal(src)], args=["u1", ledger.tag_of("u2"), "u2", 30, "k1", 50]
    )
    assert [res[0].decode(), res[1]] == [xfer, 1]
    with pytest.raises(redis.ResponseError, match="conflict"):
        ledger.debit("u1", "u2", 31, "k1")
    assert len(ledger.outbox(src)) == 1 and ledger.balance("u1") == 70


def test_relay_applies_a_crashed_hubs_transfer_once(ledger: Ledger) -> None:
    ledger.topup("u1", 100)
    dest = ledger.tag_of("u2")
    sub = ledger.r.pubsub()
    sub.ssubscribe(f"{dest}:room:u2")
    assert sub.get_sharded_message(timeout=5)["type"] == "ssubscribe"  # type: ignore[index]
    xfer = ledger.debit("u1", "u2", 40, "k1")  # ... and the hub dies here
    assert ledger.relay() == 1
    assert (ledger.balance("u1"), ledger.balance("u2")) == (60, 20)
    assert ledger.r.hget(f"{dest}:bal", "~platform") == b"20"
    assert ledger.outbox(ledger.tag_of("u1")) == {}
    a = ledger.audit()
    assert (a.total, a.in_flight, a.ack_pending, a.balanced) == (0, 0, 0, True)
    # Drained: another pass, or the dead hub's late credit, changes nothing.
    assert ledger.relay() == 0
    assert ledger.credit(xfer, [dest, "u2", "20", "20", "u1"]) == 0
    assert ledger.balance("u2") == 20
    msg = sub.get_sharded_message(timeout=5)
    assert msg is not None and msg["type"] == "smessage"
    assert sub.get_sharded_message(timeout=0.3) is None  # one bubble, not two
    sub.close()


def test_relay_crash_between_credit_and_ack_applies_nothing_twice(ledger: Ledger) -> None:
    ledger.topup("u1", 100)
    ledger.topup("u5", 100)  # same partition as u1 (4 partitions)
    x1 = ledger.debit("u1", "u2", 10, "a")
    x2 = ledger.debit("u5", "u3", 20, "b")
    with pytest.raises(RelayCrash):
        ledger.relay(crash_after_credit=x1)
    # x1 credited but still in the outbox; x2 untouched (oldest first).
    a = ledger.audit()
    assert (a.in_flight, a.in_flight_coins, a.ack_pending, a.balanced) == (1, 20, 1, True)
    assert ledger.balance("u2") == 5
    # The next relay credits x2, finds x1 applied (acks it, credits nothing).
    assert ledger.relay() == 1
    assert (ledger.balance("u2"), ledger.balance("u3")) == (5, 10)
    assert ledger.outbox(ledger.tag_of("u1")) == {}
    a = ledger.audit()
    assert (a.total, a.in_flight, a.ack_pending, a.balanced) == (0, 0, 0, True)
    assert ledger.r.hget(f"{ledger.tag_of('u2')}:room:u2", "seq") == b"1"
    assert x2 not in ledger.outbox(ledger.tag_of("u5"))


def test_hub_and_relay_racing_on_one_transfer_credit_once(ledger: Ledger) -> None:
    ledger.topup("u1", 50)
    xfer = ledger.debit("u1", "u2", 50, "k")
    entry = ledger.outbox(ledger.tag_of("u1"))[xfer]
    # A relay pass credits while the (slow, not dead) hub does the same.
    assert ledger.credit(xfer, entry) + ledger.relay() + ledger.credit(xfer, entry) == 1
    assert ledger.ack(xfer) == 0  # the relay acked it already
    assert ledger.balance("u2") == 25
    assert ledger.audit().balanced


@pytest.mark.parametrize("seed", [20261129, 7, 4242])
def test_audit_balances_at_any_cut_while_transfers_move(ledger: Ledger, seed: int) -> None:
    """Random gifts, hub crashes, relay crashes and relay passes, with audits
    whose partition reads (in a random order) are interleaved with them."""
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(12)]
    for u in users:
        ledger.topup(u, 1_000)
    keys = iter(range(10**6))

    def step() -> None:
        op = rng.random()
        s, d = rng.sample(users, 2)
        coins = rng.randint(1, 60)
        try:
            if op < 0.45:
                ledger.gift(s, d, coins, f"g{next(keys)}")
            elif op < 0.75:
                ledger.debit(s, d, coins, f"g{next(keys)}")  # the hub dies after the debit
            elif op < 0.9:
                boxes = [x for t in ledger.tags for x in ledger.outbox(t)]
                victim = rng.choice(boxes) if boxes else None
                with pytest.raises(RelayCrash) if victim else contextlib.nullcontext():
                    ledger.relay(crash_after_credit=victim)
            else:
                ledger.relay(limit=rng.randint(0, 3))
        except redis.ResponseError as exc:
            assert str(exc).startswith("insufficient_funds")

    audits = 0
    for _ in range(400):
        step()
        if rng.random() < 0.2:
            order = rng.sample(ledger.tags, len(ledger.tags))
            a = ledger.audit(order, between=step)  # transfers move between the reads
            assert a.balanced, a
            audits += 1
    assert audits > 20
    ledger.relay()
    final = ledger.audit()
    assert (final.total, final.in_flight, final.ack_pending, final.orphans) == (0, 0, 0, [])
    assert all(ledger.outbox(t) == {} for t in ledger.tags)
    assert all(ledger.balance(u) >= 0 for u in users)
    # Every debit was credited exactly once: per transfer, sent == applied.
    sent: dict[str, str] = {}
    applied: dict[str, str] = {}
    for t in ledger.tags:
        _, s, a_, _ = ledger.read(t)
        sent.update(s)
        applied.update(a_)
    assert {x: v.split("|")[0] for x, v in sent.items()} == applied


def test_audit_catches_a_lost_or_forged_transfer(ledger: Ledger) -> None:
    ledger.topup("u1", 100)
    xfer = ledger.debit("u1", "u2", 10, "k")
    ledger.r.hdel(f"{ledger.tag_of('u1')}:out", xfer)  # the outbox entry lost
    a = ledger.audit()
    assert a.orphans == [xfer] and not a.balanced
    ledger.topup("u3", 10)
    y = ledger.gift("u3", "u2", 10, "k")
    ledger.r.hincrby(f"{ledger.tag_of('u2')}:bal", "u2", 5)  # a credit applied twice
    a = ledger.audit()
    assert a.total + a.in_flight_coins == 5 and not a.balanced
    assert y not in ledger.outbox(ledger.tag_of("u3"))
