#!/usr/bin/env python3
"""Fuzz a live hub with random and mutated frames over several connections.

    scripts/fuzz.py --frames 100000 --conns 8 --seed 1

Starts its own hub (``gifting serve --port 0`` on a temporary data dir: an
embedded store and a secret of its own), tops up a few users, puts a creator
live, then sends ``--frames`` frames over ``--conns`` connections: valid
commands and mutations of them (bit flips, truncation, type swaps, huge length
headers, deep nesting, random bytes, text/binary swaps, frames over the 16 KiB
limit). A connection the hub closes is counted by its close code and opened again.

Each answer is checked against the contract as it arrives: a frame that
decodes to a command gets exactly one reply with its id, ``ok`` or an error
with a contract code (never ``internal``); one that does not gets an ``error``
event; only an oversized frame (1009), a text frame that is not UTF-8 (1007,
the WebSocket rule) or a bad ``?token=`` (4001) may close a connection.

At the end the hub must still run, answer ``/healthz`` with 200 and serve a
fresh client; every balance must be what the gifts answered ``ok`` make it (so
the sum is still zero) and ``gifting audit`` must pass. Prints the counts,
writes them as JSON (``--json``) and exits 1 on any failure. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from gifting import auth  # noqa: E402
from gifting.store import running_store_url  # noqa: E402
from protocol import codec  # noqa: E402
from protocol.client import Client  # noqa: E402
from protocol.messages import MAX_FRAME, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK  # noqa: E402

# Every error code the contract names; no other may reach a client.
CONTRACT_CODES = frozenset(
    "bad_request unauthenticated forbidden unknown_op unknown_room not_in_room not_live "
    "unknown_gift invalid_count insufficient_funds self_gift conflict rate_limited "
    "unavailable internal unknown_item sold_out price_changed closed".split()
)
_READY = re.compile(rb"gifting: serving http://127\.0\.0\.1:(\d+)/")
PREFIX = "g"
CREATOR = "fz_creator"
COINS = 10**8  # each fuzzing user's top-up: far more than its valid gifts can spend
ANSWER_TIMEOUT = 30.0  # seconds the hub may take to answer what is in flight
SHARE_PCT = 50
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# Mutations and their weights. "oversized" and "bad_utf8" close the connection.
_KINDS = {
    "valid": 15,
    "type_swap": 18,
    "drop_field": 4,
    "extra_fields": 5,
    "bitflip": 14,
    "truncate": 8,
    "splice": 8,
    "huge_length": 5,
    "deep": 4,
    "random": 8,
    "text_binary_swap": 3,
    "raw_json": 4,
    "near_limit": 0.5,
    "oversized": 0.3,
    "bad_utf8": 0.2,
}
# Length headers (str, bin, array, map, ext) that announce far more than any frame holds.
_HUGE_HEADERS = [b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"]
_HUGE_HEADERS += [b"\xc6\xff\xff\xff\xff", b"\xc9\x7f\xff\xff\xff\x01", b"\xda\xff\xff"]
_HUGE_HEADERS += [b"\xdc\xff\xff", b"\xde\xff\xff", b"\xd9\xff"]
_TEXTS = ["", " ", "\x00", "a\x00b", "\u202eevil\u202c", "<script>alert(1)</script>"]
_TEXTS += ["<b>x</b>&amp;", "🎁" * 30, "a" * 64, "a" * 65, "x" * 2000, "../etc/passwd", "٣-٣"]
_TEXTS += ["\ufeff", "\ud800", "x\udfffy", "rose", "ROSE", "fz_creator", "\U0010ffff"]
_SCALARS = [None, True, False, 0, -1, 1, 99, 100, 500, 501, 1.0, 1.5, -0.0, 2**31 - 1, 2**31]
_SCALARS += [2**53 + 1, 2**63 - 1, 2**63, UINT64_MAX, INT64_MIN, math.nan, math.inf, -math.inf]
_JSON_ONLY = [2**64, 10**30, -(10**30), 10**4000 + 1]
_MSGPACK_ONLY = [b"", b"\x00" * 8, msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)]
_RAW_JSON = [
    '{"op":"ping","id":1,"id":2}',
    '{"op":"ping","op":"gift","id":3}',
    '{"op":"ping","id":1e400}',
    '{"op":"ping","id":1.0}',
    '{"op":"ping","id":' + "1" * 5000 + "}",
    '{"op":"ping","id":NaN}',
    '{"op":"ping","id":4,"x":Infinity}',
    '{"op":"ping","id":5}garbage',
    '\ufeff{"op":"ping","id":6}',
    '{"op":"ping","id":7,}',
    "{'op':'ping','id':8}",
    '{"op":"ping","id":9} {"op":"ping","id":10}',
    '{"op":"ping","id":11,"x":"\\ud800"}',
    '{"op":"go_live","id":12,"title":"\\udfff"}',
    '{"op":"feed","id":13,"room":"%(user)s","after":"99999999999999999999-0"}',
    '{"op":"feed","id":15,"room":"%(user)s","after":"\u0663-\u0663"}',
    '{"op":"feed","id":16,"room":"%(user)s","after":"18446744073709551615-18446744073709551615"}',
    '{"op":"ping","id":14,"x":' + "[" * 2000 + "]" * 2000 + "}",
    "[]",
    "null",
    '"ping"',
    "",
    " ",
]
_OPS_OTHER = (
    "effects effect product_put products pin buy orders refund campaign_create campaign_join "
    "campaigns campaign_close battle_invite battle_answer battle_get top nope".split()
) + [""]


@dataclass
class _Frame:
    data: bytes | str
    text: bool  # a text frame (``data`` may be bytes that are not UTF-8)
    kind: str


@dataclass
class _Expect:
    """What the frame sent with this id is: a gift (for the coin accounting) or not."""

    op: str | None
    args: dict[str, Any]
    malformed: bool = False
    future: asyncio.Future[dict[str, Any]] | None = None


@dataclass
class _Stats:
    frames: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    frame_types: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    gifts_ok: int = 0
    gifts_duplicate: int = 0
    coins_moved: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(message)


# -- frames -------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    return repr(o)


def _encode(msg: Any, as_json: bool) -> bytes | str:
    """Encode faithfully, hostile values included (NaN, lone surrogates, bytes)."""
    if as_json:
        try:
            return json.dumps(msg, allow_nan=True, ensure_ascii=True, default=_json_default)
        except ValueError:  # an int past Python's str conversion limit
            return '{"op":"ping","id":' + "9" * 4400 + "}"
    try:
        data: bytes = msgpack.packb(
            msg, use_bin_type=True, unicode_errors="surrogatepass", default=repr
        )
    except (OverflowError, ValueError, TypeError):  # ints past 64 bits, nested past 512
        data = msgpack.packb({"op": "ping", "id": UINT64_MAX})
    return data


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


class _Gen:
    """Frames for one connection: valid commands and mutations of them, seeded."""

    def __init__(self, rng: random.Random, user: str, users: list[str], tokens: dict[str, str]):
        self.rng = rng
        self.user = user
        self.users = users
        self.tokens = tokens
        self.keys: deque[str] = deque(maxlen=16)
        self.next_id = 0
        self.kinds = list(_KINDS)
        self.weights = list(_KINDS.values())

    def new_id(self) -> int:
        self.next_id = self.next_id % (2**31 - 2) + 1
        return self.next_id

    def command(self) -> dict[str, Any]:
        """A valid command, as a client would send it."""
        rng = self.rng
        r = rng.random()
        msg: dict[str, Any]
        if r < 0.30:
            key = rng.choice(self.keys) if self.keys and rng.random() < 0.2 else None
            if key is None:
                key = f"{self.user}:{rng.randrange(10**12)}"
                self.keys.append(key)
            gift = rng.choice(["rose", "heart", "star", "cake", "rocket", "castle"])
            msg = {"op": "gift", "room": CREATOR, "gift": gift, "count": rng.randint(1, 5)}
            msg["key"] = key
            if rng.random() < 0.2:
                msg["room"] = rng.choice(self.users)
        elif r < 0.40:
            msg = {"op": "join", "room": CREATOR if rng.random() < 0.7 else rng.choice(self.users)}
        elif r < 0.44:
            msg = {"op": "leave", "room": rng.choice([CREATOR, *self.users])}
        elif r < 0.50:
            who = self.user if rng.random() < 0.8 else rng.choice(self.users)
            msg = {"op": "auth", "token": self.tokens[who]}
        elif r < 0.56:
            msg = {"op": "feed", "room": self.user, "limit": rng.randint(1, 500)}
            if rng.random() < 0.5:
                msg["after"] = f"{rng.randrange(2**64)}-{rng.randrange(2**64)}"
        elif r < 0.62:
            msg = {"op": "history", "limit": rng.randint(1, 500)}
            if rng.random() < 0.5:
                msg["before"] = rng.randrange(1, 2**63)
        elif r < 0.65:
            msg = {"op": "go_live", "title": rng.choice(_TEXTS[:9])}
        elif r < 0.67:
            msg = {"op": "end_live"}
        elif r < 0.80:
            msg = {"op": rng.choice(["ping", "balance", "catalog"])}
        else:
            msg = {"op": rng.choice(_OPS_OTHER), "room": CREATOR, "key": "k", "count": 1}
        msg["id"] = self.new_id()
        return msg

    def hostile(self, as_json: bool) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return rng.choice(_SCALARS + (_JSON_ONLY if as_json else _MSGPACK_ONLY))
        if r < 0.65:
            return rng.choice(_TEXTS)
        if r < 0.75:
            return "".join(
                chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x110000)]))
                for _ in range(rng.randrange(1, 40))
            )
        if r < 0.85:
            return [self.hostile(as_json) for _ in range(rng.randrange(0, 4))]
        if r < 0.95:
            keys: list[Any] = ["a", "$ne", "", "id", 1, None, True, 1.5]
            return {rng.choice(keys): self.hostile(as_json) for _ in range(rng.randrange(0, 4))}
        value: Any = 1
        for _ in range(rng.randrange(1, 60)):
            value = [value] if rng.random() < 0.5 else {"a": value}
        return value

    def frame(self) -> _Frame:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        msg = self.command()
        as_json = rng.random() < 0.4
        if kind == "type_swap":
            msg[rng.choice(list(msg))] = self.hostile(as_json)
        elif kind == "drop_field":
            del msg[rng.choice(list(msg))]
        elif kind == "extra_fields":
            for _ in range(rng.randint(1, 5)):
                msg[rng.choice(["x", "pad", "__proto__", "room2", "ID", "Op"])] = self.hostile(
                    as_json
                )
        elif kind == "near_limit":
            msg["pad"] = ""
            size = len(_encode(msg, False))
            msg["pad"] = "x" * (MAX_FRAME - size - 8)
            return _Frame(_encode(msg, False), False, kind)
        elif kind == "oversized":
            msg["pad"] = "x" * rng.randint(MAX_FRAME + 1, 4 * MAX_FRAME)
        elif kind == "raw_json":
            return _Frame(rng.choice(_RAW_JSON).replace("%(user)s", self.user), True, kind)
        elif kind == "random":
            if rng.random() < 0.5:
                return _Frame(rng.randbytes(rng.randrange(0, 600)), False, kind)
            text = "".join(chr(rng.randrange(0x20, 0xD800)) for _ in range(rng.randrange(0, 300)))
            return _Frame(text, True, kind)
        elif kind == "deep":
            return self._deep(msg, as_json)
        data = _encode(msg, as_json)
        if kind in ("valid", "type_swap", "drop_field", "extra_fields", "oversized"):
            return _Frame(data, as_json, kind)
        raw = bytearray(data.encode() if isinstance(data, str) else data)
        if kind == "bitflip" and raw:
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            raw = raw[: rng.randrange(len(raw) + 1)]
        elif kind == "splice":
            i = rng.randrange(len(raw) + 1)
            j = rng.randrange(i, len(raw) + 1)
            op = rng.randrange(3)
            if op == 0:
                del raw[i:j]
            elif op == 1:
                raw[i:i] = raw[i:j] * rng.randint(1, 4)
            else:
                raw[i:i] = rng.randbytes(rng.randint(1, 16))
        elif kind == "huge_length":
            i = rng.randrange(len(raw) + 1)
            raw[i:i] = rng.choice(_HUGE_HEADERS)
        elif kind == "text_binary_swap":
            as_json = not as_json
        elif kind == "bad_utf8":
            i = rng.randrange(len(raw) + 1)
            raw[i:i] = b"\xff\xfe"
            return _Frame(bytes(raw), True, kind)
        if as_json:
            try:
                return _Frame(bytes(raw).decode(), True, kind)
            except UnicodeDecodeError:
                as_json = False  # sent as binary: a text frame would be bad_utf8's job
        return _Frame(bytes(raw), False, kind)

    def _deep(self, msg: dict[str, Any], as_json: bool) -> _Frame:
        depth = self.rng.choice([5, 31, 32, 33, 64, 500, 3000])
        if as_json:
            body = json.dumps(msg)[:-1]
            return _Frame(body + ',"x":' + "[" * depth + "1" + "]" * depth + "}", True, "deep")
        parts = [msgpack.packb(k) + msgpack.packb(v) for k, v in msg.items()]
        nest = (b"\x91" if self.rng.random() < 0.5 else b"\x81\xa1a") * depth + b"\x01"
        data = _map_header(len(parts) + 1) + b"".join(parts) + msgpack.packb("x") + nest
        return _Frame(data, False, "deep")


def _verdict(fr: _Frame) -> tuple[str, Any]:
    """What the contract makes the hub do with ``fr``: close (with a code), an
    error event, a bad_request reply with an id, or a reply to a command."""
    data = fr.data
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_FRAME:
        return "close", 1009
    if isinstance(data, bytes) and fr.text:
        try:
            data = data.decode()
        except UnicodeDecodeError:
            return "close", 1007
    try:
        cmd = codec.decode_command(data)
    except codec.UndecodableFrame:
        return "event", None
    except codec.MalformedCommand as exc:
        return "malformed", exc.id
    return "command", cmd


# -- one fuzzing connection ------------------------------------------------------------------


class _Worker:
    """One connection at a time for one user: sends its share of the frames with
    at most ``window`` unanswered, checks every answer, reopens after a close."""

    def __init__(self, fz: _Fuzz, index: int, quota: int) -> None:
        self.fz = fz
        self.user = f"fz_v{index}"
        self.quota = quota
        self.rng = random.Random(f"{fz.seed}:{index}")
        self.gen = _Gen(self.rng, self.user, fz.users, fz.tokens)
        self.sent = 0
        self.ws: ClientConnection | None = None
        self.pending: dict[int, _Expect] = {}
        self.events_due = 0  # error events owed for undecodable frames
        self.outstanding = 0
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_expected: int | None = None
        self.reader: asyncio.Task[None] | None = None
        self.last_kinds: deque[str] = deque(maxlen=4)

    async def run(self) -> None:
        while self.sent < self.quota:
            await self.open()
            await self.pump()
        await self.quiesce()
        await self.shut()

    # -- connection --

    async def open(self) -> None:
        fz = self.fz
        if self.ws is not None:
            await self.shut()
            fz.stats.reconnects += 1
        if self.rng.random() < 0.02:  # a bad ?token= first: 4001 right after the handshake
            await self.bad_query_token()
        proto = self.rng.choice([SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON, None])
        in_query = self.rng.random() < 0.3
        url = fz.url + (f"?token={fz.tokens[self.user]}" if in_query else "")
        async with asyncio.timeout(ANSWER_TIMEOUT):
            self.ws = await connect(
                url,
                subprotocols=[Subprotocol(proto)] if proto else None,
                max_size=2**22,
                compression=None,
            )
        self.pending.clear()
        self.events_due = self.outstanding = 0
        self.close_expected = None
        self.closed = asyncio.Event()
        self.reader = asyncio.create_task(self.read(self.ws))
        if not in_query:
            await self.call({"op": "auth", "id": self.gen.new_id(), "token": fz.tokens[self.user]})
        await self.call({"op": "join", "id": self.gen.new_id(), "room": CREATOR})

    async def bad_query_token(self) -> None:
        fz = self.fz
        token = self.rng.choice(["x", "a.b.c", fz.tokens[self.user][:-3] + "abc", "%00"])
        async with asyncio.timeout(ANSWER_TIMEOUT):
            ws = await connect(f"{fz.url}?token={token}", compression=None)
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
        code = ws.close_code
        fz.stats.closes[str(code)] += 1
        if code != 4001:
            fz.stats.fail(f"a bad ?token= closed with {code}, not 4001")

    async def shut(self) -> None:
        if self.ws is not None:
            self.close_expected = self.close_expected or 1000
            await self.ws.close()
        if self.reader is not None:
            await self.reader
            self.reader = None

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A setup command that must succeed."""
        assert self.ws is not None
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg["id"]] = _Expect(msg["op"], msg, future=fut)
        self.outstanding += 1
        await self.ws.send(codec.encode(msg, json=False))
        async with asyncio.timeout(ANSWER_TIMEOUT):
            reply = await fut
        if "ok" not in reply:
            raise RuntimeError(f"{msg['op']} failed: {reply}")
        return reply

    # -- sending --

    async def pump(self) -> None:
        while self.sent < self.quota and not self.closed.is_set():
            fr = self.gen.frame()
            verdict, detail = _verdict(fr)
            if verdict == "close":
                await self.quiesce()
                if self.closed.is_set():
                    return
                self.close_expected = detail
                await self.send(fr)
                try:
                    async with asyncio.timeout(ANSWER_TIMEOUT):
                        await self.closed.wait()
                except TimeoutError:
                    self.fz.stats.fail(f"a frame that must close ({detail}) did not")
                    self.close_expected = 1000
                return
            id_ = None if verdict == "event" else detail.id if verdict == "command" else detail
            if id_ is not None and id_ in self.pending:
                await self.quiesce()  # one frame per id in flight: replies stay attributable
            if self.closed.is_set():
                return
            if verdict == "event":
                self.events_due += 1
            elif verdict == "malformed":
                self.pending[id_] = _Expect(None, {}, malformed=True)
            else:
                self.pending[id_] = _Expect(detail.op, detail.args)
            await self.window()
            self.outstanding += 1
            await self.send(fr)

    async def send(self, fr: _Frame) -> None:
        assert self.ws is not None
        st = self.fz.stats
        st.frames += 1
        self.sent += 1
        st.kinds[fr.kind] += 1
        st.frame_types["text" if fr.text else "binary"] += 1
        self.last_kinds.append(fr.kind)
        with contextlib.suppress(ConnectionClosed):
            if isinstance(fr.data, str):
                await self.ws.send(fr.data)
            else:
                await self.ws.send(fr.data, text=fr.text)

    async def _until(self, done: Any) -> None:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    async def window(self) -> None:
        try:
            await self._until(lambda: self.outstanding < self.fz.window or self.closed.is_set())
        except TimeoutError:
            self.fz.stats.fail(f"{self.user}: no answer within {ANSWER_TIMEOUT:.0f} s")
            raise

    async def quiesce(self) -> None:
        try:
            await self._until(lambda: self.outstanding == 0 or self.closed.is_set())
        except TimeoutError:
            self.fz.stats.fail(
                f"{self.user}: {self.outstanding} frames unanswered after {ANSWER_TIMEOUT:.0f} s"
            )
            raise

    # -- receiving --

    async def read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self.answer(raw)
        except ConnectionClosed:
            pass
        finally:
            code = ws.close_code
            st = self.fz.stats
            st.closes[str(code)] += 1
            if code != self.close_expected:
                st.fail(
                    f"{self.user}: closed with {code} ({ws.close_reason!r}) after "
                    f"{list(self.last_kinds)}; expected {self.close_expected}"
                )
            if self.outstanding and code != self.close_expected:
                st.fail(f"{self.user}: {self.outstanding} frames lost in the close")
            for exp in self.pending.values():
                if exp.future is not None and not exp.future.done():
                    exp.future.set_exception(ConnectionError(f"closed {code}"))
            self.closed.set()
            self.changed.set()

    def answer(self, raw: bytes | str) -> None:
        st = self.fz.stats
        try:
            msg = codec.decode(raw, strict=False)
        except codec.UndecodableFrame:
            st.fail(f"{self.user}: the hub sent an undecodable frame {raw[:80]!r}")
            return
        if not isinstance(msg, dict):
            st.fail(f"{self.user}: the hub sent a non-map {msg!r:.80}")
            return
        ev = msg.get("ev")
        if ev is not None:
            st.events[str(ev)] += 1
            if ev == "error":
                if msg.get("code") != "bad_request" or not isinstance(msg.get("message"), str):
                    st.fail(f"{self.user}: bad error event {msg!r:.200}")
                self.events_due -= 1
                if self.events_due < 0:
                    st.fail(f"{self.user}: an error event for no undecodable frame: {msg!r:.200}")
                self.done()
            return
        id_ = msg.get("id")
        exp = self.pending.pop(id_, None) if type(id_) is int else None
        if exp is None:
            st.fail(f"{self.user}: a reply to no frame in flight: {msg!r:.200}")
            return
        self.done()
        if ("ok" in msg) == ("error" in msg):
            st.fail(f"{self.user}: a reply with neither or both of ok/error: {msg!r:.200}")
            return
        code = "ok" if "ok" in msg else str(msg["error"].get("code"))
        st.replies[code] += 1
        if code != "ok" and code not in CONTRACT_CODES:
            st.fail(f"{self.user}: a non-contract error code: {msg!r:.200}")
        if code == "internal":
            st.fail(f"{self.user}: internal error for {exp.op} {exp.args!r:.200}: {msg!r:.200}")
        if exp.malformed and code != "bad_request":
            st.fail(f"{self.user}: a malformed command answered {code}, not bad_request")
        if exp.future is not None:
            if not exp.future.done():
                exp.future.set_result(msg)
            return
        if exp.op == "gift" and code == "ok":
            self.fz.account(self.user, exp.args, msg["ok"])

    def done(self) -> None:
        self.outstanding -= 1
        if self.outstanding < 0:
            self.fz.stats.fail(f"{self.user}: more answers than frames")
        self.changed.set()


# -- the run ---------------------------------------------------------------------------------


class _Fuzz:
    def __init__(self, args: argparse.Namespace, secret: bytes, port: int) -> None:
        self.seed: int = args.seed
        self.window: int = args.window
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.port = port
        self.users = [f"fz_v{i}" for i in range(args.conns)]
        self.secret = secret
        self.tokens = {u: auth.mint(secret, u, name=f"Fuzz {u}") for u in [*self.users, CREATOR]}
        self.stats = _Stats()
        self.prices: dict[str, int] = {}
        self.expected: Counter[str] = Counter()  # balance changes the answered gifts made

    def account(self, sender: str, args: dict[str, Any], ok: dict[str, Any]) -> None:
        """An ``ok`` gift: what it moved, per the contract (price x count, the
        creator's share rounded down, the rest to the platform)."""
        st = self.stats
        if ok.get("duplicate") is True:
            st.gifts_duplicate += 1
            return
        count = args.get("count")
        count = 1 if count is None else count
        cost = self.prices[args["gift"]] * count
        share = cost * SHARE_PCT // 100
        self.expected[sender] -= cost
        self.expected[args["room"]] += share
        self.expected["~platform"] += cost - share
        st.gifts_ok += 1
        st.coins_moved += cost


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gifting",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(120):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"gifting {args[0]} timed out"
    return proc.returncode or 0, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def _hub(
    data_dir: Path, log: IO[bytes]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gifting",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-demo",
        "--data-dir",
        str(data_dir),
        "--prefix",
        PREFIX,
        "--creator-share",
        str(SHARE_PCT),
        "--log-level",
        "WARNING",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        port = 0
        async with asyncio.timeout(120):
            while not port:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError("the hub exited before it was ready; see its log")
                m = _READY.search(line)
                port = int(m[1]) if m else 0
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _balances(url: str) -> dict[str, int]:
    r = aioredis.Redis.from_url(url)
    try:
        raw: Any = await r.hgetall("{" + PREFIX + "}:bal")
    finally:
        await r.aclose()
    return {k.decode(): int(v) for k, v in raw.items() if int(v) != 0}


async def _healthz(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status = await reader.readline()
        return int(status.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _run(args: argparse.Namespace, data_dir: Path, log: IO[bytes]) -> dict[str, Any]:
    secret = secrets.token_hex(32).encode()
    os.environ["GIFTING_SECRET"] = secret.decode()  # the hub and the CLI share it
    checks: dict[str, Any] = {}
    summary: dict[str, Any] = {
        "seed": args.seed,
        "frames_requested": args.frames,
        "conns": args.conns,
        "window": args.window,
    }
    async with _hub(data_dir, log) as (proc, port):
        fz = _Fuzz(args, secret, port)
        st = fz.stats
        store_url = running_store_url(data_dir)
        if store_url is None:
            raise RuntimeError("no store.json for the hub's store")
        rcs = await asyncio.gather(
            *(
                _cli("topup", u, str(COINS), "--key", f"fuzz:{u}", "--data-dir", str(data_dir))
                for u in fz.users
            )
        )
        for rc, out in rcs:
            if rc != 0:
                raise RuntimeError(f"gifting topup failed: {out}")
        creator = await Client.connect(
            fz.url, token=fz.tokens[CREATOR], timeout=ANSWER_TIMEOUT, on_event=lambda ev: None
        )
        await creator.request("go_live", title="fuzz")
        fz.prices = {g["id"]: g["coins"] for g in (await creator.request("catalog"))["gifts"]}
        before = await _balances(store_url)
        started = time.monotonic()
        per = -(-args.frames // args.conns)
        workers = [_Worker(fz, i, min(per, args.frames - i * per)) for i in range(args.conns)]
        try:
            async with asyncio.timeout(args.timeout), asyncio.TaskGroup() as tg:
                for w in workers:
                    if w.quota > 0:
                        tg.create_task(w.run())
        except TimeoutError:
            st.fail(f"the run did not finish within {args.timeout:.0f} s")
        except ExceptionGroup as eg:  # a connection could not go on: already a finding
            for exc in eg.exceptions:
                st.fail(f"a connection failed: {exc!r}")
        elapsed = time.monotonic() - started
        await creator.close()

        checks["hub_alive"] = proc.returncode is None
        try:
            checks["healthz"] = await _healthz(port)
        except (OSError, ValueError, IndexError) as exc:
            checks["healthz"] = repr(exc)
        try:
            fresh = await Client.connect(
                fz.url, token=auth.mint(secret, "fz_fresh"), timeout=ANSWER_TIMEOUT
            )
            pong = await fresh.request("ping")
            checks["fresh_client"] = isinstance(pong.get("time"), int)
            await fresh.close()
        except Exception as exc:  # any failure here is the finding
            checks["fresh_client"] = repr(exc)
        after = await _balances(store_url)
        want = Counter(before)
        want.update(fz.expected)
        want_nonzero = {k: v for k, v in want.items() if v != 0}
        checks["balances_as_accounted"] = after == want_nonzero
        checks["balances_sum"] = sum(after.values())
        if after != want_nonzero:
            diff = {
                k: (want_nonzero.get(k, 0), after.get(k, 0))
                for k in sorted(set(after) | set(want_nonzero))
                if want_nonzero.get(k, 0) != after.get(k, 0)
            }
            st.fail(f"balances differ from the accounted gifts (want, have): {diff}")
        rc, out = await _cli("audit", "--data-dir", str(data_dir))
        checks["audit_rc"] = rc
        checks["audit"] = out.strip().splitlines()[-1:] if out.strip() else []
        checks["hub_alive_at_end"] = proc.returncode is None
    checks["hub_exit"] = proc.returncode

    if checks["hub_alive"] is not True or checks["hub_alive_at_end"] is not True:
        st.fail("the hub process died")
    if checks["healthz"] != 200:
        st.fail(f"/healthz answered {checks['healthz']}")
    if checks["fresh_client"] is not True:
        st.fail(f"a fresh client could not auth and ping: {checks['fresh_client']}")
    if checks["balances_sum"] != 0:
        st.fail(f"balances sum to {checks['balances_sum']}")
    if rc != 0:
        st.fail(f"gifting audit exit {rc}: {out.strip()[-500:]}")
    if st.frames < args.frames:
        st.fail(f"sent {st.frames} of {args.frames} frames")
    summary.update(
        frames_sent=st.frames,
        elapsed_s=round(elapsed, 2),
        frames_per_s=round(st.frames / elapsed) if elapsed else None,
        mutations=dict(st.kinds.most_common()),
        frame_types=dict(st.frame_types),
        replies=dict(st.replies.most_common()),
        events=dict(st.events.most_common()),
        closes=dict(st.closes.most_common()),
        reconnects=st.reconnects,
        gifts_ok=st.gifts_ok,
        gifts_duplicate=st.gifts_duplicate,
        coins_moved=st.coins_moved,
        checks=checks,
        failures=st.failures,
    )
    return summary


def _print(summary: dict[str, Any]) -> None:
    def line(title: str, counts: dict[str, int]) -> None:
        print(f"  {title:<14}" + "  ".join(f"{k} {v}" for k, v in counts.items()))

    print(
        f"fuzz: {summary.get('frames_sent', 0)} frames over {summary['conns']} connections "
        f"in {summary.get('elapsed_s', 0)} s ({summary.get('frames_per_s')} frames/s), "
        f"seed {summary['seed']}"
    )
    for title, key in (
        ("mutations", "mutations"),
        ("frame types", "frame_types"),
        ("replies", "replies"),
        ("events", "events"),
        ("closes", "closes"),
    ):
        line(title, summary.get(key, {}))
    print(
        f"  reconnects {summary.get('reconnects')}  gifts ok {summary.get('gifts_ok')} "
        f"(duplicates {summary.get('gifts_duplicate')}, {summary.get('coins_moved')} coins)"
    )
    print("  checks        " + "  ".join(f"{k} {v}" for k, v in summary.get("checks", {}).items()))
    for f in summary["failures"]:
        print(f"  FAILURE: {f}")
    print("fuzz: OK" if summary["ok"] else f"fuzz: FAILED ({len(summary['failures'])} failures)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100_000, help="frames to send (default 100000)")
    p.add_argument("--conns", type=int, default=8, help="concurrent connections (default 8)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--window", type=int, default=16, help="unanswered frames per connection")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument(
        "--json",
        type=Path,
        default=ROOT / "scripts" / "bench" / "results" / "fuzz.json",
        help="where to write the summary (default scripts/bench/results/fuzz.json)",
    )
    args = p.parse_args(argv)
    if args.frames < 1 or args.conns < 1 or args.window < 1:
        p.error("--frames, --conns and --window must be positive")
    if args.seed is None:
        args.seed = secrets.randbelow(2**32)
    tmp = Path(tempfile.mkdtemp(prefix="gifting-fuzz-"))
    summary: dict[str, Any] = {"seed": args.seed, "conns": args.conns, "failures": []}
    try:
        with (tmp / "hub.log").open("wb") as log:
            try:
                summary = asyncio.run(_run(args, tmp / "data", log))
            except Exception as exc:  # the run itself broke: report it, exit 1
                summary["failures"].append(f"the run failed: {exc!r}")
        errors = [
            ln
            for ln in (tmp / "hub.log").read_text(errors="replace").splitlines()
            if " ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln
        ]
        summary["hub_log_errors"] = errors[:20]
        if errors:
            summary["failures"].append(f"the hub logged {len(errors)} errors: {errors[0]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["ok"] = not summary["failures"]
    _print(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"fuzz: summary in {args.json}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
