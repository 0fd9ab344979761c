#!/usr/bin/env python3
"""Store CPU per gift: the one-slot ``gift.lua`` against the partitioned steps
(``gift_debit.lua``, ``gift_credit.lua``, the ack ``HDEL``), docs/scaling.md §6.

    scripts/bench/partition_cost.py [--gifts 20000] [--partitions 4]

One embedded store, no hub: each step is sent pipelined (500 per round trip)
from one sync client, and the store's own CPU (``INFO cpu``) is read around
it, so the figures are what the store spends per call, pipelining included.
Senders and rooms are spread so that every partitioned gift crosses
partitions. With N partitions on N masters, the busiest master's share of a
gift is about (debit + credit + ack) / N of the total below.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from gifting import cluster  # noqa: E402
from gifting.config import DEFAULT_CATALOG  # noqa: E402
from gifting.ledger import Ledger  # noqa: E402
from gifting.ledger.partitioned import PartitionedLedger, partition_of  # noqa: E402

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}
USERS = 200
BATCH = 500


def cpu(r: redis.Redis) -> float:
    info: Any = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def setup(url: str, lg_kind: str, parts: int) -> tuple[Any, list[str], list[str]]:
    client = cluster.client(url, timeout=10)
    lg: Ledger = (
        PartitionedLedger(client, partitions=parts, prefix="pc")
        if lg_kind == "part"
        else Ledger(client, prefix="one")
    )
    await lg.load(PRICES)
    senders = [f"s{i}" for i in range(USERS)]
    rooms = [f"c{i}" for i in range(USERS)]
    for s, room in zip(senders, rooms, strict=True):
        await lg.topup(s, 10**12, f"bench-{s}")
        await lg.go_live(room, "bench")
    await client.aclose()
    return lg, senders, rooms


def pairs(n: int, parts: int) -> list[tuple[str, str]]:
    out = []
    i = 0
    while len(out) < n:
        s, room = f"s{i % USERS}", f"c{(i * 7 + 3) % USERS}"
        if parts == 1 or partition_of(s, parts) != partition_of(room, parts):
            out.append((s, room))
        i += 1
    return out


def timed(r: redis.Redis, calls: list[tuple[Any, ...]]) -> tuple[float, list[Any]]:
    """Store CPU seconds spent on ``calls`` (pipelined), and their replies."""
    before = cpu(r)
    out: list[Any] = []
    for i in range(0, len(calls), BATCH):
        p = r.pipeline(transaction=False)
        for call in calls[i : i + BATCH]:
            p.execute_command(*call)
        out.extend(p.execute())
    return cpu(r) - before, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gifts", type=int, default=20000)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    n, parts = args.gifts, args.partitions
    with tempfile.TemporaryDirectory() as tmp, c.store(Path(tmp), "everysec") as st:
        r = redis.Redis.from_url(st.url)
        one, _, _ = asyncio.run(setup(st.url, "one", 1))
        pl, _, _ = asyncio.run(setup(st.url, "part", parts))
        assert isinstance(pl, PartitionedLedger)
        gift_sha = one._gift.sha
        calls = [
            ("EVALSHA", gift_sha, 1, one.bal, s, room, "rose", 1, f"k{i}", "S", "", 50, 0, "")
            + (100000, 172800, 0)
            for i, (s, room) in enumerate(pairs(n, 1))
        ]
        t0 = time.perf_counter()
        gift_cpu, _ = timed(r, calls)
        gift_wall = time.perf_counter() - t0
        gp = pairs(n, parts)
        debits = [
            (
                "EVALSHA",
                pl._debit.sha,
                1,
                pl.bal_at(pl.part(s)),
                *(s, room, "rose", 1, f"k{i}", "S", "", 50, 0, "", 172800, 0, 1),
                *(parts, pl.part(s), pl.part(room)),
            )
            for i, (s, room) in enumerate(gp)
        ]
        debit_cpu, res = timed(r, debits)
        entries = [x[4] for x in res]
        credits = [
            ("EVALSHA", pl._credit.sha, 1, pl.bal_at(pl.part(room)), e, 100000, 172800)
            for e, (_, room) in zip(entries, gp, strict=True)
        ]
        credit_cpu, res = timed(r, credits)
        assert all(int(x) == 1 for x in res), res[:3]
        acks = [("HDEL", pl.key_at(t % parts, "out"), t) for t in _transfers(entries)]
        ack_cpu, _ = timed(r, acks)
        report = asyncio.run(_audit(st.url, parts))
        r.close()
    us = 1e6 / n
    rows = [
        c.row("gift.lua (one slot), store CPU per gift", gift_cpu * us, None, "µs"),
        c.row("gift_debit.lua, per gift", debit_cpu * us, gift_cpu * us, "µs"),
        c.row("gift_credit.lua, per gift", credit_cpu * us, gift_cpu * us, "µs"),
        c.row("ack (HDEL), per gift", ack_cpu * us, gift_cpu * us, "µs"),
        c.row(
            "partitioned total, per gift",
            (debit_cpu + credit_cpu + ack_cpu) * us,
            gift_cpu * us,
            "µs",
        ),
    ]
    c.write_result(
        f"partition-cost-p{parts}",
        rows,
        {
            "gifts": n,
            "partitions": parts,
            "batch": BATCH,
            "gift_wall_s": round(gift_wall, 3),
            "audit_ok": report,
        },
    )
    return 0


def _transfers(entries: list[bytes]) -> list[int]:
    return [int(msgpack.unpackb(e, raw=False)["t"]) for e in entries]


async def _audit(url: str, parts: int) -> bool:
    client = cluster.client(url, timeout=30)
    try:
        rep = await PartitionedLedger(client, partitions=parts, prefix="pc").audit()
        return rep.ok and rep.in_flight == 0
    finally:
        await client.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
