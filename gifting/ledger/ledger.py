"""Typed calls for every coin move and the reads around them.

Scripts are loaded with ``SCRIPT LOAD`` semantics through redis-py's ``Script``
objects: each call is an ``EVALSHA``, and a ``NOSCRIPT`` reply (the store was
restarted or flushed its script cache) loads the script again and retries, so a
store restart needs no manual step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, TypeVar

import msgpack
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.commands.core import AsyncScript

from gifting.ledger.campaigns import CampaignLedger
from gifting.ledger.shop import ShopLedger
from gifting.metrics import Metrics
from gifting.resp import ReplyError, command, open_stream, replies
from protocol import errors

__all__ = [
    "MAX_BALANCE",
    "MAX_TOPUP",
    "AuditReport",
    "GiftResult",
    "Ledger",
    "LiveResult",
    "ReverseResult",
    "TopupResult",
    "lua_error",
]

# Lua numbers are doubles: every amount must stay well inside 2^53.
MAX_BALANCE = 10**15
MAX_TOPUP = 10**12
ISSUER = "~issuer"
PLATFORM = "~platform"

T = TypeVar("T")


def _load(name: str) -> str:
    return resources.files("gifting.ledger").joinpath(name).read_text(encoding="utf-8")


# Error replies that say the store cannot serve now, not that the call is wrong.
_NOT_READY = frozenset({"BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "OOM"})


def lua_error(exc: BaseException) -> errors.GiftingError:
    """Map a script's ``"<code> <message>"`` error reply to its exception."""
    text = str(exc)
    code, _, message = text.partition(" ")
    err = errors.error_for_code(code, message)
    if isinstance(err, errors.Internal) and not message.startswith(code):
        return errors.Internal(text)
    return err


@dataclass(frozen=True, slots=True)
class GiftResult:
    transfer: int
    coins: int
    combo: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class TopupResult:
    coins: int
    duplicate: bool
    transfer: int


@dataclass(frozen=True, slots=True)
class ReverseResult:
    transfer: int  # the reversal's own transfer id
    reversed: int  # the transfer it reversed
    duplicate: bool


@dataclass(frozen=True, slots=True)
class LiveResult:
    session: int
    coins: int


@dataclass(frozen=True, slots=True)
class RoomState:
    live: bool
    session: int
    title: str


@dataclass(slots=True)
class AuditReport:
    entries: int = 0
    accounts: int = 0
    total: int = 0
    differences: list[str] = field(default_factory=list)
    # Not errors: e.g. an account an admin drove negative by a forced reversal.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


class AuditCheck(Protocol):
    """What a part of the economy adds to ``Ledger.audit``: it sees every journal
    entry in order, then the stored balances, and reports what does not match."""

    def entry(
        self,
        t: int,
        kind: str,
        fields: dict[bytes, bytes],
        postings: dict[str, int],
        report: AuditReport,
    ) -> None: ...

    async def finish(self, balances: dict[str, int], report: AuditReport) -> None: ...


def _noscript(reply: object) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


class _Pipe:
    """One bare connection to the store for pipelined calls, opened on first use
    and dropped on any failure (a reply that came too late would be misread)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self._writer: asyncio.StreamWriter | None = None
        self._replies: AsyncIterator[Any] | None = None

    async def call(self, payload: bytes, n: int) -> list[Any]:
        """Write ``n`` encoded commands and read their ``n`` replies.

        A kept connection found dead (the store restarted since its last use)
        is replaced and the commands sent once more: every call sent here is
        a read or a gift, which is idempotent by its key.
        """
        for _ in range(2):
            fresh = self._writer is None or self._replies is None
            try:
                if self._writer is None or self._replies is None:
                    reader, writer = await asyncio.wait_for(open_stream(self.url), self.timeout)
                    self._writer, self._replies = writer, replies(reader)
                writer, stream = self._writer, self._replies
                writer.write(payload)
                async with asyncio.timeout(self.timeout):
                    return [await anext(stream) for _ in range(n)]
            except (OSError, EOFError):
                self.close()
                if fresh:
                    raise
            except BaseException:
                self.close()
                raise
        raise ConnectionError("the store closed a new connection")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._replies = None, None


def _decode_map(blob: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(blob, raw=False)
    if not isinstance(value, dict):
        raise errors.Internal("corrupt entry in the store")
    return value


class Ledger:
    """The store-side half of the server. One instance per hub, no global state."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "g",
        creator_share_pct: int = 50,
        feed_maxlen: int = 100_000,
        idempotency_ttl: int = 48 * 3600,
        metrics: Metrics | None = None,
    ) -> None:
        self.r = client
        self.metrics = metrics or Metrics()
        self.prefix = prefix
        self.tag = "{" + prefix + "}"
        self.bal = self.tag + ":bal"
        self.share = creator_share_pct
        self.feed_maxlen = feed_maxlen
        self.idem_ttl = idempotency_ttl
        self._scripts: list[AsyncScript] = []
        self._gift_source = _load("gift.lua")
        self._gift = self.script("gift.lua")
        self._topup = self.script("topup.lua")
        self._live = self.script("live.lua")
        self._reverse = self.script("reverse.lua")
        # Calls waiting for the pipeliner (a gift's script arguments, or a plain
        # read command as a tuple), and whether ``run`` is serving them.
        self._queue: list[tuple[list[str | int] | tuple[str, ...], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._running = False

        # The coin economy beyond gifts: each part registers its scripts here
        # and adds its checks to ``audit``.
        self.shop = ShopLedger(self)
        self.campaigns = CampaignLedger(self)

    def script(self, name: str) -> AsyncScript:
        """Register ``gifting/ledger/<name>``; ``load`` loads every registered script."""
        s = self.r.register_script(_load(name))
        self._scripts.append(s)
        return s

    async def call(self, call: str, fn: Callable[[], Awaitable[T]]) -> T:
        """A store call timed as ``call``; unreachable store -> ``Unavailable``,
        a script's error reply -> its wire error (see ``_call``)."""
        return await self._call(call, fn)

    decode_map = staticmethod(_decode_map)

    def key(self, *parts: str) -> str:
        return ":".join((self.tag, *parts))

    def channel(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    async def _call(self, call: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a store call (timed as ``call`` in the metrics); failures to
        reach the store become ``Unavailable``."""
        t0 = time.perf_counter()
        failed = True
        try:
            res = await fn()
            failed = False
            return res
        except rex.ResponseError as exc:
            if isinstance(exc, rex.NoScriptError):
                raise errors.Unavailable("store lost its scripts; retry") from exc
            failed = False  # a script's verdict (insufficient funds...): the store is fine
            raise lua_error(exc) from exc
        except (rex.ConnectionError, rex.TimeoutError, OSError, TimeoutError) as exc:
            raise errors.Unavailable(
                "the store cannot be reached; retry with the same key"
            ) from exc
        except rex.RedisError as exc:
            # BUSY, LOADING, READONLY, MASTERDOWN...: not a verdict on the request.
            raise errors.Unavailable(f"the store is not ready ({type(exc).__name__})") from exc
        finally:
            self.metrics.store_call(call, time.perf_counter() - t0, failed)

    # -- setup ---------------------------------------------------------------

    async def load(self, catalog: dict[str, int], effects: dict[str, int] | None = None) -> None:
        """Load scripts and publish this hub's gift and effect prices to the store."""

        async def go() -> None:
            async with self.r.pipeline(transaction=False) as p:
                for s in self._scripts:
                    p.script_load(s.script)
                if catalog:
                    p.hset(self.key("catalog"), mapping={k: v for k, v in catalog.items()})
                if effects:
                    p.hset(self.key("effects"), mapping={k: v for k, v in effects.items()})
                await p.execute()

        await self._call("load", go)

    # -- coin moves ----------------------------------------------------------

    async def gift(
        self,
        *,
        sender: str,
        room: str,
        gift: str,
        count: int,
        key: str,
        name: str,
        avatar: str | None,
        limited: bool = False,
        conn: str = "",
        cap: int = 0,
    ) -> GiftResult:
        args: list[str | int] = [
            sender,
            room,
            gift,
            count,
            key,
            name,
            avatar or "",
            self.share,
            1 if limited else 0,
            conn,
            self.feed_maxlen,
            self.idem_ttl,
            cap,
        ]

        if self._running:
            res = await self._enqueue(args)
        else:

            async def go() -> Any:
                return await self._gift(keys=[self.bal], args=args)

            res = await self._call("gift", go)
        return GiftResult(int(res[0]), int(res[1]), int(res[2]), bool(res[3]))

    def _enqueue(self, call: list[str | int] | tuple[str, ...]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, fut))
        self._wake.set()
        return fut

    async def run(
        self, url: str, *, timeout: float = 3.0, workers: int = 2, max_batch: int = 512
    ) -> None:
        """Pipeline concurrent calls: one round trip carries every gift and read waiting.

        Each gift stays its own atomic script call; pipelining only saves the
        round trip (and a client library's per-call work) per call. ``workers``
        connections to the store at ``url`` may each have a batch in flight,
        so the hub encodes the next batch while the store runs the last.
        """
        self._running = True
        pipes = [_Pipe(url, timeout) for _ in range(workers)]
        try:
            async with asyncio.TaskGroup() as tg:
                for pipe in pipes:
                    tg.create_task(self._pipeline_worker(pipe, max_batch))
        finally:
            self._running = False
            for pipe in pipes:
                pipe.close()
            for _, fut in self._queue:
                if not fut.done():
                    fut.set_exception(errors.Unavailable("the hub is stopping; retry"))
            self._queue.clear()

    async def _pipeline_worker(self, pipe: _Pipe, max_batch: int) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue[:max_batch], self._queue[max_batch:]
            try:
                results = await self._run_batch(pipe, [call for call, _ in batch])
            except errors.GiftingError as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(type(exc)(str(exc)))
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def _run_batch(
        self, pipe: _Pipe, batch: list[list[str | int] | tuple[str, ...]]
    ) -> list[Any]:
        """Send every call in one write (a gift as EVALSHA); on NOSCRIPT load the
        script and run again only the calls that hit it."""
        head = (b"EVALSHA", str(self._gift.sha), 1, self.bal)

        def pack(calls: list[list[str | int] | tuple[str, ...]]) -> bytes:
            return b"".join(
                command(*call) if isinstance(call, tuple) else command(*head, *call)
                for call in calls
            )

        t0 = time.perf_counter()
        try:
            results = await pipe.call(pack(batch), len(batch))
            again = [i for i, r in enumerate(results) if _noscript(r)]
            if again:
                await pipe.call(command(b"SCRIPT", b"LOAD", self._gift_source), 1)
                redo = await pipe.call(pack([batch[i] for i in again]), len(again))
                for i, r in zip(again, redo, strict=True):
                    results[i] = r
        except (OSError, EOFError, TimeoutError) as exc:
            self.metrics.store_call("pipeline", time.perf_counter() - t0, True)
            raise errors.Unavailable(
                "the store cannot be reached; retry with the same key"
            ) from exc
        self.metrics.store_call("pipeline", time.perf_counter() - t0, False)
        out: list[Any] = []
        for r in results:
            if not isinstance(r, ReplyError):
                out.append(r)
            elif _noscript(r):
                out.append(errors.Unavailable("store lost its scripts; retry"))
            elif str(r).partition(" ")[0] in _NOT_READY:
                out.append(errors.Unavailable(f"the store is not ready ({str(r)[:40]})"))
            else:
                out.append(lua_error(r))
        return out

    async def topup(self, user: str, coins: int, key: str) -> TopupResult:
        if type(coins) is not int or not 1 <= coins <= MAX_TOPUP:
            raise errors.BadRequest(f"coins must be an integer from 1 to {MAX_TOPUP}")

        async def go() -> Any:
            return await self._topup(keys=[self.bal], args=[user, coins, key, MAX_BALANCE])

        res = await self._call("topup", go)
        return TopupResult(int(res[0]), bool(res[1]), int(res[2]))

    async def reverse(
        self, transfer: int, key: str, *, allow_negative: bool = False, reason: str = ""
    ) -> ReverseResult:
        """Undo ``transfer`` with a compensating one (idempotent by ``key``)."""
        if type(transfer) is not int or transfer < 1:
            raise errors.BadRequest("transfer must be a positive integer")

        async def go() -> Any:
            return await self._reverse(
                keys=[self.bal], args=[transfer, key, 1 if allow_negative else 0, reason[:200]]
            )

        res = await self._call("reverse", go)
        return ReverseResult(int(res[0]), int(res[1]), bool(res[2]))

    async def go_live(self, room: str, title: str) -> LiveResult:
        async def go() -> Any:
            return await self._live(keys=[self.bal], args=[room, 1, title])

        res = await self._call("go_live", go)
        return LiveResult(int(res[0]), int(res[1]))

    async def end_live(self, room: str) -> LiveResult:
        async def go() -> Any:
            return await self._live(keys=[self.bal], args=[room, 0, ""])

        res = await self._call("end_live", go)
        return LiveResult(int(res[0]), int(res[1]))

    # -- reads ---------------------------------------------------------------

    async def _read(self, *command: str) -> Any:
        """A read command, pipelined with the other calls waiting when ``run`` serves them."""
        if self._running:
            return await self._enqueue(command)

        async def go() -> Any:
            return await self.r.execute_command(*command)  # type: ignore[no-untyped-call]

        return await self._call("read", go)

    async def balance(self, user: str) -> int:
        value = await self._read("HGET", self.bal, user)
        return int(value or 0)

    async def room_state(self, room: str) -> RoomState:
        live, session, title = await self._read(
            "HMGET", self.key("room", room), "live", "session", "title"
        )
        return RoomState(
            live=live == b"1",
            session=int(session or 0),
            title=(title or b"").decode("utf-8", "replace"),
        )

    async def top(self, room: str, session: int, n: int = 10) -> list[dict[str, Any]]:
        async def go() -> Any:
            return await self.r.zrevrange(
                self.key("top", room, str(session)), 0, n - 1, withscores=True
            )

        rows = await self._call("top", go)
        if not rows:
            return []
        users = [u.decode() for u, _ in rows]

        async def names() -> Any:
            return await self.r.hmget(self.key("names"), users)

        got = await self._call("top_names", names)
        return [
            {"user": u, "name": (nm or b"").decode("utf-8", "replace"), "coins": int(score)}
            for u, (_, score), nm in zip(users, rows, got, strict=True)
        ]

    async def feed(self, room: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        start = "-" if after is None else "(" + after

        async def go() -> Any:
            return await self.r.xrange(self.key("feed", room), start, "+", count=limit)

        rows = await self._call("feed", go)
        out = []
        for entry_id, fields in rows:
            entry = _decode_map(fields[b"e"])
            entry["offset"] = entry_id.decode()
            out.append(entry)
        return out

    async def history(self, user: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        hi = "+inf" if before is None else f"({before}"

        async def go() -> Any:
            return await self.r.zrevrangebyscore(
                self.key("hist", user), hi, "-inf", start=0, num=limit
            )

        return [_decode_map(b) for b in await self._call("history", go)]

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (rex.RedisError, OSError):
            return False

    # -- audit ---------------------------------------------------------------

    async def _journal(self, batch: int) -> AsyncIterator[tuple[bytes, dict[bytes, bytes]]]:
        """Every journal entry, oldest first, read ``batch`` at a time."""
        start = "-"
        while True:
            rows: Any = await self.r.xrange(self.key("journal"), start, "+", count=batch)
            for entry_id, fields in rows:
                yield entry_id, fields
            if len(rows) < batch:
                return
            start = "(" + rows[-1][0].decode()

    async def audit(self, batch: int = 1000) -> AuditReport:
        """Replay the journal from its first entry and compare with every balance.

        Reversals are checked against the transfers they undo in a second pass
        over the journal that keeps only those transfers' postings, so memory
        grows with the reversals, not with the journal.
        """
        report = AuditReport()
        checks: list[AuditCheck] = [self.shop.audit_check(), self.campaigns.audit_check()]
        replayed: dict[str, int] = {}
        transfers: set[int] = set()
        reversals: list[tuple[int, int, dict[str, int]]] = []  # (reversal, of, postings)
        reversed_by: dict[int, int] = {}
        forced: set[str] = set()  # accounts a forced reversal took coins from
        async for entry_id, fields in self._journal(batch):
            report.entries += 1
            t = int(fields.get(b"t", b"0"))  # 0: a record that moves no coin (a stock put)
            if t in transfers:
                report.differences.append(f"transfer {t} appears twice in the journal")
            if t:
                transfers.add(t)
            mine = _postings(fields)
            kind = fields.get(b"kind", b"").decode()
            for check in checks:
                check.entry(t, kind, fields, mine, report)
            for acct, delta in mine.items():
                replayed[acct] = replayed.get(acct, 0) + delta
            net = sum(mine.values())
            if fields.get(b"kind") == b"reverse":
                of = int(fields.get(b"of", b"0"))
                if of in reversed_by:
                    report.differences.append(
                        f"transfer {of} reversed twice (by {reversed_by[of]} and {t})"
                    )
                reversed_by[of] = t
                reversals.append((t, of, mine))
                if fields.get(b"forced") == b"1":
                    forced.update(a for a, d in mine.items() if d < 0)
            if net != 0:
                report.differences.append(
                    f"journal entry {entry_id.decode()} (transfer {t}) does not sum to 0: {net}"
                )
        if reversals:
            undone: dict[int, dict[str, int]] = {}
            async for _, fields in self._journal(batch):
                t = int(fields.get(b"t", b"0"))
                if t in reversed_by and t not in undone:
                    undone[t] = _postings(fields)
            for t, of, mine in reversals:
                if undone.get(of) != {a: -d for a, d in mine.items()}:
                    report.differences.append(
                        f"reversal {t} does not mirror transfer {of}'s postings"
                    )
        raw: Any = await self.r.hgetall(self.bal)
        stored = {k.decode(): int(v) for k, v in raw.items()}
        for check in checks:
            await check.finish(stored, report)
        report.accounts = len(stored)
        for acct in sorted(set(stored) | set(replayed)):
            have, want = stored.get(acct, 0), replayed.get(acct, 0)
            if have != want:
                report.differences.append(
                    f"account {acct}: balance {have}, journal says {want} (off by {have - want})"
                )
            if acct != ISSUER and have < 0:
                if acct in forced:
                    report.notes.append(f"account {acct}: {have} after a forced reversal")
                else:
                    report.differences.append(f"account {acct}: negative balance {have}")
        report.total = sum(stored.values())
        if report.total != 0:
            report.differences.append(f"balances sum to {report.total}, not 0")
        return report


def _postings(fields: dict[bytes, bytes]) -> dict[str, int]:
    """A journal entry's ``post`` field: account -> delta ("acct=delta;...")."""
    out: dict[str, int] = {}
    post = fields.get(b"post", b"").decode()
    for posting in post.split(";") if post else ():
        acct, _, delta = posting.partition("=")
        out[acct] = out.get(acct, 0) + int(delta)
    return out


def now_ms() -> int:
    return int(time.time() * 1000)
