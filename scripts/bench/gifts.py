#!/usr/bin/env python3
"""Acked gifts/s through one hub, against a bare redis-py loop calling the same
Lua script with the same concurrency, and against redis-benchmark/valkey-benchmark
running the script (the store's own ceiling), all on one store in one run.

    scripts/bench/gifts.py [--senders 200] [--duration 10]

Each sender is one connection with one gift outstanding (closed loop), gifting
into its own live room, so fan-out is one bubble per gift to the sender itself.
Then an open-model run at half the measured rate gives the ack latency.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from gifting.config import DEFAULT_CATALOG  # noqa: E402
from gifting.ledger import Ledger  # noqa: E402

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}


async def setup(url: str, prefix: str, senders: int) -> Ledger:
    import redis.asyncio as aioredis

    # One connection per concurrent sender, as the baseline loop needs.
    ledger = Ledger(aioredis.Redis.from_url(url, max_connections=senders + 8), prefix=prefix)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--senders", type=int, default=200)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--fsync", default="always", choices=["always", "everysec"])
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    args = ap.parse_args()
    c.raise_nofile()
    with tempfile.TemporaryDirectory() as tmp, c.store(Path(tmp), args.fsync) as st:
        asyncio.run(setup_and_close(st.url, args.senders))
        with c.hub_process(st.url, "--loop", args.loop) as (port, _pid):
            hub_rate, hub_errors = asyncio.run(hub_closed_loop(port, args.senders, args.duration))
            half = hub_rate / 2
            lat = sorted(asyncio.run(hub_open_loop(port, args.senders, half, args.duration)))
        bare = asyncio.run(bare_loop(st.url, args.senders, args.duration))
        ceiling = store_ceiling(st.url, args.senders)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    rows = [
        c.row("hub acked gifts/s vs bare redis-py loop", hub_rate, bare, "gifts/s"),
        c.row(
            "hub acked gifts/s vs store ceiling",
            hub_rate,
            ceiling,
            "gifts/s",
            note="redis-benchmark EVALSHA -P 16" if ceiling else "no *-benchmark on PATH",
        ),
        c.row(f"ack p50 at half max ({half:.0f}/s)", pct(0.50), None, "ms"),
        c.row(f"ack p99 at half max ({half:.0f}/s)", pct(0.99), None, "ms"),
        c.row(f"ack p99.9 at half max ({half:.0f}/s)", pct(0.999), None, "ms"),
    ]
    c.write_result(
        "gifts",
        rows,
        {
            "senders": args.senders,
            "duration": args.duration,
            "fsync": args.fsync,
            "hub_errors": hub_errors,
            "open_loop_samples": len(lat),
        },
    )
    return 0


async def setup_and_close(url: str, senders: int) -> None:
    ledger = await setup(url, "bench", senders)
    await ledger.r.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
