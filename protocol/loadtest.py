"""Load test for a gifting hub over the public protocol and CLI only (never imports gifting).

    gifting-loadtest --viewers 2000 --rooms 1 --rate 200 --duration 20
    scripts/loadtest.py --url ws://127.0.0.1:8765/ws --data-dir .gifting --rate 500

R creators go live; N viewers connect (jittered, bounded concurrency), join
their room and count every bubble; a fraction of them are senders, topped up
over ``POST /admin/topup``. Gifts follow a precomputed open-model schedule:
each is sent at its time whether or not earlier ones were answered, so a slow
hub shows as latency, not as a lower rate. P spawned processes each own a
slice of the viewers and of the schedule, run their own event loop (uvloop
when installed) and report encoded HdrHistograms and counters to the parent,
which prints a table, writes a JSON report and a PNG, and exits 1 on any lost
or duplicated bubble, double spend, audit difference or failed setup.

Decisions, and what breaks if they change:

- Bubble latency is local receive time minus the bubble's ``time`` (the
  store's clock when the gift committed), measured at every viewer but the
  sender. A bubble carries nothing that names the send it came from, so a
  receiver in another process cannot know the send time; both clocks are the
  same machine's because only loopback targets are allowed. ``time`` is
  whole milliseconds, so values are up to 1 ms high. Send -> commit is in
  the ack latency.
- Ack latency runs from the moment the gift is handed to ``send_gift``
  (retries included) to its answer; how late the generator was against the
  schedule is reported apart (``send lag``), so a saturated load generator is
  not mistaken for a slow hub.
- Loss is counted by ``seq``: per room, every viewer should see each seq
  from the room's first to its last (and at least one per committed gift);
  what a viewer misses is lost, a seq seen twice (or going back) duplicated.
  A viewer the hub closes (say 4009, slow consumer) is not reconnected: what
  it missed counts as lost, and its close code is reported.
- Tokens: the contract fixes them (HS256 JWT with ``sub``, ``name``, ``exp``)
  and the README says where the secret lives (``GIFTING_SECRET`` or
  ``DIR/secret``). Ten thousand ``gifting token`` runs take about half an
  hour on two cores, so tokens are minted here, after checking that one from
  ``gifting token`` verifies with that secret; if it does not, every token
  comes from the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import random
import re
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

import jwt
import msgpack

from protocol import errors
from protocol.client import Client, ConnectionLost, new_key
from protocol.messages import SUBPROTOCOL_MSGPACK as _SUBPROTOCOL

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

__all__ = ["main"]

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_READY = re.compile(rb"gifting: serving http://127\.0\.0\.1:(\d+)/")
_HIST = (1, 60_000_000, 3)  # microseconds, 1 us .. 60 s, 3 significant digits
_QUIET = 3.0  # seconds without a bubble after which draining stops early
_ACK_BUDGET = 45.0  # after the last scheduled gift: 3 attempts x 10 s + backoff
_DRAIN_BUDGET = 30.0
_FINISH_BUDGET = 30.0
_PROGRESS_EVERY = 0.5

Msg = tuple[Any, ...]


# -- helpers shared by parent and workers ---------------------------------------


def _raise_nofile() -> None:
    """Thousands of sockets need more than the usual 1,024 descriptors; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _new_hist() -> Any:
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(*_HIST)


def _record(hist: Any, us: float, count: int = 1) -> None:
    hist.record_value(min(max(int(us), _HIST[0]), _HIST[1]), count)


def _gifting_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("gifting")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gifting"]


async def _cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``gifting ARGS``; return (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *_gifting_cmd(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "", f"gifting {args[0]} timed out after {timeout:.0f} s"
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


# -- the plan: who is who, who sends what when --------------------------------------


@dataclass(frozen=True)
class _ViewerSpec:
    user: str
    token: str
    room: str
    sender: bool


@dataclass(frozen=True)
class _Slice:
    """What one worker process owns; pickled to it at spawn."""

    index: int
    url: str
    creators: tuple[tuple[str, str], ...]  # (user id = room, token)
    viewers: tuple[_ViewerSpec, ...]
    schedule: tuple[tuple[float, int], ...]  # (seconds after start, index into viewers)
    gift: str
    ramp: float
    concurrency: int
    client_timeout: float
    latency_sample: float
    deflate: bool
    attempts: int
    setup_timeout: float
    hard_timeout: float
    seed: int


@dataclass
class _Plan:
    rooms: list[str]
    viewers: list[tuple[str, str]]  # (user, room), index = viewer number
    senders: dict[int, int] = field(default_factory=dict)  # viewer number -> gifts
    schedule: list[tuple[float, int]] = field(default_factory=list)  # (t, viewer number)


def _make_plan(args: argparse.Namespace, run: str) -> _Plan:
    rng = random.Random(args.seed)
    rooms = [f"lt{run}c{r}" for r in range(args.rooms)]
    viewers = [(f"lt{run}v{i}", rooms[i % args.rooms]) for i in range(args.viewers)]
    chosen: list[list[int]] = []
    for r in range(args.rooms):
        members = list(range(r, args.viewers, args.rooms))
        k = min(len(members), max(1, round(args.senders * len(members))))
        chosen.append(sorted(rng.sample(members, k)))
    plan = _Plan(rooms, viewers)
    total = max(1, round(args.rate * args.duration))
    for j in range(total):
        r = j % args.rooms
        sender = chosen[r][(j // args.rooms) % len(chosen[r])]
        plan.schedule.append((j / args.rate, sender))
        plan.senders[sender] = plan.senders.get(sender, 0) + 1
    return plan


# -- tokens and top-ups ----------------------------------------------------------


class _Minter:
    """Tokens per the contract; see the module docstring for why not one CLI run each."""

    def __init__(self, data_dir: Path | None) -> None:
        self.dd = ["--data-dir", str(data_dir)] if data_dir is not None else []
        self.data_dir = data_dir or Path(".gifting")
        self.secret: bytes | None = None

    async def check(self) -> None:
        rc, out, err = await _cli("token", "ltprobe", "--name", "probe", *self.dd)
        if rc != 0:
            raise RuntimeError(f"gifting token failed ({rc}): {err.strip()}")
        env = os.environ.get("GIFTING_SECRET")
        try:
            secret = env.encode() if env else (self.data_dir / "secret").read_bytes().strip()
            jwt.decode(out.strip(), secret, algorithms=["HS256"])
        except (OSError, jwt.InvalidTokenError):
            return
        self.secret = secret

    async def admin(self) -> str:
        rc, out, err = await _cli("token", "--admin", "--ttl", "86400", *self.dd)
        if rc != 0:
            raise RuntimeError(f"gifting token --admin failed ({rc}): {err.strip()}")
        return out.strip()

    async def mint(self, users: Sequence[str]) -> dict[str, str]:
        if self.secret is not None:
            now = int(time.time())
            claims = {"iat": now, "exp": now + 86400}
            return {
                u: jwt.encode({"sub": u, "name": u, **claims}, self.secret, algorithm="HS256")
                for u in users
            }
        sem = asyncio.Semaphore(os.cpu_count() or 2)
        tokens: dict[str, str] = {}

        async def one(user: str) -> None:
            async with sem:
                rc, out, err = await _cli("token", user, *self.dd)
            if rc != 0:
                raise RuntimeError(f"gifting token {user} failed ({rc}): {err.strip()}")
            tokens[user] = out.strip()

        async with asyncio.TaskGroup() as tg:
            for u in users:
                tg.create_task(one(u))
        return tokens


async def _post_json(
    host: str, port: int, path: str, body: dict[str, Any], token: str
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request on its own connection (the stdlib has no asyncio client)."""
    payload = json.dumps(body).encode()
    hosthdr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {hosthdr}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.encode() + payload)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        data = await reader.readexactly(length) if length else await reader.read(1 << 16)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    try:
        parsed = json.loads(data or b"{}")
    except ValueError:
        parsed = {"raw": data.decode(errors="replace")}
    return status, parsed if isinstance(parsed, dict) else {"value": parsed}


async def _topup(
    host: str, port: int, admin: str, amounts: dict[str, int], run: str, timeout: float
) -> None:
    """Top everyone up over the admin API, 32 requests at a time, each retried twice."""
    sem = asyncio.Semaphore(32)

    async def one(user: str, coins: int) -> None:
        last = ""
        for attempt in range(3):
            async with sem:
                try:
                    status, body = await _post_json(
                        host,
                        port,
                        "/admin/topup",
                        {"user": user, "coins": coins, "key": f"loadtest:{run}:{user}"},
                        admin,
                    )
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                    status, body = 0, {"error": repr(exc)}
            if status == 200:
                return
            last = f"{status} {body}"
            await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"top-up of {user} failed: {last}")

    async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
        for user, coins in amounts.items():
            tg.create_task(one(user, coins))


# -- the hub, when we start it -----------------------------------------------------


@contextlib.asynccontextmanager
async def _own_hub(data_dir: Path, extra: Sequence[str]) -> AsyncIterator[int]:
    """``gifting serve --port 0`` on a fresh dir; yields its port; SIGTERM at the end."""
    log = (data_dir / "hub.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *_gifting_cmd(),
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--no-demo",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        port = 0
        async with asyncio.timeout(60):
            for _ in range(1000):
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError("the hub exited before it was ready; see hub.log")
                m = _READY.search(line)
                if m:
                    port = int(m.group(1))
                    break
        if not port:
            raise RuntimeError("the hub never printed its ready line")
        yield port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


# -- worker process ------------------------------------------------------------------


class _Stats:
    """One process's measurements; ``sec`` keys are whole seconds since the start."""

    def __init__(self) -> None:
        self.t0 = math.inf
        self.series: dict[int, list[int]] = {}  # sec -> [sent, acked, errors, bubbles]
        self.ack: dict[int, Any] = {}  # sec -> HdrHistogram (us)
        self.bubble: dict[int, Counter[int]] = {}  # sec -> Counter(latency in 0.1 ms)
        self.lag = _new_hist()
        self.errors: Counter[str] = Counter()
        self.acked_by_room: Counter[str] = Counter()
        self.unknown_by_room: Counter[str] = Counter()
        self.sent = self.acked = self.failed = self.bubbles = 0
        self.retries = self.duplicates = 0
        self.last_bubble = 0.0  # monotonic
        self.creator_gifts: Counter[str] = Counter()

    def row(self, sec: int) -> list[int]:
        r = self.series.get(sec)
        if r is None:
            r = self.series[sec] = [0, 0, 0, 0]
        return r


class _Viewer:
    __slots__ = (
        "after",
        "acked",
        "before",
        "client",
        "close_code",
        "dups",
        "failed",
        "first",
        "gaps",
        "last",
        "room",
        "spec",
        "stats",
        "timed",
        "unique",
        "unknown",
        "user",
    )

    def __init__(self, spec: _ViewerSpec, stats: _Stats) -> None:
        self.spec, self.user, self.room, self.stats = spec, spec.user, spec.room, stats
        self.timed = True  # senders are few: each times every bubble
        self.client: Client | None = None
        self.first = self.last = -1
        self.unique = self.dups = self.gaps = 0
        self.acked = self.unknown = 0
        self.before: int | None = None
        self.after: int | None = None
        self.close_code: int | None = None
        self.failed = ""

    def on_frame(self, frame: bytes | str) -> bool:
        """Count a room frame's bubbles (decoded once per process); replies go on."""
        text = isinstance(frame, str)
        payload = frame.encode() if isinstance(frame, str) else frame
        got = _decode_bubbles(payload, text, False)
        if got is None:
            return False
        if got[0] or got[3]:
            _count_bubbles(self, *got)
        return True


# What a watching viewer offers, as browsers do (the hub keeps no context, so a
# message inflates on its own).
_DEFLATE_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"

# Frames a process has decoded, by payload: a hub sends one room's members the
# very same frame, so each distinct frame is decoded once per process, not once
# per viewer. Bounded: cleared when full.
_DECODED: dict[bytes, tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...], int]] = {}
_DECODED_MAX = 4096


def _inflate(payload: bytes) -> bytes:
    """A permessage-deflate message (RFC 7692; the hub keeps no context)."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def _decode_bubbles(
    payload: bytes, text: bool, compressed: bool
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...], int] | None:
    """(seqs, times, senders, bubbles without seq) of an event frame; None for a reply."""
    hit = _DECODED.get(payload)
    if hit is not None:
        return hit
    data = _inflate(payload) if compressed else payload
    msg = json.loads(data) if text else msgpack.unpackb(data, raw=False)
    if not isinstance(msg, dict) or "ev" not in msg:
        return None
    events = msg.get("events", []) if msg["ev"] == "batch" else [msg]
    seqs: list[int] = []
    times: list[int] = []
    froms: list[str] = []
    bad = 0
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ev") != "bubble":
            continue
        seq, sent, frm = ev.get("seq"), ev.get("time"), ev.get("from")
        if type(seq) is not int:
            bad += 1
            continue
        seqs.append(seq)
        times.append(sent if type(sent) is int else -1)
        froms.append(str(frm.get("user")) if isinstance(frm, dict) else "")
    out = (tuple(seqs), tuple(times), tuple(froms), bad)
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    _DECODED[payload] = out
    return out


class _Watcher(asyncio.Protocol):
    """A viewer who only watches, on a bare WebSocket (RFC 6455) connection.

    Thousands of full clients cost the load generator more CPU than the hub
    spends serving them, so a viewer who never sends speaks the protocol
    directly: ``?token=`` auth, one ``join``, then it counts the bubbles of
    each frame (decoded once per process, see ``_decode_bubbles``), answers
    pings and records the close code. Only sampled watchers time every bubble.
    """

    def __init__(
        self, spec: _ViewerSpec, stats: _Stats, url: str, timed: bool, deflate: bool
    ) -> None:
        self.spec, self.user, self.room, self.stats = spec, spec.user, spec.room, stats
        self.url, self.timed, self.deflate = url, timed, deflate
        self.first = self.last = -1
        self.unique = self.dups = self.gaps = 0
        self.acked = self.unknown = 0
        self.before: int | None = None
        self.after: int | None = None
        self.close_code: int | None = None
        self.failed = ""
        self.client: _Watcher | None = None
        self.closed = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = self.closing = False
        self.opened: asyncio.Future[None] | None = None
        self.reply: asyncio.Future[dict[str, Any]] | None = None

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses)
        self.transport = transport = cast(asyncio.Transport, transport)
        parts = urlsplit(self.url)
        key = base64.b64encode(os.urandom(16)).decode()
        path = f"{parts.path or '/ws'}?token={quote(self.spec.token)}"
        transport.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {_SUBPROTOCOL}\r\n"
                f"{_DEFLATE_OFFER if self.deflate else ''}\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None and self.upgraded and not self.closing:
            self.close_code = 1006
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionLost(self.close_code or 1006, ""))
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head, buf = buf[:end], buf[end + 4 :]
            assert self.opened is not None
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(head[:80].decode(errors="replace")))
                self.buf = b""
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.opened.set_result(None)
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1]
            ln, hdr = b1 & 0x7F, 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, hdr = int.from_bytes(buf[pos + 2 : pos + 4]), 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, hdr = int.from_bytes(buf[pos + 2 : pos + 10]), 10
            if n - pos < hdr + ln:
                break
            b0 = buf[pos]
            self._frame(b0 & 0x0F, buf[pos + hdr : pos + hdr + ln], bool(b0 & 0x40))
            pos += hdr + ln
        self.buf = buf[pos:] if pos < n else b""

    # -- frames ----------------------------------------------------------------
    def _frame(self, op: int, payload: bytes, compressed: bool) -> None:
        if op in (1, 2):
            got = _decode_bubbles(payload, op == 1, compressed)
            if got is None:
                if compressed:
                    payload = _inflate(payload)
                msg = json.loads(payload) if op == 1 else msgpack.unpackb(payload, raw=False)
                if self.reply is not None and not self.reply.done():
                    self.reply.set_result(msg)
            elif got[0] or got[3]:
                _count_bubbles(self, *got)
        elif op == 9:  # ping -> pong
            self._send(0x8A, payload)
        elif op == 8:  # close: answer it (unless it answers ours); the hub closes the socket
            if not self.closing:
                self.close_code = int.from_bytes(payload[:2]) if len(payload) >= 2 else 1005
                self._send(0x88, payload[:2])

    def _send(self, first: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        assert n < 126 or first == 0x82
        head = bytes([first, 0x80 | n]) if n < 126 else bytes([first, 0xFE]) + n.to_bytes(2)
        # A zero masking key is a valid mask (RFC 6455 5.3) and leaves the payload as is.
        self.transport.write(head + b"\0\0\0\0" + payload)

    # -- what the worker calls -------------------------------------------------
    async def open(self, timeout: float) -> None:
        parts = urlsplit(self.url)
        loop = asyncio.get_running_loop()
        self.opened = loop.create_future()
        self.buf, self.upgraded, self.close_code, self.closing = b"", False, None, False
        self.closed.clear()
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                lambda: self, parts.hostname or "127.0.0.1", parts.port or 80
            )
            await self.opened

    async def join(self, timeout: float) -> None:
        self.reply = asyncio.get_running_loop().create_future()
        self._send(0x82, msgpack.packb({"op": "join", "id": 1, "room": self.room}))
        async with asyncio.timeout(timeout):
            msg = await self.reply
        if not isinstance(msg, dict) or "ok" not in msg:
            err = msg.get("error", {}) if isinstance(msg, dict) else {}
            raise errors.error_for_code(str(err.get("code")), str(err.get("message")))

    async def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._send(0x88, (1000).to_bytes(2))
        self.closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.closed.wait()
        self.transport.abort()


def _count_bubbles(
    self: _Viewer | _Watcher,
    seqs: tuple[int, ...],
    times: tuple[int, ...],
    froms: tuple[str, ...],
    bad: int,
) -> None:
    """One frame's bubbles seen by one viewer: loss and duplicates by ``seq``,
    and, if the viewer is timed, the latency of each bubble it did not send."""
    st = self.stats
    if bad:
        st.errors["bubble_without_seq"] += bad
    k = len(seqs)
    if not k:
        return
    last = self.last
    if last >= 0 and seqs[0] == last + 1 and seqs[-1] == last + k:
        self.last = seqs[-1]  # the usual case: the next k seqs, in order
        self.unique += k
    else:
        for seq in seqs:
            last = self.last
            if last < 0:
                self.first = self.last = seq
                self.unique = 1
            elif seq > last:
                self.gaps += seq - last - 1
                self.last = seq
                self.unique += 1
            else:
                self.dups += 1
    now = time.time()
    st.bubbles += k
    st.last_bubble = time.monotonic()
    sec = int(now - st.t0) if now >= st.t0 else -1
    st.row(sec)[3] += k
    if self.timed:
        lat = st.bubble.get(sec)
        if lat is None:
            lat = st.bubble[sec] = Counter()
        ms = now * 1000.0
        for sent, frm in zip(times, froms, strict=True):
            if sent >= 0 and frm != self.user:
                lat[max(0, int((ms - sent) * 10.0))] += 1


class _Worker:
    def __init__(self, sl: _Slice, results: Queue[Msg], control: Queue[Msg]) -> None:
        self.sl, self.results, self.control = sl, results, control
        self.stats = _Stats()
        every = max(1, round(1 / sl.latency_sample))
        self.viewers: list[_Viewer | _Watcher] = [
            _Viewer(v, self.stats)
            if v.sender
            else _Watcher(v, self.stats, sl.url, i % every == 0, sl.deflate)
            for i, v in enumerate(sl.viewers)
        ]
        self.creators: list[Client] = []
        self.connect_errors: Counter[str] = Counter()
        self.earned: dict[str, int] = {}

    def put(self, *msg: Any) -> None:
        self.results.put((msg[0], self.sl.index, *msg[1:]))

    async def order(self, want: str, timeout: float) -> Msg:
        try:
            msg: Msg = await asyncio.to_thread(self.control.get, True, timeout)
        except queue.Empty:
            raise TimeoutError(f"no {want!r} from the parent in {timeout:.0f} s") from None
        if msg[0] != want:
            raise RuntimeError(f"parent said {msg[0]!r}, expected {want!r}")
        return msg

    async def run(self) -> None:
        sl, st = self.sl, self.stats
        async with asyncio.timeout(sl.hard_timeout):
            t = time.monotonic()
            await self.setup()
            self.put(
                "ready", {"seconds": time.monotonic() - t, "errors": dict(self.connect_errors)}
            )
            st.t0 = (await self.order("start", sl.setup_timeout + 60))[1]
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.progress(stop))
                try:
                    await self.send_all()
                    self.put("sent", dict(st.acked_by_room), dict(st.unknown_by_room))
                    targets: dict[str, int] = (await self.order("drain", _ACK_BUDGET + 60))[1]
                    await self.drain(targets)
                finally:
                    stop.set()
            await self.finish()
            self.put("final", self.payload())

    async def setup(self) -> None:
        sl = self.sl
        for user, token in sl.creators:
            cr = _Creator(user, self.stats)
            c = await Client.connect(
                sl.url, token=token, timeout=sl.client_timeout, on_event=cr.on_event
            )
            self.creators.append(c)
            await c.request("go_live", title="load test")
        rng = random.Random(sl.seed * 1009 + sl.index)
        sem = asyncio.Semaphore(sl.concurrency)
        async with asyncio.timeout(sl.setup_timeout), asyncio.TaskGroup() as tg:
            for v in self.viewers:
                tg.create_task(self.connect(v, rng.uniform(0, sl.ramp), sem))

    async def connect(self, v: _Viewer | _Watcher, delay: float, sem: asyncio.Semaphore) -> None:
        """Open, join (and, for a sender, read the balance): three tries, each
        failure counted by reason and its connection closed."""
        await asyncio.sleep(delay)
        for attempt in range(3):
            async with sem:
                conn: Client | _Watcher = v if isinstance(v, _Watcher) else self._client(v)
                try:
                    if isinstance(conn, _Watcher):
                        await conn.open(self.sl.client_timeout)
                        await conn.join(self.sl.client_timeout)
                    else:
                        await conn.open()
                        await conn.request("join", room=v.room)
                        if v.spec.sender:
                            v.before = int((await conn.request("balance"))["coins"])
                    v.client = conn
                    return
                except Exception as exc:  # any failure is counted, the viewer retried
                    v.failed = _reason(exc)
                    self.connect_errors[v.failed] += 1
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(0.5 * (attempt + 1))

    def _client(self, v: _Viewer) -> Client:
        return Client(
            self.sl.url, token=v.spec.token, timeout=self.sl.client_timeout, on_frame=v.on_frame
        )

    async def progress(self, stop: asyncio.Event) -> None:
        st = self.stats
        for _ in range(int(self.sl.hard_timeout / _PROGRESS_EVERY) + 1):
            self.put("progress", (st.sent, st.acked, st.failed, st.bubbles))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PROGRESS_EVERY):
                    await stop.wait()
            if stop.is_set():
                return

    async def send_all(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time() + (self.stats.t0 - time.time())
        async with asyncio.TaskGroup() as tg:
            for at, i in self.sl.schedule:
                delay = start + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                v = self.viewers[i]
                if not isinstance(v, _Viewer) or v.client is None:
                    continue  # never connected: counted in the setup errors
                tg.create_task(self.gift(v, self.stats.t0 + at))

    async def gift(self, v: _Viewer, planned: float) -> None:
        st = self.stats
        assert v.client is not None
        now = time.time()
        _record(st.lag, (now - planned) * 1e6)
        st.row(int(now - st.t0))[0] += 1
        st.sent += 1
        t = time.perf_counter()
        try:
            res = await v.client.send_gift(
                v.room,
                self.sl.gift,
                1,
                key=new_key(),
                attempts=self.sl.attempts,
                backoff=0.2,
                on_retry=self.retried,
            )
        except Exception as exc:
            code = exc.code.value if isinstance(exc, errors.GiftingError) else _reason(exc)
            st.errors[code] += 1
            st.failed += 1
            st.row(int(time.time() - st.t0))[2] += 1
            # Only these leave the gift's fate open: it may have committed.
            if not isinstance(exc, errors.GiftingError) or isinstance(exc, errors.Unavailable):
                v.unknown += 1
                st.unknown_by_room[v.room] += 1
            return
        us = (time.perf_counter() - t) * 1e6
        sec = int(time.time() - st.t0)
        h = st.ack.get(sec)
        if h is None:
            h = st.ack[sec] = _new_hist()
        _record(h, us)
        st.row(sec)[1] += 1
        st.acked += 1
        v.acked += 1
        st.acked_by_room[v.room] += 1
        if res.get("duplicate"):
            st.duplicates += 1

    def retried(self, attempt: int, exc: BaseException) -> None:
        self.stats.retries += 1

    async def drain(self, targets: dict[str, int]) -> None:
        """Wait until every viewer has as many bubbles as its room committed gifts."""
        st = self.stats
        for _ in range(int(_DRAIN_BUDGET / 0.1)):
            live = [
                v for v in self.viewers if v.client is not None and not v.client.closed.is_set()
            ]
            if all(v.unique >= targets.get(v.room, 0) for v in live):
                return
            if time.monotonic() - st.last_bubble > _QUIET:
                return
            await asyncio.sleep(0.1)

    async def finish(self) -> None:
        for v in self.viewers:
            if v.client is not None and v.client.closed.is_set():
                v.close_code = v.client.close_code
        sem = asyncio.Semaphore(self.sl.concurrency)

        async def balance(v: _Viewer) -> None:
            assert v.client is not None
            async with sem:
                with contextlib.suppress(Exception):
                    if v.client.closed.is_set():
                        await v.client.open()
                    v.after = int((await v.client.request("balance"))["coins"])

        async def end(c: Client) -> None:
            with contextlib.suppress(Exception):
                res = await c.request("end_live")
                self.earned[str(res["room"])] = int(res["coins"])

        async def close(c: Client | _Watcher) -> None:
            async with sem:
                with contextlib.suppress(Exception):
                    await c.close()

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FINISH_BUDGET / 2), asyncio.TaskGroup() as tg:
                for v in self.viewers:
                    if isinstance(v, _Viewer) and v.client is not None:
                        tg.create_task(balance(v))
                for c in self.creators:
                    tg.create_task(end(c))
        clients: list[Client | _Watcher] = [v.client for v in self.viewers if v.client]
        clients.extend(self.creators)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FINISH_BUDGET / 2), asyncio.TaskGroup() as tg:
                for one in clients:
                    tg.create_task(close(one))

    def payload(self) -> dict[str, Any]:
        st = self.stats
        bubble: dict[int, bytes] = {}
        for sec, counts in st.bubble.items():
            h = _new_hist()
            for tenth_ms, n in counts.items():
                _record(h, tenth_ms * 100, n)
            bubble[sec] = h.encode()
        return {
            "series": st.series,
            "ack": {sec: h.encode() for sec, h in st.ack.items()},
            "bubble": bubble,
            "lag": st.lag.encode(),
            "errors": dict(st.errors),
            "sent": st.sent,
            "acked": st.acked,
            "retries": st.retries,
            "duplicates": st.duplicates,
            "connect_errors": dict(self.connect_errors),
            "creator_gifts": dict(st.creator_gifts),
            "earned": self.earned,
            "viewers": [
                (
                    v.room,
                    v.first,
                    v.last,
                    v.unique,
                    v.dups,
                    v.gaps,
                    v.close_code,
                    v.client is not None,
                )
                for v in self.viewers
            ],
            "senders": [
                (v.user, v.room, v.before, v.after, v.acked, v.unknown)
                for v in self.viewers
                if v.spec.sender
            ],
        }


class _Creator:
    __slots__ = ("stats", "user")

    def __init__(self, user: str, stats: _Stats) -> None:
        self.user, self.stats = user, stats

    def on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("ev") == "gift":
            self.stats.creator_gifts[self.user] += 1


def _reason(exc: BaseException) -> str:
    if isinstance(exc, errors.GiftingError):
        return exc.code.value
    if isinstance(exc, ConnectionLost):
        return f"closed_{exc.code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


def _worker(sl: _Slice, results: Queue[Msg], control: Queue[Msg]) -> None:
    """Entry point of a spawned process: one event loop for one slice."""
    _raise_nofile()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_Worker(sl, results, control).run())
    except BaseException as exc:
        results.put(("fatal", sl.index, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


# -- parent: drive the workers ---------------------------------------------------------


class _Abort(Exception):
    pass


class _Driver:
    def __init__(self, slices: list[_Slice], scheduled: int, show: bool) -> None:
        self.slices, self.scheduled, self.show = slices, scheduled, show
        ctx = mp.get_context("spawn")
        self.results: Queue[Msg] = ctx.Queue()
        self.controls: list[Queue[Msg]] = [ctx.Queue() for _ in slices]
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(s, self.results, self.controls[s.index]),
                name=f"loadtest-{s.index}",
                daemon=True,
            )
            for s in slices
        ]
        self.ready: dict[int, dict[str, Any]] = {}
        self.progress: dict[int, tuple[int, int, int, int]] = {}
        self.sent: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        self.final: dict[int, dict[str, Any]] = {}
        self.t0 = 0.0
        self.setup_seconds = 0.0

    async def pump(self, done: Callable[[], bool], until: float) -> bool:
        """Take worker messages until ``done()`` (True) or ``until`` (monotonic, False)."""
        loop = asyncio.get_running_loop()
        for _ in range(int(max(0.0, until - loop.time()) / 0.05) + 1000):
            if done():
                return True
            left = until - loop.time()
            if left <= 0:
                return False
            try:
                msg: Msg = await asyncio.to_thread(self.results.get, True, min(0.25, left))
            except queue.Empty:
                dead = [p.name for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise _Abort(f"worker died: {', '.join(dead)}") from None
                continue
            tag, idx = msg[0], msg[1]
            if tag == "fatal":
                raise _Abort(f"worker {idx} failed: {msg[2]}")
            if tag == "ready":
                self.ready[idx] = msg[2]
            elif tag == "progress":
                self.progress[idx] = msg[2]
            elif tag == "sent":
                self.sent[idx] = (msg[2], msg[3])
            elif tag == "final":
                self.final[idx] = msg[2]
        return done()

    async def run(self, setup_timeout: float, duration: float) -> None:
        from tqdm import tqdm

        loop = asyncio.get_running_loop()
        t = loop.time()
        for p in self.procs:
            p.start()
        n = len(self.procs)
        if not await self.pump(lambda: len(self.ready) == n, t + setup_timeout + 30):
            raise _Abort(f"setup took more than {setup_timeout + 30:.0f} s")
        self.setup_seconds = loop.time() - t
        self.t0 = time.time() + 1.0
        for c in self.controls:
            c.put(("start", self.t0))
        bar = tqdm(
            total=self.scheduled,
            unit="gift",
            desc="answered",
            mininterval=0.5,
            disable=not self.show,
            dynamic_ncols=True,
        )
        end = loop.time() + 1.0 + duration + _ACK_BUDGET
        last = (time.monotonic(), 0)
        try:
            for _ in range(int((end - loop.time()) / 0.5) + 2):
                if await self.pump(lambda: len(self.sent) == n, min(end, loop.time() + 0.5)):
                    break
                if loop.time() >= end:
                    raise _Abort("timed out waiting for the gifts to be answered")
                sent, acked, failed, bubbles = (
                    sum(p[k] for p in self.progress.values()) for k in range(4)
                )
                now = time.monotonic()
                rate = (bubbles - last[1]) / max(now - last[0], 1e-3)
                last = (now, bubbles)
                bar.n = acked + failed
                bar.set_postfix(sent=sent, acked=acked, errors=failed, bubbles_s=f"{rate:,.0f}")
            if len(self.sent) != n:
                raise _Abort("timed out waiting for the gifts to be answered")
            bar.n = sum(sum(a.values()) for a, _ in self.sent.values())
            bar.refresh()
        finally:
            bar.close()
        targets: Counter[str] = Counter()
        for acked_by_room, _unknown in self.sent.values():
            targets.update(acked_by_room)
        for c in self.controls:
            c.put(("drain", dict(targets)))
        until = loop.time() + _DRAIN_BUDGET + _FINISH_BUDGET + 30
        if not await self.pump(lambda: len(self.final) == n, until):
            raise _Abort("timed out waiting for the workers' results")

    async def stop(self) -> None:
        for p in self.procs:
            if p.pid is None:
                continue
            await asyncio.to_thread(p.join, 10)
            if p.is_alive():
                p.terminate()
                await asyncio.to_thread(p.join, 5)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)


# -- results -------------------------------------------------------------------------


def _merge(encoded: Sequence[bytes]) -> Any:
    h = _new_hist()
    for e in encoded:
        h.decode_and_add(e)
    return h


def _summary(h: Any) -> dict[str, float]:
    """Percentiles in milliseconds, and the count."""
    n = int(h.get_total_count())
    out: dict[str, float] = {"count": n}
    if n:
        for name, pct in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
            out[name] = int(h.get_value_at_percentile(pct)) / 1000
        out["max"] = int(h.get_max_value()) / 1000
        out["mean"] = round(float(h.get_mean_value()) / 1000, 3)
    return out


def _analyse(
    args: argparse.Namespace, drv: _Driver, scheduled: int, price: int
) -> tuple[dict[str, Any], list[str]]:
    """Merge what the workers sent into the report, and list every reason to fail."""
    finals = list(drv.final.values())
    failures: list[str] = []
    secs = sorted({s for f in finals for s in f["series"] if s >= 0})
    series: list[dict[str, Any]] = []
    for sec in range(secs[-1] + 1 if secs else 0):
        rows = [f["series"].get(sec, [0, 0, 0, 0]) for f in finals]
        ack = _summary(_merge([f["ack"][sec] for f in finals if sec in f["ack"]]))
        bub = _summary(_merge([f["bubble"][sec] for f in finals if sec in f["bubble"]]))
        series.append(
            {
                "t": sec,
                "sent": sum(r[0] for r in rows),
                "acked": sum(r[1] for r in rows),
                "errors": sum(r[2] for r in rows),
                "bubbles": sum(r[3] for r in rows),
                "ack_ms": {k: v for k, v in ack.items() if k in ("p50", "p99", "max")},
                "bubble_ms": {k: v for k, v in bub.items() if k in ("p50", "p99", "max")},
            }
        )
    ack = _summary(_merge([e for f in finals for e in f["ack"].values()]))
    bubble = _summary(_merge([e for f in finals for e in f["bubble"].values()]))
    lag = _summary(_merge([f["lag"] for f in finals]))

    acked_room: Counter[str] = Counter()
    unknown_room: Counter[str] = Counter()
    for a, u in drv.sent.values():
        acked_room.update(a)
        unknown_room.update(u)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    viewers = [v for f in finals for v in f["viewers"]]
    for room, f_seq, l_seq, _u, _d, _g, _c, connected in viewers:
        if connected and f_seq >= 0:
            first[room] = min(first.get(room, f_seq), f_seq)
            last[room] = max(last.get(room, l_seq), l_seq)
    expected: dict[str, int] = {}
    phantom = 0
    for room in set(first) | set(acked_room):
        span = last[room] - first[room] + 1 if room in first else 0
        expected[room] = max(span, acked_room[room])
        phantom += max(0, span - acked_room[room] - unknown_room[room])
    lost = gaps = dups = lost_closed = connected_n = received = 0
    closes: Counter[str] = Counter()
    for room, _f, _l, unique, d, g, close, connected in viewers:
        if not connected:
            continue
        connected_n += 1
        missing = max(0, expected.get(room, 0) - unique)
        lost += missing
        gaps += g
        dups += d
        received += unique + d
        if close is not None:
            closes[str(close)] += 1
            lost_closed += missing
    senders = [s for f in finals for s in f["senders"]]
    double: list[str] = []
    undebited: list[str] = []
    unchecked = 0
    for user, _room, before, after, acked, unknown in senders:
        if before is None or after is None:
            unchecked += unknown + acked > 0
            continue
        spent = before - after
        if spent > (acked + unknown) * price:
            double.append(f"{user}: lost {spent} coins for {acked} acked gifts of {price}")
        elif spent < acked * price:
            undebited.append(f"{user}: lost {spent} coins for {acked} acked gifts of {price}")
    errs: Counter[str] = Counter()
    conn_errs: Counter[str] = Counter()
    for f in finals:
        errs.update(f["errors"])
        conn_errs.update(f["connect_errors"])
    sent = sum(f["sent"] for f in finals)
    acked = sum(f["acked"] for f in finals)
    bubbles_total = sum(r["bubbles"] for r in series)
    ack_secs = [r["t"] for r in series if r["acked"]]
    bub_secs = [r["t"] for r in series if r["bubbles"]]
    ack_span = max(args.duration, ack_secs[-1] + 1 if ack_secs else 0)
    bub_span = max(args.duration, bub_secs[-1] + 1 if bub_secs else 0)
    not_connected = args.viewers - connected_n

    if not_connected:
        failures.append(f"{not_connected} of {args.viewers} viewers could not connect")
    if lost:
        failures.append(f"{lost} bubbles lost ({lost_closed} by viewers the hub closed)")
    if dups:
        failures.append(f"{dups} bubbles duplicated")
    if phantom:
        failures.append(f"{phantom} bubbles (seq values) with no committed gift behind them")
    if double:
        failures.append(f"{len(double)} senders double-spent, e.g. {double[0]}")
    if undebited:
        failures.append(f"{len(undebited)} senders paid less than acked, e.g. {undebited[0]}")
    if unchecked:
        failures.append(f"{unchecked} senders' balances could not be read back")
    report: dict[str, Any] = {
        "setup": {
            "viewers": args.viewers,
            "connected": connected_n,
            "connect_errors": dict(conn_errs),
            "seconds": round(drv.setup_seconds, 2),
        },
        "gifts": {
            "scheduled": scheduled,
            "sent": sent,
            "acked": acked,
            "duplicate_answers": sum(f["duplicates"] for f in finals),
            "retries": sum(f["retries"] for f in finals),
            "unknown_fate": sum(unknown_room.values()),
            "errors": dict(errs),
            "offered_per_s": round(scheduled / args.duration, 2),
            "achieved_per_s": round(acked / ack_span, 2),
            "price": price,
        },
        "ack_latency_ms": ack,
        "bubble_latency_ms": bubble,
        "send_lag_ms": lag,
        "bubbles": {
            "received": bubbles_total,
            "per_s": round(bubbles_total / bub_span, 1),
            "peak_per_s": max((r["bubbles"] for r in series), default=0),
            "expected_per_viewer": expected,
            "lost": lost,
            "lost_in_gaps": gaps,
            "lost_by_closed_viewers": lost_closed,
            "duplicated": dups,
            "phantom": phantom,
            "viewer_closes": dict(closes),
        },
        "creators": {
            "gift_events": {r: n for f in finals for r, n in f["creator_gifts"].items()},
            "earned": {r: n for f in finals for r, n in f["earned"].items()},
        },
        "money": {
            "senders": len(senders),
            "double_spends": len(double),
            "undebited": len(undebited),
            "unchecked": unchecked,
            "examples": (double + undebited)[:20],
        },
        "series": series,
    }
    return report, failures


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}" if v >= 100 else f"{v:,.2f}"


def _table(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"gifting load test -> {c['url']}: {c['viewers']} viewers ({c['senders']} senders) in "
        f"{c['rooms']} rooms, {c['procs']} procs, {c['duration']} s at {c['rate']} gifts/s",
        f"setup: {r['setup']['connected']}/{c['viewers']} viewers connected in "
        f"{r['setup']['seconds']} s"
        + (
            f"; connect errors {r['setup']['connect_errors']}"
            if r["setup"]["connect_errors"]
            else ""
        ),
        "",
        f"{'latency (ms)':<16}"
        + "".join(f"{h:>10}" for h in ("p50", "p90", "p99", "p99.9", "max"))
        + f"{'count':>12}",
    ]
    for name, key in (
        ("gift ack", "ack_latency_ms"),
        ("bubble", "bubble_latency_ms"),
        ("send lag", "send_lag_ms"),
    ):
        s = r[key]
        cells = "".join(f"{_fmt(s.get(k)):>10}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        lines.append(f"{name:<16}{cells}{s['count']:>12,}")
    g, b = r["gifts"], r["bubbles"]
    lines += [
        "",
        f"gifts:    offered {g['offered_per_s']:,}/s ({g['scheduled']:,} scheduled), "
        f"sent {g['sent']:,}, acked {g['acked']:,}, achieved {g['achieved_per_s']:,}/s",
        f"          duplicate answers {g['duplicate_answers']}, retries {g['retries']}, "
        f"unknown fate {g['unknown_fate']}",
        f"bubbles:  received {b['received']:,} ({b['per_s']:,}/s, peak {b['peak_per_s']:,}/s), "
        f"lost {b['lost']:,} (gaps {b['lost_in_gaps']:,}, closed viewers "
        f"{b['lost_by_closed_viewers']:,}), duplicated {b['duplicated']:,}",
        f"errors:   {g['errors'] or 'none'}; viewers closed by the hub: "
        f"{b['viewer_closes'] or 'none'}",
        f"money:    {r['money']['senders']} senders, double spends {r['money']['double_spends']}, "
        f"undebited {r['money']['undebited']}, unchecked {r['money']['unchecked']}",
        f"audit:    {r['audit']['summary']}",
    ]
    if r["failures"]:
        lines.append("FAIL: " + "; ".join(r["failures"]))
    else:
        lines.append("PASS")
    return "\n".join(lines)


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["series"]
    t = [row["t"] for row in s]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    for key, label, color in (("ack_ms", "gift ack", "C0"), ("bubble_ms", "bubble", "C3")):
        for pct, style in (("p50", "-"), ("p99", "--"), ("max", ":")):
            ys = [row[key].get(pct, math.nan) for row in s]
            top.plot(t, ys, style, color=color, label=f"{label} {pct}")
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(fontsize="small", ncol=2)
    top.grid(True, which="both", alpha=0.3)
    bottom.plot(t, [row["sent"] for row in s], label="gifts sent/s")
    bottom.plot(t, [row["acked"] for row in s], label="gifts acked/s")
    bottom.plot(t, [row["errors"] for row in s], label="gift errors/s")
    bottom.set_ylabel("gifts/s")
    bottom.set_xlabel("seconds since start")
    right = bottom.twinx()
    right.plot(t, [row["bubbles"] for row in s], "k-", alpha=0.5, label="bubbles/s")
    right.set_ylabel("bubbles delivered/s")
    lines = bottom.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small")
    bottom.grid(True, alpha=0.3)
    c = r["config"]
    fig.suptitle(
        f"{c['viewers']} viewers, {c['rooms']} rooms, {c['rate']} gifts/s offered, "
        f"{c['procs']} procs"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gifting-loadtest",
        description="Load-test a gifting hub (started here, or --url) over the public protocol.",
    )
    p.add_argument("--viewers", type=int, default=2000, help="viewer connections (default 2000)")
    p.add_argument("--rooms", type=int, default=1, help="rooms, one creator each (default 1)")
    p.add_argument("--rate", type=float, default=100.0, help="gifts/s offered in all (default 100)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of gifts (default 30)")
    p.add_argument(
        "--procs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="client processes (default min(4, CPUs))",
    )
    p.add_argument("--senders", type=float, default=0.1, help="fraction of viewers who send")
    p.add_argument(
        "--no-deflate",
        action="store_true",
        help="watching viewers do not offer permessage-deflate (browsers do)",
    )
    p.add_argument(
        "--latency-sample",
        type=float,
        default=0.1,
        help="fraction of watching viewers that time every bubble (all count them; default 0.1)",
    )
    p.add_argument("--url", help="ws://127.0.0.1:PORT/ws of a running hub (loopback only)")
    p.add_argument("--data-dir", type=Path, help="the running hub's data dir (tokens, audit)")
    p.add_argument("--admin-token", help="admin token for POST /admin/topup")
    p.add_argument("--json-report", type=Path, default=Path("loadtest-report.json"))
    p.add_argument("--plot", type=Path, default=Path("loadtest.png"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--hub-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the hub we start (repeat; e.g. --hub-arg=--fsync=everysec)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the started hub's data dir")
    return p


def _check(args: argparse.Namespace) -> str | None:
    if args.url is not None:
        parts = urlsplit(args.url)
        if parts.scheme != "ws":
            return "--url must be ws://HOST:PORT/ws"
        try:
            port = parts.port
        except ValueError:
            return "--url has a bad port"
        if parts.hostname not in LOOPBACK:
            return f"--url host {parts.hostname!r} refused: only loopback targets are allowed"
        if port is None:
            return "--url needs a port"
    elif args.data_dir is not None or args.admin_token is not None:
        return "--data-dir and --admin-token go with --url (a hub started here has its own)"
    if not 1 <= args.viewers <= 50_000:
        return "--viewers must be 1-50000"
    if not 1 <= args.rooms <= args.viewers:
        return "--rooms must be 1-viewers"
    if not 0 < args.rate <= 100_000 or not 0 < args.duration <= 3600:
        return "--rate must be in (0, 100000] and --duration in (0, 3600]"
    if not 1 <= args.procs <= 64:
        return "--procs must be 1-64"
    if not 0 < args.senders <= 1:
        return "--senders must be a fraction in (0, 1]"
    if not 0 < args.latency_sample <= 1:
        return "--latency-sample must be a fraction in (0, 1]"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"gifting-loadtest: {problem}", file=sys.stderr)
        return 2
    args.procs = min(args.procs, args.viewers)
    _raise_nofile()
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130


async def _main(args: argparse.Namespace) -> int:
    run = secrets.token_hex(3)
    plan = _make_plan(args, run)
    tmp: Path | None = None
    config: dict[str, Any] = {
        "viewers": args.viewers,
        "rooms": args.rooms,
        "senders": len(plan.senders),
        "rate": args.rate,
        "duration": args.duration,
        "procs": args.procs,
        "seed": args.seed,
        "run": run,
        "url": args.url,
    }
    report: dict[str, Any] = {"config": config}
    failures: list[str] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            if args.url is None:
                tmp = Path(tempfile.mkdtemp(prefix="gifting-loadtest-"))
                data_dir: Path | None = tmp
                port = await stack.enter_async_context(_own_hub(tmp, args.hub_arg))
                config["url"] = f"ws://127.0.0.1:{port}/ws"
            else:
                data_dir = args.data_dir
            report.update(await _drive(args, plan, config["url"], data_dir, config))
            failures = report.pop("failures_")
            report["audit"] = await _audit(data_dir)
            if report["audit"]["ok"] is False:
                failures.append("gifting audit found differences: " + report["audit"]["summary"])
    except (_Abort, RuntimeError, OSError, TimeoutError) as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    report["failures"] = failures
    report["ok"] = not failures
    complete = "series" in report
    if complete:
        print(_table(report))
    else:
        print("gifting-loadtest: FAIL: " + "; ".join(failures))
        if tmp is not None:
            log = tmp / "hub.log"
            with contextlib.suppress(OSError):
                print("hub.log (tail):\n" + log.read_text(errors="replace")[-3000:])
    args.json_report.parent.mkdir(parents=True, exist_ok=True)
    args.json_report.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if complete and not args.no_plot:
        _plot(report, args.plot)
    if tmp is not None:
        if args.keep_data or failures:
            print(f"gifting-loadtest: hub data kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not failures else 1


async def _audit(data_dir: Path | None) -> dict[str, Any]:
    if data_dir is None:
        return {"ran": False, "ok": None, "summary": "not run (no --data-dir)"}
    rc, out, err = await _cli("audit", "--data-dir", str(data_dir), timeout=300)
    lines = [x for x in out.splitlines() if x.strip()]
    summary = " / ".join(lines[:2]) if rc == 0 else (lines[-1] if lines else err.strip())
    return {"ran": True, "ok": rc == 0, "rc": rc, "summary": summary, "output": out[-20000:]}


async def _drive(
    args: argparse.Namespace,
    plan: _Plan,
    url: str,
    data_dir: Path | None,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Tokens, catalog, top-ups, then the workers; returns the report so far."""
    minter = _Minter(data_dir)
    await minter.check()
    tokens = await minter.mint(plan.rooms + [u for u, _ in plan.viewers])
    async with await Client.connect(url, token=tokens[plan.rooms[0]]) as probe:
        catalog = (await probe.request("catalog"))["gifts"]
    cheapest = min(catalog, key=lambda g: int(g["coins"]))
    gift, price = str(cheapest["id"]), int(cheapest["coins"])
    config["gift"] = gift
    amounts = {plan.viewers[i][0]: (2 * n + 10) * price for i, n in plan.senders.items()}
    parts = urlsplit(url)
    admin = args.admin_token or await minter.admin()
    await _topup(
        parts.hostname or "127.0.0.1",
        parts.port or 80,
        admin,
        amounts,
        config["run"],
        60 + len(amounts) / 20,
    )
    ramp = min(10.0, max(1.0, args.viewers / 1000))
    setup_timeout = 30 + ramp + 0.03 * args.viewers
    hard = setup_timeout + 60 + args.duration + _ACK_BUDGET + 60 + _DRAIN_BUDGET + _FINISH_BUDGET
    local: dict[int, int] = {}
    members: list[list[_ViewerSpec]] = [[] for _ in range(args.procs)]
    for i, (user, room) in enumerate(plan.viewers):
        local[i] = len(members[i % args.procs])
        members[i % args.procs].append(_ViewerSpec(user, tokens[user], room, i in plan.senders))
    schedules: list[list[tuple[float, int]]] = [[] for _ in range(args.procs)]
    for at, i in plan.schedule:
        schedules[i % args.procs].append((at, local[i]))
    slices = [
        _Slice(
            index=p,
            url=url,
            creators=tuple(
                (room, tokens[room]) for r, room in enumerate(plan.rooms) if r % args.procs == p
            ),
            viewers=tuple(members[p]),
            schedule=tuple(schedules[p]),
            gift=gift,
            ramp=ramp,
            concurrency=max(8, 128 // args.procs),
            client_timeout=10.0,
            latency_sample=args.latency_sample,
            deflate=not args.no_deflate,
            attempts=3,
            setup_timeout=setup_timeout,
            hard_timeout=hard,
            seed=args.seed,
        )
        for p in range(args.procs)
    ]
    drv = _Driver(slices, len(plan.schedule), show=not args.no_progress)
    try:
        await drv.run(setup_timeout, args.duration)
    finally:
        await drv.stop()
    report, failures = _analyse(args, drv, len(plan.schedule), price)
    report["failures_"] = failures
    return report
