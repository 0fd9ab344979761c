#!/usr/bin/env python3
"""Slow consumers at scale: a hot room of normal viewers while hundreds of clients
in it stop reading. What they cost the hub (memory) and the others (latency),
and that each is evicted with 4009.

    scripts/bench/stalled.py [--viewers 200] [--stalled 500] [--rate 1000]

One store, one hub subprocess, one live room. ``--viewers`` normal viewers
join it and read everything; ``--sampled`` of them decode every bubble and
record its latency: their clock at the read minus the bubble's ``time`` (the
store's clock at the commit, ms; same machine). ``--senders`` connections send
gifts open-loop at ``--rate`` gifts/s in all, through three phases of one run:

1. without: the normal viewers only, for ``--baseline`` s (the first second
   is warm-up and not counted);
2. with: ``--stalled`` clients connect (raw sockets with a 2 KiB receive buffer
   and 536-byte segments, or loopback would buffer megabytes for them), join the
   room and never read again; the phase lasts until the hub's eviction counter
   says all of them are gone (or ``--stalled-max`` s), plus the 2 s the hub
   gives a closing client before it aborts the socket;
3. after: ``--after`` s more with the normal viewers only again.

Reported: bubble latency p50/p99 with vs without the stalled clients (and
after vs without), hub RSS before the stalled clients, at its peak (sampled
every 50 ms, and the kernel's high-water mark) and after; evictions (the hub's
``gifting_slow_consumer_evictions_total``) and how the stalled sockets ended;
normal viewers closed (should be none).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from gifting.config import DEFAULT_CATALOG  # noqa: E402
from gifting.ledger import Ledger  # noqa: E402

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}
ROOM = "hot"
CLOSE_DRAIN = 2.5  # the hub's CLOSE_DRAIN_TIMEOUT (2 s) and a margin
CONNECT_CONCURRENCY = 50


def _handshake(token: str) -> bytes:
    return c.handshake_request(f"/ws?token={token}")


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    m = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
    head = bytes([opcode, 0x80 | n]) if n < 126 else bytes([opcode, 0xFE]) + struct.pack("!H", n)
    return head + mask + body


def _join() -> bytes:
    return _masked(0x82, msgpack.packb({"op": "join", "id": 1, "room": ROOM}))


class Reader(c.RawClient):
    """A client that reads everything: answers pings, counts replies, and (when
    ``sample`` is a list) records every bubble's (read time in s, latency in ms)."""

    def __init__(self, token: str, sample: list[tuple[float, float]] | None = None) -> None:
        super().__init__(f"/ws?token={token}")
        self.token = token
        self.sample = sample
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.close_code: int | None = None
        self.lost = False
        self.now = 0.0  # when the data being read arrived

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        self.now = time.time()
        super().data_received(data)

    def frame_received(self, opcode: int, payload: bytes) -> None:
        if opcode == 2:
            self._message(payload, self.now)
        elif opcode == 9:
            self.write(_masked(0x8A, payload))
        elif opcode == 8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def _message(self, payload: bytes, now: float) -> None:
        if payload[1:4] == b"\xa2id":  # a reply: {"id": ..., "ok"|"error": ...}
            msg = msgpack.unpackb(payload)
            if "ok" in msg:
                self.ok += 1
            else:
                code = str(msg.get("error", {}).get("code"))
                self.errors[code] = self.errors.get(code, 0) + 1
            return
        if self.sample is None:
            return
        msg = msgpack.unpackb(payload)
        events = msg.get("events", []) if msg.get("ev") == "batch" else [msg]
        for ev in events:
            if ev.get("ev") == "bubble":
                self.sample.append((now, now * 1000 - ev["time"]))

    def write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)


async def _reader(port: int, token: str, sample: list[tuple[float, float]] | None) -> Reader:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Reader(token, sample), "127.0.0.1", port)
    await asyncio.wait_for(proto.open, 30)
    proto.write(_join())
    return proto


async def _stalled(port: int, token: str) -> socket.socket:
    """Connect, upgrade, join, and never read again."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect, so the window offered in the SYN is already small.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 30)
        await loop.sock_sendall(s, _handshake(token))
        head = b""
        while b"\r\n\r\n" not in head:  # byte by byte: nothing after the head is read
            chunk = await asyncio.wait_for(loop.sock_recv(s, 1), 30)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head[:60].decode(errors="replace"))
        await loop.sock_sendall(s, _join())
    except BaseException:
        s.close()
        raise
    return s


def _ended(s: socket.socket) -> str:
    """How a stalled socket ended: 'close 4009' (it got the close frame), 'reset',
    'eof', or 'open'. Reads what is left, without blocking."""
    buf = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                end = "eof"
                break
            buf += chunk
    except BlockingIOError:
        end = "open"
    except ConnectionResetError:
        end = "reset"
    # The close frame (unmasked, short) is the last thing the hub sends.
    closes = list(re.finditer(rb"\x88[\x02-\x7d](..)", buf, re.DOTALL))
    if closes:
        return f"close {struct.unpack('!H', closes[-1].group(1))[0]}"
    return end


async def _evictions(port: int) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
    for line in body.splitlines():
        if line.startswith("gifting_slow_consumer_evictions_total "):
            return int(float(line.split()[1]))
    raise RuntimeError("no eviction counter in /metrics")


def _hwm_kib(pid: int) -> int:
    """The kernel's high-water mark of the process's RSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(float(line.split()[1]))
    raise RuntimeError("no VmHWM")


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]


async def measure(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    sample: list[tuple[float, float]] = []
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def reader(i: int) -> Reader:
        async with sem:
            return await _reader(port, c.token(f"v{i}"), sample if i < args.sampled else None)

    viewers = list(await asyncio.gather(*(reader(i) for i in range(args.viewers))))
    senders = [await _reader(port, c.token(f"s{i}"), None) for i in range(args.senders)]
    stalled: list[socket.socket] = []
    marks: dict[str, float] = {}
    rss: list[tuple[float, int]] = []
    running = True
    sent = 0
    run = os.urandom(4).hex()

    async def offer() -> None:
        nonlocal sent
        interval, t0 = 1.0 / args.rate, time.monotonic()
        marks["offer0"] = time.time()
        k = 0
        while running:
            delay = t0 + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            gift = {"op": "gift", "id": k % 2**30 + 1, "room": ROOM, "gift": "rose"}
            senders[k % len(senders)].write(
                _masked(0x82, msgpack.packb({**gift, "key": f"{run}-{k}"}))
            )
            sent += 1
            k += 1

    async def sample_rss() -> None:
        while running:
            rss.append((time.time(), c.rss_kib(pid)))
            await asyncio.sleep(0.05)

    try:
        await asyncio.sleep(1.0)  # joins answered, presence settled
        joined = sum(v.ok for v in viewers)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sample_rss())
            offering = tg.create_task(offer())
            marks["a0"] = time.time() + 1.0  # a second of warm-up
            await asyncio.sleep(args.baseline)
            marks["a1"] = time.time()
            rss_before = c.rss_kib(pid)

            marks["b0"] = time.time()

            async def one(i: int) -> socket.socket | None:
                async with sem:
                    try:
                        return await _stalled(port, c.token(f"x{i}"))
                    except (OSError, ConnectionError, TimeoutError):
                        return None

            got = await asyncio.gather(*(one(i) for i in range(args.stalled)))
            stalled = [s for s in got if s is not None]
            marks["b_connected"] = time.time()
            evicted, deadline = 0, time.monotonic() + args.stalled_max
            while evicted < len(stalled) and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                evicted = await _evictions(port)
            marks["b_evicted"] = time.time()
            await asyncio.sleep(CLOSE_DRAIN)  # the hub aborts what it could not close
            marks["b1"] = time.time()
            await asyncio.sleep(args.after)
            marks["c1"] = time.time()
            running = False
            await offering
        await asyncio.sleep(1.0)  # the last acks and bubbles
        rss_after = c.rss_kib(pid)
        hwm = _hwm_kib(pid)
        evictions = await _evictions(port)
        ends: dict[str, int] = {}
        for s in stalled:
            e = _ended(s)
            ends[e] = ends.get(e, 0) + 1
    finally:
        running = False
        for s in stalled:
            s.close()
        for r in [*viewers, *senders]:
            if r.transport is not None:
                r.transport.abort()

    def lat(lo: float, hi: float) -> list[float]:
        return [ms for t, ms in sample if lo <= t < hi]

    phases = {
        "without": lat(marks["a0"], marks["a1"]),
        "with": lat(marks["b0"], marks["b1"]),
        "after": lat(marks["b1"], marks["c1"]),
    }
    peak = max((k for t, k in rss if marks["b0"] <= t <= marks["b1"]), default=rss_before)
    acked = sum(s.ok for s in senders) - len(senders)  # less the joins
    errors: dict[str, int] = {}
    for s in senders:
        for code, n in s.errors.items():
            errors[code] = errors.get(code, 0) + n
    return {
        "viewers": len(viewers),
        "viewers_joined": joined,
        "sampled": args.sampled,
        "stalled_connected": len(stalled),
        "evictions": evictions,
        "stalled_ended": ends,
        "evict_all_s": round(marks["b_evicted"] - marks["b_connected"], 2),
        "connect_stalled_s": round(marks["b_connected"] - marks["b0"], 2),
        "normal_viewers_closed": sum(v.lost for v in viewers),
        "latency_ms": {
            name: {"n": len(v), "p50": _pct(v, 50), "p99": _pct(v, 99), "max": max(v, default=0)}
            for name, v in phases.items()
        },
        "rss_kib": {"before": rss_before, "peak": peak, "after": rss_after, "hwm": hwm},
        "sent": sent,
        "acked": acked,
        "errors": errors,
        "offered_per_s": round(sent / (marks["c1"] - marks["offer0"]), 1),
        "phases_s": {
            "without": round(marks["a1"] - marks["a0"], 2),
            "with": round(marks["b1"] - marks["b0"], 2),
            "after": round(marks["c1"] - marks["b1"], 2),
        },
    }


async def setup(url: str, senders: int) -> None:
    import redis.asyncio as aioredis

    ledger = Ledger(aioredis.Redis.from_url(url), prefix="bench")
    try:
        await ledger.load(PRICES)
        await ledger.go_live(ROOM, "stalled bench")
        for i in range(senders):
            await ledger.topup(f"s{i}", 10**12, f"stalled-{os.urandom(4).hex()}-{i}")
    finally:
        await ledger.r.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--viewers", type=int, default=200)
    ap.add_argument("--sampled", type=int, default=20, help="viewers that time every bubble")
    ap.add_argument("--stalled", type=int, default=500)
    ap.add_argument("--rate", type=float, default=1000.0, help="offered gifts/s in all")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--baseline", type=float, default=6.0, help="seconds without (phase 1)")
    ap.add_argument("--stalled-max", type=float, default=40.0, help="seconds to wait for evictions")
    ap.add_argument("--after", type=float, default=6.0, help="seconds after (phase 3)")
    ap.add_argument("--fsync", default="everysec", choices=["always", "everysec"])
    ap.add_argument("--batch-window", default="0.1", help="the hub's --batch-window")
    args = ap.parse_args()
    if not (1 <= args.sampled <= args.viewers and args.stalled >= 1 and args.rate > 0):
        ap.error("need 1 <= sampled <= viewers, stalled >= 1, rate > 0")
    if args.rate / args.senders > 450:
        ap.error("over 450 gifts/s per sender would hit the hub's per-connection gift rate")
    if args.baseline <= 1.0:
        ap.error("--baseline must be over 1 s (the first second is warm-up)")
    c.raise_nofile()
    with tempfile.TemporaryDirectory() as tmp, c.store(Path(tmp), args.fsync) as st:
        asyncio.run(setup(st.url, args.senders))
        extra = ("--batch-window", args.batch_window)
        with c.hub_process(st.url, *extra) as (port, pid):
            res = asyncio.run(measure(port, pid, args))
    lat, mem = res["latency_ms"], res["rss_kib"]
    rows = [
        *(
            c.row(f"bubble latency {p}, {label} vs without", lat[ph][p], lat["without"][p], "ms")
            for ph, label in (("with", "with stalled"), ("after", "after eviction"))
            for p in ("p50", "p99")
        ),
        c.row("hub RSS peak (sampled) vs before", mem["peak"], mem["before"], "KiB"),
        c.row("hub RSS after vs before", mem["after"], mem["before"], "KiB"),
        c.row(
            "stalled clients evicted (4009) vs connected",
            res["evictions"],
            res["stalled_connected"],
            "clients",
        ),
        c.row("seconds from all stalled joined to all evicted", res["evict_all_s"], None, "s"),
        c.row("normal viewers closed", res["normal_viewers_closed"], None, "clients"),
        c.row("acked gifts vs sent", res["acked"], res["sent"], "gifts"),
    ]
    c.write_result(
        "stalled",
        rows,
        {
            "viewers": args.viewers,
            "sampled": args.sampled,
            "stalled": args.stalled,
            "rate": args.rate,
            "senders": args.senders,
            "fsync": args.fsync,
            "batch_window": args.batch_window,
            "latency": "viewer's clock at the read minus the bubble's time (store clock at commit)",
            "run": res,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
