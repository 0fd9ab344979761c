#!/usr/bin/env python3
"""Acked gifts/s through one hub, against a bare redis-py loop calling the same
Lua script with the same concurrency, and against redis-benchmark/valkey-benchmark
running the script (the store's own ceiling), all on one store in one run.

    scripts/bench/gifts.py [--senders 200] [--duration 10]
                           [--cluster] [--ack-replicas 0[,1,...]]

Each sender is one connection with one gift outstanding (closed loop), gifting
into its own live room, so fan-out is one bubble per gift to the sender itself.
Then an open-model run at half the measured rate gives the ack latency.

``--cluster`` runs it on a local Valkey Cluster (3 masters with 2 replicas
each, ``tests/valkey_cluster.py``) instead of one embedded store; there is no
store ceiling row then. ``--ack-replicas 0,1`` runs the hub once per value
(``serve --ack-replicas K``: a gift is acked once K replicas hold it), each on
a fresh prefix, and compares each with the first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from gifting import cluster  # noqa: E402
from gifting.config import DEFAULT_CATALOG  # noqa: E402
from gifting.ledger import Ledger  # noqa: E402
from gifting.ledger.partitioned import PartitionedLedger  # noqa: E402

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}


async def setup(url: str, prefix: str, senders: int, partitions: int = 1) -> Ledger:
    # One connection per concurrent sender, as the baseline loop needs.
    client = cluster.client(url, timeout=10, max_connections=senders + 8)
    ledger = (
        PartitionedLedger(client, partitions=partitions, prefix=prefix)
        if partitions > 1
        else Ledger(client, prefix=prefix)
    )
    await ledger.load(PRICES)
    for i in range(senders):
        await ledger.go_live(f"c{i}", "bench")
        await ledger.topup(f"s{i}", 10**12, f"bench-{i}")
    return ledger


class Sender(c.RawClient):
    def __init__(self, path: str, room: str, lat: list[float]) -> None:
        super().__init__(path, self.on_frame)
        self.room, self.lat, self.n = room, lat, 0
        self.sent_at = 0.0
        self.acked = 0
        self.errors = 0
        self.running = False
        self.idle = asyncio.Event()

    def gift(self) -> None:
        self.n += 1
        self.sent_at = time.perf_counter()
        self.send(
            msgpack.packb(
                {
                    "op": "gift",
                    "id": self.n % 2**30 + 1,
                    "room": self.room,
                    "gift": "rose",
                    "key": f"k{self.n}-{id(self)}",
                }
            )
        )

    def on_frame(self, data: bytes) -> int:
        msg = msgpack.unpackb(data)
        if "id" in msg:
            if "ok" in msg:
                self.acked += 1
                self.lat.append(time.perf_counter() - self.sent_at)
            else:
                self.errors += 1
            if self.running:
                self.gift()
            else:
                self.idle.set()
        return 0


async def hub_closed_loop(port: int, senders: int, duration: float) -> tuple[float, int]:
    lat: list[float] = []
    clients = []
    for i in range(senders):
        cl = await c.open_raw(port, f"/ws?token={c.token(f's{i}')}")
        clients.append(cl)
    ss = []
    for i, raw in enumerate(clients):
        s = Sender("", f"c{i}", lat)
        s.transport, s.open = raw.transport, raw.open
        raw.transport.set_protocol(s)  # type: ignore[union-attr]
        s.send(msgpack.packb({"op": "join", "id": 1, "room": f"c{i}"}))
        ss.append(s)
    await asyncio.sleep(1.0)  # joins answered (their replies start each loop below)
    for s in ss:
        s.running = True
        s.gift()
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    acked = sum(s.acked for s in ss)
    elapsed = time.perf_counter() - t0
    for s in ss:
        s.running = False
    await asyncio.sleep(0.5)
    errors = sum(s.errors for s in ss)
    for s in ss:
        s.transport.close()  # type: ignore[union-attr]
    return acked / elapsed, errors


async def hub_open_loop(port: int, senders: int, rate: float, duration: float) -> list[float]:
    """Gifts sent on a schedule (not after the previous ack): latency at a given rate."""
    lat: list[float] = []
    ss = []
    for i in range(senders):
        raw = await c.open_raw(port, f"/ws?token={c.token(f's{i}')}")
        s = Sender("", f"c{i}", [])
        s.transport, s.open = raw.transport, raw.open
        raw.transport.set_protocol(s)  # type: ignore[union-attr]
        s.send(msgpack.packb({"op": "join", "id": 1, "room": f"c{i}"}))
        ss.append(s)
    await asyncio.sleep(1.0)
    sent: dict[tuple[int, int], float] = {}

    def on_frame_for(idx: int, s: Sender):  # noqa: ANN202
        def on_frame(data: bytes) -> int:
            msg = msgpack.unpackb(data)
            t = sent.pop((idx, msg.get("id", -1)), None)
            if t is not None and "ok" in msg:
                lat.append(time.perf_counter() - t)
            return 0

        return on_frame

    for i, s in enumerate(ss):
        s.decode = on_frame_for(i, s)
    interval = 1.0 / rate
    start = time.perf_counter()
    n = int(rate * duration)
    for k in range(n):
        due = start + k * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        i = k % senders
        gid = k + 2
        sent[(i, gid)] = time.perf_counter()
        ss[i].send(
            msgpack.packb(
                {"op": "gift", "id": gid, "room": f"c{i}", "gift": "rose", "key": f"open{k}"}
            )
        )
    await asyncio.sleep(1.0)
    for s in ss:
        s.transport.close()  # type: ignore[union-attr]
    return lat


async def bare_loop(url: str, senders: int, duration: float) -> float:
    """The baseline: redis-py calling the same gift.lua, same concurrency."""
    ledger = await setup(url, "base", senders)
    script = ledger._gift  # the very script object the hub uses
    done = 0
    stop = False

    async def worker(i: int) -> None:
        nonlocal done
        n = 0
        while not stop:
            n += 1
            await script(
                keys=[ledger.bal],
                args=[f"s{i}", f"c{i}", "rose", 1, f"b{n}", "S", "", 50, 0, "", 100000, 172800],
            )
            done += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(senders)]
    await asyncio.sleep(0.5)
    d0, t0 = done, time.perf_counter()
    await asyncio.sleep(duration)
    rate = (done - d0) / (time.perf_counter() - t0)
    stop = True
    await asyncio.gather(*tasks)
    await ledger.r.aclose()
    return rate


def store_ceiling(url: str, senders: int) -> float | None:
    tool = shutil.which("valkey-benchmark") or shutil.which("redis-benchmark")
    if tool is None:
        return None
    import redis

    r = redis.Redis.from_url(url)
    sha = r.script_load((c.ROOT / "gifting" / "ledger" / "gift.lua").read_text())
    sock = url.removeprefix("unix://")
    args = [tool, "-s", sock] if url.startswith("unix://") else [tool, "-u", url]
    cmd = [
        *args,
        "-n",
        "200000",
        "-c",
        str(min(senders, 100)),
        "-P",
        "16",
        "-r",
        "100000000000",
        "-q",
        "EVALSHA",
        sha,
        "1",
        "{ceil}:bal",
        "s0",
        "c0",
        "rose",
        "1",
        "key:__rand_int__",
        "S",
        "",
        "50",
        "0",
        "",
        "100000",
        "172800",
    ]
    asyncio.run(setup_ceiling(url))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"([\d.]+) requests per second", out)
    return float(m.group(1)) if m else None


async def setup_ceiling(url: str) -> None:
    ledger = await setup(url, "ceil", 1)
    await ledger.r.aclose()


@contextlib.contextmanager
def a_store(tmp: Path, fsync: str, on_cluster: bool) -> Iterator[str]:
    if not on_cluster:
        with c.store(tmp, fsync) as st:
            yield st.url
        return
    from tests.valkey_cluster import ValkeyCluster

    with ValkeyCluster(tmp / "cluster") as vc:
        yield vc.url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--senders", type=int, default=200)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--fsync", default="always", choices=["always", "everysec"])
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    ap.add_argument("--cluster", action="store_true", help="a local 3x2 Valkey Cluster")
    ap.add_argument(
        "--ack-replicas",
        default="0",
        metavar="K[,K...]",
        help="serve --ack-replicas for each run of the hub (default 0)",
    )
    ap.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="serve --partitions N for the hub's runs (default 1; the bare loop stays on 1)",
    )
    args = ap.parse_args()
    if args.partitions > 1 and args.ack_replicas != "0":
        ap.error("--partitions and --ack-replicas do not go together")
    try:
        ks = [int(k) for k in args.ack_replicas.split(",")]
    except ValueError:
        ap.error("--ack-replicas takes integers separated by commas")
    c.raise_nofile()
    runs: list[tuple[int, float, int, float, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp, a_store(Path(tmp), args.fsync, args.cluster) as url:
        for i, k in enumerate(ks):
            prefix = f"bench{i}"  # a fresh prefix per run: no key of a run is reused
            asyncio.run(setup_and_close(url, prefix, args.senders, args.partitions))
            flags = ("--loop", args.loop, "--ack-replicas", str(k))
            if args.partitions > 1:
                flags = (*flags, "--partitions", str(args.partitions))
            with c.hub_process(url, *flags, prefix=prefix) as (port, _pid):
                rate, errors = asyncio.run(hub_closed_loop(port, args.senders, args.duration))
                lat = sorted(
                    asyncio.run(hub_open_loop(port, args.senders, rate / 2, args.duration))
                )
            runs.append((k, rate, errors, rate / 2, lat))
        bare = asyncio.run(bare_loop(url, args.senders, args.duration))
        ceiling = None if args.cluster else store_ceiling(url, args.senders)

    def pct(lat: list[float], p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    k0, first, _, half, lat = runs[0]
    tag = f", --ack-replicas {k0}" if ks != [0] else ""
    rows = [
        c.row(f"hub acked gifts/s vs bare redis-py loop{tag}", first, bare, "gifts/s"),
    ]
    if not args.cluster:
        rows.append(
            c.row(
                "hub acked gifts/s vs store ceiling",
                first,
                ceiling,
                "gifts/s",
                note="redis-benchmark EVALSHA -P 16" if ceiling else "no *-benchmark on PATH",
            )
        )
    for k, rate, _, _, _ in runs[1:]:
        rows.append(c.row(f"hub acked gifts/s, --ack-replicas {k} vs {k0}", rate, first, "gifts/s"))
    for k, _, _, half, lat in runs:
        tag = f", --ack-replicas {k}" if ks != [0] else ""
        for name, p in (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)):
            rows.append(
                c.row(f"ack {name} at half max ({half:.0f}/s){tag}", pct(lat, p), None, "ms")
            )
    name = "gifts" + ("-cluster" if args.cluster else "")
    name += "" if ks == [0] else "-ack" + "-".join(map(str, ks))
    name += "" if args.partitions == 1 else f"-p{args.partitions}"
    c.write_result(
        name,
        rows,
        {
            "senders": args.senders,
            "duration": args.duration,
            "fsync": args.fsync,
            "store": "cluster 3x2" if args.cluster else "embedded",
            "partitions": args.partitions,
            "hub_errors": {k: errors for k, _, errors, _, _ in runs},
            "open_loop_samples": {k: len(lat) for k, _, _, _, lat in runs},
        },
    )
    return 0


async def setup_and_close(url: str, prefix: str, senders: int, partitions: int = 1) -> None:
    ledger = await setup(url, prefix, senders, partitions)
    await ledger.r.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
