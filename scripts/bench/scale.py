#!/usr/bin/env python3
"""Scaling out: acked gifts/s and delivered bubbles/s with 1, 2 and 4 hub
processes on ONE store, each as a ratio to the 1-hub figure of the same run.

    scripts/bench/scale.py [--hubs 1,2,4] [--duration 5] [--senders 200]
                           [--viewers 400] [--rate 2000] [--flat-rate 400]
                           [--workers auto|on|off] [--cluster] [--no-ceiling]
                           [--no-pubsub]

For each N in ``--hubs``: N ``gifting serve --redis-url URL --port 0 --no-demo
--prefix P`` processes on one embedded store (started here; a prefix of its own
per N, so every N starts from empty keys), and three measurements:

  gifts      ``--senders`` raw connections spread round-robin over the N hubs, each
             with one gift outstanding into its own live room (closed loop, as
             ``gifts.py``): acked gifts/s over ``--duration`` s.
  batched    ``--viewers`` raw viewers spread round-robin over the hubs, all in
             ONE room; gifts offered open-loop at ``--rate``/s by senders spread
             over the hubs: bubbles delivered per second, all viewers together (as
             ``fanout.py``; a busy room's bubbles leave in ``batch`` frames).
  flat       the same with the hubs restarted with ``--batch-window 0`` (a frame
             per bubble) at ``--flat-rate``/s: the hubs' write path saturates,
             so this is the delivery capacity of the N processes.

With ``--workers`` (default: when ``gifting serve --help`` offers it) the same
runs are repeated with ONE ``gifting serve --workers N`` for each N > 1.

What this can and cannot show: the hubs, the store AND the load generator
(senders in this process, viewers in ``--client-procs`` processes) share the
machine's cores. On a 2-core machine one hub process already keeps about one
core busy at its peak and the store or the clients the other, so more hubs can
only move the same two cores around: expect ratios of about 0.8-1.5, not N.
The per-CPU-second figures in the JSON (``gifts_per_hub_cpu_s``,
``deliveries_per_hub_cpu_s``, ``gifts_per_store_cpu_s``) are what extrapolates to
machines with more cores; ``docs/scaling.md`` builds its capacity model on them.

``--cluster`` repeats every run against a 3-master Valkey Cluster started here
(``tests/valkey_cluster.py``; ``--cluster-replicas``, default 0; its nodes run
``appendfsync everysec``), ratios to the cluster's own 1-hub figure. Every key of
one ledger carries one hash tag, so one master does all the work there too: the
cluster rows show that adding masters adds nothing to one ledger's gifts/s.

``--ceiling`` (default on) also runs ``redis-benchmark``/``valkey-benchmark``
EVALSHA of gift.lua on the single store (the store's own Lua ceiling, as in
``gifts.py``) and reports the 1-hub gifts/s against it. ``--pubsub`` (default
on) measures the store's own fan-out: ``SPUBLISH`` of 200-byte messages on one
sharded channel with 1 and 32 bare subscriber connections (as 1 or 32 hubs
holding a room), deliveries per second and per store CPU-second.

Each window records the CPU of the hubs (a ``--workers`` supervisor with its
workers), of the ledger's store node and of every store node, of this process,
and of the machine: ``others_cpu_pct`` is what processes outside the benchmark
took meanwhile (a shared machine), ``irq_cpu_pct`` the kernel's interrupt work,
``steal_cpu_pct`` the hypervisor's; the script warns when others took > 20 %.

Every wait is bounded in time and every loop in count; only 127.0.0.1 is used.
Writes ``scripts/bench/results/scale.json`` (``value``, ``baseline`` = the 1-hub
figure of the same run, ``ratio``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402
import fanout as fo  # noqa: E402
import gifts as gf  # noqa: E402

from gifting.config import DEFAULT_CATALOG  # noqa: E402
from gifting.ledger import Ledger  # noqa: E402

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}
ROOM = "fan"
CONNECT_CONCURRENCY = 50  # per viewer process: stays under the listen backlog
READY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 10.0
JOIN_SETTLE = 1.0


# -- processes -----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid``'s live descendants, from the parent ids in /proc (bounded)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(kids.get(pid, []))
    while todo and len(out) < 256:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def proc_cpu(pids: list[int]) -> float:
    """utime + stime of these processes (one gone by now counts 0)."""
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += fo.cpu_s(p)
    return total


def serve_has_workers() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "gifting", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=c.ROOT,
    ).stdout
    return "--workers" in out


@contextlib.contextmanager
def hubs(
    url: str, prefix: str, n: int, workers: int, *extra: str
) -> Iterator[list[tuple[int, int]]]:
    """``n`` hub processes (or one with ``--workers workers``): [(port, pid)]."""
    with contextlib.ExitStack() as stack:
        if workers > 1:
            w = ("--workers", str(workers))
            procs = [stack.enter_context(c.hub_process(url, *w, *extra, prefix=prefix))]
        else:
            procs = [
                stack.enter_context(c.hub_process(url, *extra, prefix=prefix)) for _ in range(n)
            ]
        yield procs


def store_client(url: str) -> Any:
    """A client for a single store or a cluster (``gifting.cluster`` when present)."""
    try:
        from gifting.cluster import client
    except ImportError:
        import redis.asyncio as aioredis

        return aioredis.Redis.from_url(url)
    return client(url, timeout=10.0)


async def setup(url: str, prefix: str, senders: int, fan_senders: int) -> None:
    ledger = Ledger(store_client(url), prefix=prefix)
    try:
        await ledger.load(PRICES)
        await ledger.go_live(ROOM, "scale bench")
        for i in range(senders):
            await ledger.go_live(f"c{i}", "scale bench")
            await ledger.topup(f"s{i}", 10**12, f"scale-s{i}")
        for i in range(fan_senders):
            await ledger.topup(f"f{i}", 10**12, f"scale-f{i}")
    finally:
        await ledger.r.aclose()


def machine_times() -> tuple[float, float, float, float]:
    """Seconds of all cores so far: (user+nice+system, irq+softirq, steal, total)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2]) / tick, (v[5] + v[6]) / tick, v[7] / tick, sum(v) / tick


class CpuWindow:
    """CPU seconds of the hubs, the store, this process and the whole machine."""

    def __init__(self, hub_pids: list[int], store_pid: int, store_pids: list[int]) -> None:
        # With --workers the hub is the supervisor and its workers: count them all.
        self.hub_pids = [q for p in hub_pids for q in (p, *descendants(p))]
        self.store_pid = store_pid  # the ledger's (master) node
        self.store_pids = store_pids  # every store node (one, or the cluster's)

    def read(self) -> tuple[float, ...]:
        procs, irq, steal, total = machine_times()
        return (
            time.monotonic(),
            proc_cpu(self.hub_pids),
            proc_cpu([self.store_pid]),
            time.process_time(),
            procs + irq + steal,
            total,
            proc_cpu(self.store_pids),
            procs,
            irq,
            steal,
        )

    @staticmethod
    def diff(a: tuple[float, ...], b: tuple[float, ...]) -> dict[str, float]:
        wall = max(b[0] - a[0], 1e-9)
        return {
            "wall_s": round(wall, 3),
            "hub_cpu_s": round(b[1] - a[1], 3),
            "hubs_cpu_pct": round(100 * (b[1] - a[1]) / wall, 1),
            "store_cpu_s": round(b[2] - a[2], 3),
            "store_cpu_pct": round(100 * (b[2] - a[2]) / wall, 1),
            "senders_cpu_pct": round(100 * (b[3] - a[3]) / wall, 1),
            "machine_busy_pct": round(100 * (b[4] - a[4]) / max(b[5] - a[5], 1e-9), 1),
            "store_nodes_cpu_pct": round(100 * (b[6] - a[6]) / wall, 1),
            # Of one core, like the process figures: every process on the machine
            # (with the softirq work done on its behalf: tick accounting charges it
            # to the process too), the kernel's interrupt work alone (loopback TCP
            # is much of it), and the hypervisor's steal.
            "all_processes_cpu_pct": round(100 * (b[7] + b[8] - a[7] - a[8]) / wall, 1),
            "irq_cpu_pct": round(100 * (b[8] - a[8]) / wall, 1),
            "steal_cpu_pct": round(100 * (b[9] - a[9]) / wall, 1),
        }

    @staticmethod
    def others(win: dict[str, float], clients_pct: float = 0.0) -> float:
        """CPU % (of one core) used by processes outside this benchmark: other
        work on a shared machine, which the figures then did not get."""
        ours = win["hubs_cpu_pct"] + win["store_nodes_cpu_pct"] + win["senders_cpu_pct"]
        return round(win["all_processes_cpu_pct"] - ours - clients_pct, 1)


# -- (a) gifts/s, closed loop --------------------------------------------------


async def gifts_closed_loop(
    ports: list[int], senders: int, duration: float, cpu: CpuWindow
) -> dict[str, Any]:
    lat: list[float] = []
    ss: list[gf.Sender] = []
    try:
        for i in range(senders):
            raw = await c.open_raw(ports[i % len(ports)], f"/ws?token={c.token(f's{i}')}")
            s = gf.Sender("", f"c{i}", lat)
            s.transport, s.open = raw.transport, raw.open
            raw.transport.set_protocol(s)  # type: ignore[union-attr]
            s.send(msgpack.packb({"op": "join", "id": 1, "room": f"c{i}"}))
            ss.append(s)
        await asyncio.sleep(JOIN_SETTLE)  # joins answered (a join's reply starts nothing)
        lat.clear()  # the joins' replies counted as acks with no send time
        for s in ss:
            s.acked = 0
            s.running = True
            s.idle.clear()
            s.gift()
        await asyncio.sleep(0.5)  # past the first round trips
        a0, w0 = sum(s.acked for s in ss), cpu.read()
        await asyncio.sleep(duration)
        a1, w1 = sum(s.acked for s in ss), cpu.read()
        for s in ss:
            s.running = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*(s.idle.wait() for s in ss))
        errors = sum(s.errors for s in ss)
    finally:
        for s in ss:
            if s.transport is not None:
                s.transport.close()
    win = CpuWindow.diff(w0, w1)
    acked = a1 - a0
    rate = acked / win["wall_s"]
    lat.sort()
    return {
        "gifts_per_s": rate,
        "acked": acked,
        "errors": errors,
        "ack_p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
        "ack_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else None,
        "gifts_per_hub_cpu_s": acked / win["hub_cpu_s"] if win["hub_cpu_s"] > 0 else None,
        "gifts_per_store_cpu_s": acked / win["store_cpu_s"] if win["store_cpu_s"] > 0 else None,
        "others_cpu_pct": CpuWindow.others(win),
        **win,
    }


# -- (b) deliveries/s: viewers over the hubs, one room ---------------------------


async def deliveries(
    ports: list[int], n_viewers: int, rate: float, args: argparse.Namespace, cpu: CpuWindow
) -> dict[str, Any]:
    acks = {"ok": 0, "error": 0}
    codes: dict[str, int] = {}

    def on_reply(payload: bytes) -> None:
        msg = msgpack.unpackb(payload)
        if "ok" in msg:
            acks["ok"] += 1
        else:
            acks["error"] += 1
            code = str(msg.get("error", {}).get("code", "?"))
            codes[code] = codes.get(code, 0) + 1

    n_senders = max(1, math.ceil(rate / 250))  # under the hub's 500 gifts/s per connection
    vs = fo.Viewers(args.client_procs)
    senders: list[fo.Counter] = []
    try:
        cfg = {
            "ports": ports,
            "mode": "hub",
            "wire": 0,
            "room": ROOM,
            "max_s": args.duration + DRAIN_TIMEOUT + 120,
        }
        connected, failed, joined = await vs.start(cfg, n_viewers)
        for i in range(n_senders):
            s = await fo.connect(
                ports[i % len(ports)], f"/ws?token={c.token(f'f{i}')}", 0, on_reply
            )
            if s is None:
                raise RuntimeError(f"sender {i} could not connect")
            senders.append(s)
            s.send(fo.join_frame(ROOM))  # a gift needs its sender in the room
        if not await fo.wait_replies(senders, 1, 30):
            raise RuntimeError("the senders' joins were not answered")
        acks["ok"] = acks["error"] = 0
        await asyncio.sleep(JOIN_SETTLE)  # presence/top of the joins settle
        sent, running = 0, True
        run = os.urandom(4).hex()

        async def offer() -> None:
            nonlocal sent
            interval, t0 = 1.0 / rate, time.monotonic()
            for k in range(int(rate * (args.duration + 60))):
                if not running:
                    return
                delay = t0 + k * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                senders[k % len(senders)].send(
                    msgpack.packb(
                        {
                            "op": "gift",
                            "id": k % 2**30 + 1,
                            "room": ROOM,
                            "gift": "rose",
                            "key": f"{run}-{k}",
                        }
                    )
                )
                sent += 1

        snaps0 = await vs.snap()
        w0 = cpu.read()
        task = asyncio.create_task(offer())
        await asyncio.sleep(args.duration)
        snaps = await vs.snap()  # while the senders still send
        w1 = cpu.read()
        sent_window, ok_window = sent, acks["ok"]
        running = False
        await task
        firsts = [s["t_first"] for s in snaps if s["t_first"]]
        if not firsts:
            raise RuntimeError(
                f"no viewer received a bubble (acks {acks}, errors {codes}, viewers "
                f"{connected} joined {joined}, snaps {snaps})"
            )
        t_first = min(firsts)
        # Bubbles from the first one any viewer got to the snapshot (fanout.py's way).
        bubbles = sum(s["bubbles"] for s in snaps) / max(max(s["t"] for s in snaps) - t_first, 1e-9)
        frames = sum(s["frames"] for s in snaps) / max(max(s["t"] for s in snaps) - t_first, 1e-9)
        win = CpuWindow.diff(w0, w1)
        # Settle: every gift answered and the viewers' counts still (bounded).
        deadline, last, drained, fin, total = time.monotonic() + DRAIN_TIMEOUT, -1, False, snaps, -1
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            fin = await vs.snap()
            total = sum(s["bubbles"] for s in fin)
            if acks["ok"] + acks["error"] >= sent and total == last:
                drained = True
                break
            last = total
        closed = sum(s["closed"] for s in fin)
        expected = acks["ok"] * (connected - closed)
        in_window = sum(s["bubbles"] for s in snaps) - sum(s["bubbles"] for s in snaps0)
        viewer_cpu = [
            round(100 * (b["cpu"] - a["cpu"]) / max(b["t"] - a["t"], 1e-9), 1)
            for a, b in zip(snaps0, snaps, strict=True)
        ]
        return {
            "viewers": connected,
            "viewers_failed": failed,
            "joined": joined,
            "senders": n_senders,
            "bubbles_per_s": bubbles,
            "frames_per_s": frames,
            "offered_per_s": sent_window / win["wall_s"],
            "acked_per_s": ok_window / win["wall_s"],
            "deliveries_per_hub_cpu_s": (
                in_window / win["hub_cpu_s"] if win["hub_cpu_s"] > 0 else None
            ),
            "sent": sent,
            "acked": acks["ok"],
            "errors": acks["error"],
            "error_codes": codes,
            "drained": drained,
            "bubbles_expected": expected,
            "bubbles_received": total,
            "bubbles_lost": expected - total if drained else None,
            "closed_viewers": closed,
            "viewer_cpu_pct": viewer_cpu,
            "others_cpu_pct": CpuWindow.others(win, sum(viewer_cpu)),
            **win,
        }
    finally:
        for s in senders:
            if s.transport is not None:
                s.transport.abort()
        await asyncio.to_thread(vs.stop)


# -- the store's own pub/sub fan-out ---------------------------------------------


class Sub(asyncio.Protocol):
    """A bare subscriber connection: SSUBSCRIBE, then count the bytes that arrive."""

    def __init__(self, channel: bytes) -> None:
        self.channel, self.nbytes = channel, 0
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cmd = b"*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(self.channel), self.channel)
        transport.write(cmd)  # type: ignore[attr-defined]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.ready.set_result(None)  # the confirmation (it arrives alone)
            return
        self.nbytes += len(data)


async def pubsub_fanout(url: str, store_pid: int, subs: int, n: int) -> dict[str, Any] | None:
    """``subs`` subscribers (as ``subs`` hubs would be) on one sharded channel;
    ``redis-benchmark`` SPUBLISHes ``n`` 200-byte messages (-P 16): deliveries
    per second and per store CPU-second."""
    import shutil

    tool = shutil.which("valkey-benchmark") or shutil.which("redis-benchmark")
    if tool is None:
        return None
    channel, payload = b"{psbench}:room:x", b"m" * 200
    # The RESP2 push each subscriber gets per message.
    per_msg = len(
        b"*3\r\n$8\r\nsmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
        % (len(channel), channel, len(payload), payload)
    )
    loop = asyncio.get_running_loop()
    conns: list[Sub] = []
    try:
        for _ in range(subs):
            if url.startswith("unix://"):
                _, sp = await loop.create_unix_connection(
                    lambda: Sub(channel), url.removeprefix("unix://")
                )
            else:
                host, _, port = url.split("//", 1)[1].split("/", 1)[0].rpartition(":")
                _, sp = await loop.create_connection(lambda: Sub(channel), host, int(port))
            conns.append(sp)
        await asyncio.wait_for(asyncio.gather(*(sp.ready for sp in conns)), 30)
        where = ["-s", url.removeprefix("unix://")] if url.startswith("unix://") else ["-u", url]
        cmd = [tool, *where, "-n", str(n), "-c", "4", "-P", "16", "-q"]
        cmd += ["SPUBLISH", channel.decode(), payload.decode()]
        cpu0, t0 = fo.cpu_s(store_pid), time.monotonic()
        out = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, timeout=300
        )
        await asyncio.sleep(0.5)  # the last pushes reach the subscribers
        cpu1, t1 = fo.cpu_s(store_pid), time.monotonic()
    finally:
        for sp in conns:
            sp.transport.close()  # type: ignore[attr-defined]
    delivered = sum(sp.nbytes for sp in conns) // per_msg
    m = re.search(r"([\d.]+) requests per second", out.stdout)
    return {
        "subscribers": subs,
        "published_per_s": float(m.group(1)) if m else None,
        "deliveries": delivered,
        "deliveries_expected": n * subs,
        "deliveries_per_s": delivered / (t1 - t0 - 0.5),
        "deliveries_per_store_cpu_s": delivered / (cpu1 - cpu0) if cpu1 > cpu0 else None,
        "store_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
    }


# -- one configuration ---------------------------------------------------------


def run_config(
    label: str,
    url: str,
    store_pid: Callable[[str], int],
    store_pids: list[int],
    n: int,
    workers: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    factory = fo.loop_factory(args.loop)
    prefix = f"sc{label}"
    fan_senders = max(math.ceil(args.rate / 250), math.ceil(args.flat_rate / 250))
    asyncio.run(setup(url, prefix, args.senders, fan_senders))
    ledger_node = store_pid(prefix)
    out: dict[str, Any] = {"hubs": n, "workers": workers, "prefix": prefix}
    lf = ("--loop", args.loop)
    with hubs(url, prefix, n, workers, *lf) as hp:
        cpu = CpuWindow([pid for _, pid in hp], ledger_node, store_pids)
        ports = [port for port, _ in hp]  # --workers: one port, spread by the kernel
        with asyncio.Runner(loop_factory=factory) as r:
            out["gifts"] = r.run(gifts_closed_loop(ports, args.senders, args.duration, cpu))
        print(f"  {label}: gifts {out['gifts']['gifts_per_s']:.0f}/s", flush=True)
        with asyncio.Runner(loop_factory=factory) as r:
            out["batched"] = r.run(deliveries(ports, args.viewers, args.rate, args, cpu))
        print(f"  {label}: batched {out['batched']['bubbles_per_s']:.0f} bubbles/s", flush=True)
    with hubs(url, prefix, n, workers, *lf, "--batch-window", "0") as hp:
        cpu = CpuWindow([pid for _, pid in hp], ledger_node, store_pids)
        ports = [port for port, _ in hp]
        with asyncio.Runner(loop_factory=factory) as r:
            out["flat"] = r.run(deliveries(ports, args.viewers, args.flat_rate, args, cpu))
        print(f"  {label}: flat {out['flat']['bubbles_per_s']:.0f} bubbles/s", flush=True)
    return out


def run_set(
    url: str,
    store_pid: Callable[[str], int],
    store_pids: list[int],
    counts: list[int],
    use_workers: bool,
    args: argparse.Namespace,
    tag: str = "",
) -> dict[str, dict[str, Any]]:
    """Every hub count on one store (then ``serve --workers N`` for N > 1)."""
    runs: dict[str, dict[str, Any]] = {}
    for n in counts:
        print(f"{tag or 'store'}: {n} hub(s)", flush=True)
        runs[f"{tag}h{n}"] = run_config(f"{tag}h{n}", url, store_pid, store_pids, n, 1, args)
    if use_workers:
        for n in counts:
            if n > 1:
                print(f"{tag or 'store'}: 1 serve --workers {n}", flush=True)
                try:
                    runs[f"{tag}w{n}"] = run_config(
                        f"{tag}w{n}", url, store_pid, store_pids, 1, n, args
                    )
                except (RuntimeError, OSError) as exc:
                    print(f"  --workers {n} failed: {exc}", file=sys.stderr)
    return runs


def rows_for(kind: str, runs: dict[str, dict[str, Any]], base_key: str) -> list[dict[str, Any]]:
    base = runs[base_key]
    rows = []
    for res in runs.values():
        what = (
            f"{res['hubs']} hubs" if res["workers"] <= 1 else f"1 serve --workers {res['workers']}"
        )
        g, b, f = res["gifts"], res["batched"], res["flat"]
        rows += [
            c.row(
                f"{kind}{what}: acked gifts/s (closed loop, {g['errors']} errors)",
                g["gifts_per_s"],
                base["gifts"]["gifts_per_s"],
                "gifts/s",
                hubs_cpu_pct=g["hubs_cpu_pct"],
                store_cpu_pct=g["store_cpu_pct"],
                machine_busy_pct=g["machine_busy_pct"],
                others_cpu_pct=g["others_cpu_pct"],
            ),
            c.row(
                f"{kind}{what}: bubbles/s, one room, batched, "
                f"{b['offered_per_s']:.0f} gifts/s offered",
                b["bubbles_per_s"],
                base["batched"]["bubbles_per_s"],
                "bubbles/s",
                lost=b["bubbles_lost"],
                machine_busy_pct=b["machine_busy_pct"],
                others_cpu_pct=b["others_cpu_pct"],
            ),
            c.row(
                f"{kind}{what}: bubbles/s, one room, a frame per bubble",
                f["bubbles_per_s"],
                base["flat"]["bubbles_per_s"],
                "bubbles/s",
                lost=f["bubbles_lost"],
                hubs_cpu_pct=f["hubs_cpu_pct"],
                machine_busy_pct=f["machine_busy_pct"],
                others_cpu_pct=f["others_cpu_pct"],
            ),
        ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hubs", default="1,2,4", help="comma-separated hub counts (first = baseline)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--senders", type=int, default=200, help="closed-loop gift senders")
    ap.add_argument("--viewers", type=int, default=400, help="viewers in the one room")
    ap.add_argument("--rate", type=float, default=2000.0, help="gifts/s offered, batched run")
    ap.add_argument(
        "--flat-rate", type=float, default=400.0, help="gifts/s offered, frame per bubble"
    )
    ap.add_argument("--client-procs", type=int, default=2, choices=[1, 2, 3, 4])
    ap.add_argument("--fsync", default="always", choices=["always", "everysec"])
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    ap.add_argument(
        "--workers",
        default="auto",
        choices=["auto", "on", "off"],
        help="also run one `serve --workers N` per N > 1 (auto: when serve offers it)",
    )
    ap.add_argument(
        "--cluster", action="store_true", help="also run everything on a 3-master Valkey Cluster"
    )
    ap.add_argument("--cluster-replicas", type=int, default=0, choices=[0, 1, 2])
    ap.add_argument(
        "--pubsub",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the store's sharded pub/sub fan-out to 1 and 32 subscribers",
    )
    ap.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the store's EVALSHA gift.lua ceiling (redis-benchmark)",
    )
    args = ap.parse_args()
    counts = [int(v) for v in args.hubs.split(",") if v.strip()]
    if not counts or min(counts) < 1 or max(counts) > 8:
        ap.error("--hubs: 1 to 8 each")
    if args.duration <= 0 or args.duration > 120 or args.rate <= 0 or args.flat_rate <= 0:
        ap.error("need 0 < duration <= 120, rates > 0")
    if not 1 <= args.senders <= 2000 or not 1 <= args.viewers <= 20000:
        ap.error("--senders 1-2000, --viewers 1-20000")
    if args.cluster and not (c.ROOT / "tests" / "valkey_cluster.py").exists():
        ap.error("--cluster needs tests/valkey_cluster.py (the cluster harness)")
    has_workers = serve_has_workers()
    if args.workers == "on" and not has_workers:
        ap.error("--workers on: `gifting serve --help` has no --workers option")
    use_workers = has_workers and args.workers != "off"
    c.raise_nofile()
    signal.signal(signal.SIGTERM, fo.on_sigterm)  # clean up as on ctrl-C
    runs: dict[str, dict[str, Any]] = {}
    ceiling: float | None = None
    pubsub: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, c.store(Path(tmp), args.fsync) as st:
        assert st.proc is not None
        spid = st.proc.pid
        runs = run_set(st.url, lambda _prefix: spid, [spid], counts, use_workers, args)
        if args.ceiling:
            print("store ceiling (redis-benchmark EVALSHA gift.lua)", flush=True)
            ceiling = gf.store_ceiling(st.url, args.senders)
        if args.pubsub:
            for k, n in ((1, 2_000_000), (32, 200_000)):
                print(f"store pub/sub fan-out to {k} subscriber(s)", flush=True)
                res = asyncio.run(pubsub_fanout(st.url, spid, k, n))
                if res is not None:
                    pubsub.append(res)
    cruns: dict[str, dict[str, Any]] = {}
    if args.cluster:
        from tests.valkey_cluster import ValkeyCluster

        with (
            tempfile.TemporaryDirectory() as tmp,
            ValkeyCluster(Path(tmp), masters=3, replicas=args.cluster_replicas) as vc,
        ):
            pids = [n.proc.pid for n in vc.nodes if n.proc is not None]

            def master_pid(prefix: str) -> int:
                proc = vc.master_of(f"{{{prefix}}}:bal").proc
                assert proc is not None
                return proc.pid

            print(f"a Valkey Cluster: 3 masters, {args.cluster_replicas} replicas each")
            cruns = run_set(vc.url, master_pid, pids, counts, use_workers, args, "c")
    base = f"h{counts[0]}"
    rows = rows_for("", runs, base)
    if ceiling:
        rows.append(
            c.row(
                f"{counts[0]} hubs: acked gifts/s vs store ceiling",
                runs[base]["gifts"]["gifts_per_s"],
                ceiling,
                "gifts/s",
                note="redis-benchmark EVALSHA gift.lua -P 16, same store",
            )
        )
    for ps in pubsub:
        rows.append(
            c.row(
                f"store SPUBLISH deliveries/s to {ps['subscribers']} subscriber(s)",
                ps["deliveries_per_s"],
                None,
                "msgs/s",
                per_store_cpu_s=ps["deliveries_per_store_cpu_s"],
                published_per_s=ps["published_per_s"],
            )
        )
    if cruns:
        rows += rows_for("cluster, ", cruns, f"ch{counts[0]}")
    c.write_result(
        "scale",
        rows,
        {
            "hubs": counts,
            "duration": args.duration,
            "senders": args.senders,
            "viewers": args.viewers,
            "rate": args.rate,
            "flat_rate": args.flat_rate,
            "client_procs": args.client_procs,
            "fsync": args.fsync,
            "loop": fo.loop_name(args.loop),
            "workers": "measured" if use_workers else "not measured",
            "cluster": (
                f"3 masters, {args.cluster_replicas} replicas each, appendfsync everysec"
                if args.cluster
                else "not run (--cluster)"
            ),
            "store_ceiling_evalsha_per_s": ceiling,
            "store_pubsub": pubsub,
            "baseline": f"the {counts[0]}-hub figure of the same run (and store)",
            "note": (
                f"{os.cpu_count()} cores shared by the hubs, the store and the load "
                "generator: ratios show what splitting costs or gains on these cores, "
                "not what N machines would do; the per-CPU-second figures extrapolate"
            ),
            "runs": runs,
            "cluster_runs": cruns,
        },
    )
    for key, res in {**runs, **cruns}.items():
        busy = max(res[k]["others_cpu_pct"] for k in ("gifts", "batched", "flat"))
        if busy > 20:
            print(f"warning: {key}: other processes used up to {busy}% of a core meanwhile")
        for kind in ("batched", "flat"):
            if res[kind]["bubbles_lost"]:
                print(f"warning: {key} {kind}: {res[kind]['bubbles_lost']} bubbles lost")
            if res[kind]["closed_viewers"]:
                print(f"warning: {key} {kind}: {res[kind]['closed_viewers']} viewers closed")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
