#!/usr/bin/env python3
"""Bubbles delivered per second to ONE room of N viewers through one hub,
against a bare `websockets` server that broadcasts one frame per message
received, both driven by the same senders at the same offered rate, in one run.

    scripts/bench/fanout.py [--viewers 1000,5000] [--duration 10] [--rate 2000]

Hub: a private store, a hub subprocess, one live room; `--senders` connections
join it and send gifts open-loop at `--rate` gifts/s in all (each with its own
idempotency key), while N raw viewers that joined the room count what arrives.
A busy room's events leave in `batch` frames (gifting/rooms.py), so the hub's
frames/s and bubbles/s differ; both are reported.

Baseline: a bare websockets server (same event loop kind as the hub) that, for
every message from a sender connection, calls `websockets.broadcast()` of a
frame as long as the hub's single `bubble` frame to the N viewers.

What the viewers count (no full decode): a hub frame is counted when it holds
at least one bubble; its bubbles are the occurrences of the MessagePack bytes of
`"ev": "bubble"` in it (exact for this encoding; `gift`/`presence`/`top` events
are not counted). Baseline frames all have one length on the wire, so viewers
count bytes and divide. Rates run from the first bubble (first frame) any
viewer received to a snapshot taken while the senders are still sending.
Viewers run in `--client-procs` processes of their own, senders in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from gifting.config import DEFAULT_CATALOG  # noqa: E402
from gifting.ledger import Ledger  # noqa: E402

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}
BUBBLE = msgpack.packb("ev") + msgpack.packb("bubble")  # b"\xa2ev\xa6bubble"
REPLY = msgpack.packb("id")  # replies are {"id": ..., "ok"/"error": ...}, "id" first
CONNECT_CONCURRENCY = 50  # per process: stays under the listen backlog
READY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 10.0


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """As `gifting serve --loop`: uvloop when installed (auto) or asked for."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(choice: str) -> str:
    return "asyncio" if loop_factory(choice) is None else "uvloop"


# -- raw clients ---------------------------------------------------------------


class Counter(c.RawClient):
    """A raw client that counts bubbles (hub) or bytes (baseline), answers pings,
    and hands reply frames to ``on_reply``. ``wire`` > 0 selects byte counting:
    every data frame is then exactly ``wire`` bytes long on the wire."""

    def __init__(
        self, path: str, wire: int = 0, on_reply: Callable[[bytes], None] | None = None
    ) -> None:
        super().__init__(path)
        self.wire = wire
        self.on_reply = on_reply
        self.bubbles = 0
        self.replies = 0
        self.nbytes = 0
        self.single = 0  # payload length of a frame holding one bubble alone
        self.t_first = 0.0
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        if self.wire and self.open.done():
            if not self.t_first:
                self.t_first = time.monotonic()
            self.nbytes += len(data)
            return
        self.buf += data
        if not self.open.done():
            if not self.upgraded():
                return
            if self.wire:
                if self.buf:
                    self.t_first = time.monotonic()
                self.nbytes, self.buf = len(self.buf), b""
                return
        self.buf = c.split_frames(self.buf, self.frame_received)

    def frame_received(self, opcode: int, payload: bytes) -> None:
        if opcode in (1, 2):
            if payload[1:4] == REPLY:
                self.replies += 1
                if self.on_reply is not None:
                    self.on_reply(payload)
                return
            k = payload.count(BUBBLE)
            if k:
                self.frames += 1
                self.bubbles += k
                if not self.t_first:
                    self.t_first = time.monotonic()
                if k == 1 and not self.single and b"batch" not in payload[:16]:
                    self.single = len(payload)
        elif opcode == 9:
            self.control(0x8A, payload)

    def frame(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        if n:
            m = (mask * (n // 4 + 1))[:n]
            x = int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")
            payload = x.to_bytes(n, "big")
        if n < 126:
            head = bytes([opcode, 0x80 | n])
        else:
            head = bytes([opcode, 0xFE]) + struct.pack("!H", n)
        return head + mask + payload

    def control(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.frame(opcode, payload))

    def send(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.frame(0x82, payload))


async def connect(port: int, path: str, wire: int = 0, on_reply: Any = None) -> Counter | None:
    loop = asyncio.get_running_loop()
    for attempt in range(3):
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: Counter(path, wire, on_reply), "127.0.0.1", port),
                30,
            )
            await asyncio.wait_for(proto.open, 30)
            return proto
        except (OSError, TimeoutError, ConnectionError):
            await asyncio.sleep(0.2 * (attempt + 1))
    return None


async def wait_replies(clients: list[Counter], n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(cl.replies >= n or cl.lost for cl in clients):
            return True
        await asyncio.sleep(0.05)
    return False


def join_frame(room: str) -> bytes:
    return msgpack.packb({"op": "join", "id": 1, "room": room})


# -- viewer processes ----------------------------------------------------------


def viewer_process(conn: Connection, cfg: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    c.raise_nofile()
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        runner.run(viewers(conn, cfg))


async def viewers(conn: Connection, cfg: dict[str, Any]) -> None:
    """Viewers ``lo``..``hi``; viewer i connects to ``ports[i % len(ports)]``
    (several hubs, ``scale.py``), else to ``port``."""
    loop = asyncio.get_running_loop()
    hub, wire = cfg["mode"] == "hub", cfg["wire"]
    ports: list[int] = cfg.get("ports") or [cfg["port"]]
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> Counter | None:
        path = f"/ws?token={c.token(f'v{i}')}" if hub else "/view"
        async with sem:
            cl = await connect(ports[i % len(ports)], path, wire)
        if cl is not None and hub:
            cl.send(join_frame(cfg["room"]))
        return cl

    got = await asyncio.gather(*(one(i) for i in range(cfg["lo"], cfg["hi"])))
    clients = [cl for cl in got if cl is not None]
    joined = await wait_replies(clients, 1, 30) if hub else True
    conn.send(("ready", len(clients), cfg["hi"] - cfg["lo"] - len(clients), joined))

    def snapshot() -> dict[str, Any]:
        firsts = [cl.t_first for cl in clients if cl.t_first]
        if wire:
            frames = sum(cl.nbytes // wire for cl in clients)
            residue = sum(cl.nbytes % wire for cl in clients)
        else:
            frames, residue = sum(cl.frames for cl in clients), 0
        return {
            "t": time.monotonic(),
            "t_first": min(firsts) if firsts else 0.0,
            "frames": frames,
            "bubbles": sum(cl.bubbles for cl in clients),
            "residue": residue,
            "single": max((cl.single for cl in clients), default=0),
            "closed": sum(cl.lost for cl in clients),
            "cpu": time.process_time(),
            "n": len(clients),
        }

    stop = loop.create_future()

    def on_command() -> None:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            cmd = "stop"
        if cmd == "snap":
            conn.send(snapshot())
        elif not stop.done():
            stop.set_result(None)

    loop.add_reader(conn.fileno(), on_command)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop, cfg["max_s"])
    loop.remove_reader(conn.fileno())
    for cl in clients:
        if cl.transport is not None:
            cl.transport.abort()


class Viewers:
    """N viewers spread over ``procs`` processes, each answering snapshots."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.conns: list[Connection] = []
        self.ps: list[mp.process.BaseProcess] = []

    async def start(self, cfg: dict[str, Any], n: int) -> tuple[int, int, bool]:
        ctx = mp.get_context("spawn")
        bounds = [n * k // self.procs for k in range(self.procs + 1)]
        for k in range(self.procs):
            if bounds[k] == bounds[k + 1]:
                continue
            mine, theirs = ctx.Pipe()
            p = ctx.Process(
                target=viewer_process,
                args=(theirs, {**cfg, "lo": bounds[k], "hi": bounds[k + 1]}),
                daemon=True,
            )
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.ps.append(p)
        ready = await asyncio.gather(*(recv(cn, READY_TIMEOUT) for cn in self.conns))
        return (
            sum(r[1] for r in ready),
            sum(r[2] for r in ready),
            all(r[3] for r in ready),
        )

    async def snap(self) -> list[dict[str, Any]]:
        for cn in self.conns:
            cn.send("snap")
        return list(await asyncio.gather(*(recv(cn, 30) for cn in self.conns)))

    def stop(self) -> None:
        for cn in self.conns:
            with contextlib.suppress(OSError):
                cn.send("stop")
        for p in self.ps:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        for cn in self.conns:
            cn.close()
        self.conns, self.ps = [], []


async def recv(conn: Connection, timeout: float) -> Any:
    def get() -> Any:
        if not conn.poll(timeout):
            raise TimeoutError("viewer process did not answer")
        return conn.recv()

    return await asyncio.to_thread(get)


# -- the bare baseline server --------------------------------------------------


def bare_server(size: int, loop: str) -> None:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(bare_serve(size))


async def bare_serve(size: int) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed

    payload = b"x" * size
    viewers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path == "/send":
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    broadcast(viewers, payload)
            return
        viewers.add(ws)
        try:
            await ws.wait_closed()
        finally:
            viewers.discard(ws)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        handler,
        "127.0.0.1",
        0,
        compression=None,
        max_size=16 * 1024,
        max_queue=64,
        write_limit=32 * 1024,
        ping_interval=None,  # no ping frames: viewers count bytes
        close_timeout=2,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"serving http://127.0.0.1:{port}/", flush=True)
        await stop.wait()


@contextlib.contextmanager
def bare_process(size: int, loop: str) -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "_bare", "--size", str(size), "--loop", loop],
        stdout=subprocess.PIPE,
        cwd=c.ROOT,
        preexec_fn=c.raise_nofile,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "serving http://" not in line:
            raise RuntimeError(f"bare server did not start: {line!r}")
        yield int(line.rsplit(":", 1)[1].split("/", 1)[0]), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- one measurement -----------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, sum(v) / tick


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    mode: str, port: int, pid: int, n: int, room: str, wire: int, args: argparse.Namespace
) -> dict[str, Any]:
    hub = mode == "hub"
    acks = {"ok": 0, "error": 0}
    codes: dict[str, int] = {}

    def on_reply(payload: bytes) -> None:
        msg = msgpack.unpackb(payload)
        if "ok" in msg:
            acks["ok"] += 1
        else:
            acks["error"] += 1
            code = msg.get("error", {}).get("code", "?")
            codes[code] = codes.get(code, 0) + 1

    vs = Viewers(args.client_procs)
    senders: list[Counter] = []
    try:
        cfg = {"mode": mode, "port": port, "wire": wire, "room": room}
        cfg["max_s"] = args.duration + DRAIN_TIMEOUT + 120
        connected, failed, joined = await vs.start(cfg, n)
        for i in range(args.senders):
            path = f"/ws?token={c.token(f's{i}')}" if hub else "/send"
            s = await connect(port, path, 0, on_reply)
            if s is None:
                raise RuntimeError(f"sender {i} could not connect")
            senders.append(s)
            if hub:
                s.send(join_frame(room))
        if hub and not await wait_replies(senders, 1, 30):
            raise RuntimeError("senders' joins were not answered")
        acks["ok"] = acks["error"] = 0
        await asyncio.sleep(0.5)  # presence/top of the joins settle

        sent = 0
        running = True
        run = os.urandom(4).hex()  # each run's gifts are new ones, not retries

        async def offer() -> None:
            nonlocal sent
            interval, t0 = 1.0 / args.rate, time.monotonic()
            for k in range(int(args.rate * (args.duration + 60))):
                if not running:
                    return
                delay = t0 + k * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                s = senders[k % len(senders)]
                s.send(
                    msgpack.packb(
                        {
                            "op": "gift",
                            "id": k % 2**30 + 1,
                            "room": room,
                            "gift": "rose",
                            "key": f"f{room}-{run}-{k}",
                        }
                    )
                )
                sent += 1

        snaps0 = await vs.snap()
        cpu0, me0, w0 = cpu_s(pid), time.process_time(), time.monotonic()
        m0 = machine_busy()
        task = asyncio.create_task(offer())
        await asyncio.sleep(args.duration)
        snaps = await vs.snap()  # while the senders still send
        cpu1, me1, w1 = cpu_s(pid), time.process_time(), time.monotonic()
        m1 = machine_busy()
        sent_window, ok_window = sent, acks["ok"]
        running = False
        await task

        firsts = [s["t_first"] for s in snaps if s["t_first"]]
        if not firsts:
            raise RuntimeError(f"{mode}: no viewer received anything")
        t_first = min(firsts)
        frames = sum(s["frames"] / (s["t"] - t_first) for s in snaps)
        bubbles = sum(s["bubbles"] / (s["t"] - t_first) for s in snaps)
        wall = w1 - w0
        out: dict[str, Any] = {
            "viewers": connected,
            "viewers_failed": failed,
            "joined": joined,
            "window_s": round(max(s["t"] for s in snaps) - t_first, 3),
            "first_after_s": round(t_first - w0, 4),
            "frames_per_s": frames,
            "bubbles_per_s": bubbles,
            "offered_per_s": sent_window / wall,
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
            "senders_cpu_pct": round(100 * (me1 - me0) / wall, 1),
            # Every process on the machine, all cores: near 100 % means no CPU to spare.
            "machine_busy_pct": round(100 * (m1[0] - m0[0]) / max(m1[1] - m0[1], 1e-9), 1),
            "single_frame_bytes": max(s["single"] for s in snaps),
            "closed_viewers": sum(s["closed"] for s in snaps),
            # Viewer processes' CPU over the window: near 100 % means the client is the limit.
            "viewer_cpu_pct": [
                round(100 * (b["cpu"] - a["cpu"]) / max(b["t"] - a["t"], 1e-9), 1)
                for a, b in zip(snaps0, snaps, strict=True)
            ],
        }
        if hub:
            out["acked_per_s"] = ok_window / wall
            # Settle: every gift answered and the viewers' counts still.
            deadline, last = time.monotonic() + DRAIN_TIMEOUT, -1
            drained, fin, total = False, snaps, -1
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                fin = await vs.snap()
                total = sum(s["bubbles"] for s in fin)
                if acks["ok"] + acks["error"] >= sent and total == last:
                    drained = True
                    break
                last = total
            alive = connected - sum(s["closed"] for s in fin)
            expected = acks["ok"] * alive
            out.update(
                sent=sent,
                acked=acks["ok"],
                errors=acks["error"],
                error_codes=codes,
                drained=drained,
                bubbles_expected=expected,
                bubbles_received=total,
                bubbles_lost=expected - total if drained else None,
                closed_viewers=sum(s["closed"] for s in fin),
            )
        else:
            out.update(sent=sent, residue_bytes=sum(s["residue"] for s in snaps))
        return out
    finally:
        for s in senders:
            if s.transport is not None:
                s.transport.abort()
        await asyncio.to_thread(vs.stop)


async def setup(url: str, room: str, senders: int) -> None:
    import redis.asyncio as aioredis

    ledger = Ledger(aioredis.Redis.from_url(url), prefix="bench")
    try:
        await ledger.load(PRICES)
        await ledger.go_live(room, "fanout bench")
        for i in range(senders):
            await ledger.topup(f"s{i}", 10**12, f"fanout-{room}-{i}")
    finally:
        await ledger.r.aclose()


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        ap = argparse.ArgumentParser()
        ap.add_argument("_bare")
        ap.add_argument("--size", type=int, required=True)
        ap.add_argument("--loop", default="auto")
        a = ap.parse_args()
        bare_server(a.size, a.loop)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--viewers", default="1000,5000", help="comma-separated room sizes")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2000.0, help="offered gifts (messages)/s")
    ap.add_argument("--senders", type=int, default=0, help="default: one per 250/s offered")
    ap.add_argument("--client-procs", type=int, default=1, choices=[1, 2, 3, 4])
    ap.add_argument("--fsync", default="everysec", choices=["always", "everysec"])
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    args = ap.parse_args()
    sizes = [int(v) for v in args.viewers.split(",") if v.strip()]
    if not sizes or min(sizes) < 1 or args.duration <= 0 or args.rate <= 0:
        ap.error("need viewers >= 1, duration > 0, rate > 0")
    args.senders = args.senders or max(1, math.ceil(args.rate / 250))
    if args.rate / args.senders > 450:
        ap.error("over 450 gifts/s per sender would hit the hub's per-connection gift rate")
    c.raise_nofile()
    signal.signal(signal.SIGTERM, on_sigterm)  # clean up as on ctrl-C
    factory = loop_factory(args.loop)
    rows: list[dict[str, Any]] = []
    per_n: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, c.store(Path(tmp), args.fsync) as st:
        for n in sizes:
            room = f"fan{n}"
            asyncio.run(setup(st.url, room, args.senders))
            with c.hub_process(st.url, "--loop", args.loop) as (port, pid):
                with asyncio.Runner(loop_factory=factory) as r:
                    hub = r.run(measure("hub", port, pid, n, room, 0, args))
            # The same hub sending a frame per bubble, as the bare server does.
            asyncio.run(setup(st.url, room, args.senders))
            with c.hub_process(st.url, "--loop", args.loop, "--batch-window", "0") as (port, pid):
                with asyncio.Runner(loop_factory=factory) as r:
                    single = r.run(measure("hub", port, pid, n, room, 0, args))
            size = hub["single_frame_bytes"] or 200
            wire = size + (2 if size < 126 else 4)
            with bare_process(size, args.loop) as (port, pid):
                with asyncio.Runner(loop_factory=factory) as r:
                    base = r.run(measure("bare", port, pid, n, room, wire, args))
            per_n[str(n)] = {"hub": hub, "hub_unbatched": single, "bare": base, "frame_bytes": size}
            bf = base["frames_per_s"]
            lost = hub["bubbles_lost"]
            rows += [
                c.row(
                    f"N={n} hub frames/s, a frame per bubble, vs bare",
                    single["frames_per_s"],
                    bf,
                    "frames/s",
                ),
                c.row(f"N={n} hub frames/s, batched, vs bare", hub["frames_per_s"], bf, "frames/s"),
                c.row(
                    f"N={n} hub bubbles/s vs bare frames/s", hub["bubbles_per_s"], bf, "bubbles/s"
                ),
                c.row(
                    f"N={n} hub acked gifts/s vs offered",
                    hub["acked_per_s"],
                    hub["offered_per_s"],
                    "gifts/s",
                ),
                c.row(
                    f"N={n} bare msgs broadcast/s vs offered",
                    bf / max(base["viewers"], 1),
                    base["offered_per_s"],
                    "msgs/s",
                ),
                c.row(
                    f"N={n} hub bubbles lost",
                    float("nan") if lost is None else float(lost),
                    None,
                    "bubbles",
                    note="not drained" if lost is None else "after drain, alive viewers",
                ),
            ]
            for label, res in (("hub", hub), ("hub unbatched", single), ("bare", base)):
                if res["machine_busy_pct"] > 90:
                    print(
                        f"warning: N={n} {label}: the machine's CPUs were "
                        f"{res['machine_busy_pct']}% busy (other work included)"
                    )
                busy = [p for p in res["viewer_cpu_pct"] if p > 85]
                if busy:
                    print(f"warning: N={n} {label}: a viewer process ran at {busy}% CPU:")
                    print("  the client may be the bottleneck (try --client-procs 2)")
    c.write_result(
        "fanout",
        rows,
        {
            "viewers": sizes,
            "duration": args.duration,
            "rate": args.rate,
            "senders": args.senders,
            "fsync": args.fsync,
            "loop": loop_name(args.loop),
            "clients": (
                f"viewers in {args.client_procs} process(es) of their own "
                f"({loop_name('auto')}), senders in the main process"
            ),
            "counting": (
                "hub: frames holding >= 1 bubble, bubbles = occurrences of msgpack "
                "'ev':'bubble' in them; bare: bytes / frame wire length"
            ),
            "runs": per_n,
        },
    )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
