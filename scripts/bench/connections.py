#!/usr/bin/env python3
"""Idle authenticated connections on one hub: memory per connection and
connects/s, against a bare `websockets` server (same loop kind) that echoes
one frame per connection, measured the same way in the same run.

    scripts/bench/connections.py [--conns 19000] [--loop auto|asyncio|uvloop]

Each connection is a distinct user: WebSocket handshake, then the `auth` op
(contract: Authentication); it counts once its `{"id": 1, "ok": ...}` reply
has arrived. `?token=` is not used because it gets no reply to wait for. The
bare server gets the same auth frame and echoes it back.

KiB/conn = (server RSS with all N connected, once RSS is stable) minus (its
RSS before the first connection), over N. connects/s = N over the time from
the first connect to the last reply. The clients are raw asyncio protocols
spread over --clients processes, bound to their own 127.0.0.x source
addresses (at most 4,000 connections each: their own ephemeral ports); they
answer the servers' pings so nothing is dropped while the memory settles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import multiprocessing as mp
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

CONNECT_TIMEOUT = 30.0  # per connection: TCP + handshake + auth reply
SETTLE_MAX = 20.0  # seconds to wait for RSS to stop moving
WORKER_WAIT = 900.0  # a worker never waits longer than this for the next order
PER_SOURCE = 4000  # connections per 127.0.0.x source address
SOURCES_PER_CLIENT = 8  # source addresses per client process (--clients <= 8)


# -- client side (runs in worker processes) ----------------------------------


def _mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0xFE]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 0xFF]) + struct.pack("!Q", n)
    return head + mask + _mask(payload, mask)


class Idle(c.RawClient):
    """Handshake (RawClient), send one auth frame, wait for its answer, then idle:
    answer pings, note a close or a lost connection."""

    def __init__(self, payload: bytes, echo: bool, stats: dict[str, int]) -> None:
        super().__init__("/ws")
        self.payload = payload
        self.echo = echo  # the bare server echoes; the hub answers {"id": 1, "ok": ...}
        self.stats = stats
        self.authed = asyncio.get_running_loop().create_future()
        self.dead = False
        self.closed = False  # a close frame came: nothing after it counts

    def refused(self, exc: Exception) -> None:
        self._fail(exc)

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        self.buf += data
        if not self.open.done():
            if not self.upgraded():
                return
            assert self.transport is not None
            self.transport.write(_frame(2, self.payload))
        self.buf = c.split_frames(self.buf, self.frame_received)

    def frame_received(self, opcode: int, payload: bytes) -> None:
        if self.closed:
            return
        if opcode == 9:  # ping -> pong
            assert self.transport is not None
            self.transport.write(_frame(10, payload))
            self.stats["pings"] += 1
        elif opcode == 8:  # close
            code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
            self._fail(ConnectionError(f"closed by server: {code} {payload[2:60]!r}"))
            self.closed = True
        elif opcode in (1, 2) and not self.authed.done():
            self._answer(payload)
        elif opcode in (1, 2):
            self.stats["frames_after_auth"] += 1

    def _answer(self, payload: bytes) -> None:
        if self.echo:
            ok = payload == self.payload
        else:
            try:
                msg = msgpack.unpackb(payload)
            except Exception:  # noqa: BLE001 - any undecodable frame is a failure
                msg = None
            ok = isinstance(msg, dict) and msg.get("id") == 1 and "ok" in msg
        if ok:
            self.authed.set_result(None)
        else:
            self._fail(ConnectionError(f"bad auth answer: {payload[:80]!r}"))

    def _fail(self, exc: Exception) -> None:
        if self.dead:
            return
        self.dead = True
        if not self.authed.done():
            self.authed.set_exception(exc)
        elif not self.authed.cancelled() and self.authed.exception() is None:
            self.stats["lost"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))
        self.transport = None


async def _hold(
    conn: Connection, port: int, sources: list[str], count: int, first: int, echo: bool, conc: int
) -> None:
    loop = asyncio.get_running_loop()
    payloads = [
        msgpack.packb({"op": "auth", "id": 1, "token": c.token(f"idle{first + i}")})
        for i in range(count)
    ]
    stats = {"pings": 0, "lost": 0, "frames_after_auth": 0}
    protos: list[Idle] = []
    errors: dict[str, int] = {}
    lat: list[float] = []
    todo = iter(range(count))

    async def one() -> None:
        # `conc` of these share the work: a bounded pool rather than `count` tasks
        # queued on a Semaphore (whose acquire is O(waiters) on Python 3.11).
        for i in todo:
            t = time.perf_counter()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    _, proto = await loop.create_connection(
                        functools.partial(Idle, payloads[i], echo, stats),
                        "127.0.0.1",
                        port,
                        local_addr=(sources[i % len(sources)], 0),
                    )
                    protos.append(proto)
                    await proto.authed
                lat.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                key = type(exc).__name__ + (f": {str(exc)[:60]}" if str(exc) else "")
                errors[key] = errors.get(key, 0) + 1

    # The client is a measuring tool: no cyclic GC pauses in it (its objects die
    # with the process).
    gc.collect()
    gc.freeze()
    gc.disable()
    conn.send(("ready", None))
    if not await loop.run_in_executor(None, conn.poll, WORKER_WAIT):
        return
    conn.recv()  # "go"
    t0, cpu0 = time.monotonic(), time.process_time()
    await asyncio.gather(*(one() for _ in range(min(conc, count))))
    t1, cpu1 = time.monotonic(), time.process_time()
    lat.sort()
    conn.send(
        (
            "done",
            {
                "start": t0,
                "end": t1,
                "cpu_s": cpu1 - cpu0,
                "ok": len(lat),
                "errors": errors,
                "lat_p50": lat[len(lat) // 2] if lat else None,
                "lat_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
                "lat_max": lat[-1] if lat else None,
            },
        )
    )
    # Idle (answering pings) until told to stop, then report what was lost.
    if await loop.run_in_executor(None, conn.poll, WORKER_WAIT):
        conn.recv()  # "stop"
    conn.send(("stopped", dict(stats)))
    linger0 = struct.pack("ii", 1, 0)
    for p in protos:
        if p.transport is not None:
            # SO_LINGER 0: close with RST, so no TIME_WAIT is left holding this
            # source address's ports (a run within a minute would scan past them).
            with contextlib.suppress(OSError, AttributeError):
                sock = p.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            p.transport.abort()
    await asyncio.sleep(0.2)


def _worker(
    conn: Connection, port: int, sources: list[str], count: int, first: int, echo: bool, conc: int
) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(_hold(conn, port, sources, count, first, echo, conc))


# -- bare baseline server (runs as a subprocess of this script) ----------------


async def _bare_serve(stop: asyncio.Event) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for msg in ws:
                await ws.send(msg)

    async with serve(handler, "127.0.0.1", 0, subprotocols=[Subprotocol("gifting.v1")]) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"bare serving 127.0.0.1:{port}", flush=True)
        await stop.wait()


def bare_main(loop_kind: str) -> int:
    factory = None
    if loop_kind != "asyncio":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if loop_kind == "uvloop":
                raise SystemExit("--loop uvloop needs uvloop installed") from None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await _bare_serve(stop)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())
    return 0


@contextlib.contextmanager
def bare_process(loop_kind: str) -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", "--loop", loop_kind],
        stdout=subprocess.PIPE,
        cwd=c.ROOT,
        preexec_fn=c.raise_nofile,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline().decode()
        if "bare serving" not in line:
            raise RuntimeError(f"bare server did not start: {line!r}")
        yield int(line.rsplit(":", 1)[1]), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- measuring -----------------------------------------------------------------


def settled_rss(pid: int, max_wait: float = SETTLE_MAX) -> tuple[int, float]:
    """Poll RSS every 0.2 s until the last 6 samples (1 s) span < 0.25 %
    (and < 256 KiB); returns (RSS KiB, seconds waited). Bounded by max_wait."""
    t0 = time.monotonic()
    samples: list[int] = []
    for _ in range(int(max_wait / 0.2) + 1):
        samples.append(c.rss_kib(pid))
        last = samples[-6:]
        if len(last) == 6 and max(last) - min(last) < min(256, 0.0025 * max(last)):
            break
        time.sleep(0.2)
    return samples[-1], time.monotonic() - t0


def time_wait() -> int:
    """TCP sockets in TIME_WAIT (they hold ephemeral ports for a minute)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                f = line.split()
                return int(f[f.index("tw") + 1])
    return -1


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int:
    """TcpExt ListenOverflows: connects the kernel dropped because an accept queue was full."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("TcpExt:"):
                i = names.split().index("ListenOverflows")
                return int(values.split()[i])
    return -1


def measure(
    port: int, pid: int, conns: int, clients: int, conc: int, echo: bool, src_base: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    procs: list[tuple[Any, Connection]] = []
    try:
        first = 0
        for k in range(clients):
            count = conns // clients + (1 if k < conns % clients else 0)
            here, there = ctx.Pipe()
            # At most PER_SOURCE connections per source address: bind(addr, 0)
            # takes odd ports of the lower half of the range first (~7,000 of
            # them here) and scans them all on every bind once they are used up.
            n_src = min(SOURCES_PER_CLIENT, -(-count // PER_SOURCE))
            sources = [f"127.0.0.{src_base + k * SOURCES_PER_CLIENT + j}" for j in range(n_src)]
            p = ctx.Process(
                target=_worker,
                args=(there, port, sources, count, first, echo, conc // clients),
                daemon=True,
            )
            p.start()
            procs.append((p, here))
            first += count
        for p, here in procs:
            if not here.poll(120):
                raise RuntimeError(f"client {p.pid} did not get ready")
            here.recv()
        rss0, settle0 = settled_rss(pid)
        ovf0, cpu0 = listen_overflows(), cpu_seconds(pid)
        for _, here in procs:
            here.send("go")
        done = []
        deadline = time.monotonic() + CONNECT_TIMEOUT + conns / 50 + 60
        for p, here in procs:
            if not here.poll(max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"client {p.pid} did not finish connecting")
            done.append(here.recv()[1])
        ovf1, cpu1 = listen_overflows(), cpu_seconds(pid)
        rss1, settle1 = settled_rss(pid)
        for _, here in procs:
            here.send("stop")
        stats = []
        for _, here in procs:
            if here.poll(30):
                stats.append(here.recv()[1])
        for p, _ in procs:
            p.join(10)
    finally:
        for p, here in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            here.close()
    ok = sum(d["ok"] for d in done)
    errors: dict[str, int] = {}
    for d in done:
        for k, v in d["errors"].items():
            errors[k] = errors.get(k, 0) + v
    elapsed = max(d["end"] for d in done) - min(d["start"] for d in done)
    lost = sum(s["lost"] for s in stats)
    held = ok - lost
    return {
        "ok": ok,
        "held": held,
        "errors": errors,
        "lost_while_idle": lost,
        "pings_answered": sum(s["pings"] for s in stats),
        "connect_seconds": elapsed,
        "connects_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "settle_before_s": round(settle0, 2),
        "settle_after_s": round(settle1, 2),
        "kib_per_conn": (rss1 - rss0) / held if held > 0 else float("nan"),
        "server_cpu_busy": (cpu1 - cpu0) / elapsed if elapsed > 0 else None,
        "client_cpu_busy": [round(d["cpu_s"] / elapsed, 2) for d in done] if elapsed > 0 else None,
        "listen_overflows": ovf1 - ovf0 if ovf0 >= 0 else None,
        "latency_p50_ms": max((d["lat_p50"] or 0) for d in done) * 1000,
        "latency_p99_ms": max((d["lat_p99"] or 0) for d in done) * 1000,
        "latency_max_ms": max((d["lat_max"] or 0) for d in done) * 1000,
    }


def report(name: str, m: dict[str, Any], conns: int) -> None:
    print(
        f"{name}: {m['ok']}/{conns} authenticated in {m['connect_seconds']:.1f}s "
        f"({m['connects_per_s']:.0f}/s, p99 {m['latency_p99_ms']:.0f} ms, "
        f"max {m['latency_max_ms']:.0f} ms), RSS {m['rss_before_kib']} -> "
        f"{m['rss_after_kib']} KiB, {m['kib_per_conn']:.1f} KiB/conn, "
        f"lost while idle {m['lost_while_idle']}, listen overflows {m['listen_overflows']}, "
        f"CPU busy while connecting: server {m['server_cpu_busy']:.2f}, "
        f"clients {m['client_cpu_busy']}",
        flush=True,
    )
    for k, v in m["errors"].items():
        print(f"  {name} error x{v}: {k}", file=sys.stderr)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--conns", type=int, default=19000)
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    ap.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    ap.add_argument(
        "--concurrency",
        type=int,
        default=96,
        help="connects in flight, all clients together (default 96: below the\n"
        "servers' listen backlog of 100, so no SYN is dropped and retried 1 s later)",
    )
    ap.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        return bare_main(args.loop)
    if not 1 <= args.clients <= 8 or args.conns < args.clients:
        ap.error("--clients must be 1-8 and at most --conns")
    c.raise_nofile()
    signal.signal(signal.SIGTERM, _interrupt)  # clean up children on `timeout`/kill too
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_client = -(-args.conns // args.clients)
    if per_client + 100 > nofile or args.conns + 400 > nofile:
        print(
            f"warning: RLIMIT_NOFILE {nofile} is tight for {args.conns} connections "
            f"({per_client} per client process); expect EMFILE",
            file=sys.stderr,
        )
    conc = max(args.clients, args.concurrency)
    tw = time_wait()
    if tw > 5000:
        print(
            f"warning: {tw} sockets in TIME_WAIT (an earlier run?): binding source ports "
            "gets slow and the clients may become what is measured",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory() as tmp, c.store(Path(tmp), "everysec") as st:
        with c.hub_process(st.url, "--loop", args.loop) as (port, pid):
            hub = measure(port, pid, args.conns, args.clients, conc, False, 2)
        report("hub", hub, args.conns)
    with bare_process(args.loop) as (port, pid):
        bare = measure(port, pid, args.conns, args.clients, conc, True, 2 + 8 * 8)
    report("bare", bare, args.conns)

    rows = [
        c.row(
            f"KiB per idle authenticated connection ({args.conns})",
            hub["kib_per_conn"],
            bare["kib_per_conn"],
            "KiB/conn",
            target="<= 20",
        ),
        c.row(
            "connects/s (handshake + auth reply)",
            hub["connects_per_s"],
            bare["connects_per_s"],
            "conn/s",
            target=">= 3000",
        ),
        c.row("connect+auth p99", hub["latency_p99_ms"], bare["latency_p99_ms"], "ms"),
    ]
    c.write_result(
        "connections",
        rows,
        {
            "conns": args.conns,
            "loop": args.loop,
            "client_processes": args.clients,
            "concurrency": conc,
            "nofile": nofile,
            "time_wait_before": tw,
            "hub": hub,
            "bare": bare,
        },
    )
    failed = args.conns - hub["held"] + args.conns - bare["held"]
    if failed:
        print(f"warning: {failed} connections failed or were lost", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
