"""Typed calls for every coin move and the reads around them.

Scripts are loaded with ``SCRIPT LOAD`` semantics through redis-py's ``Script``
objects: each call is an ``EVALSHA``, and a ``NOSCRIPT`` reply (the store was
restarted or flushed its script cache) loads the script again and retries, so a
store restart needs no manual step.

Replication is asynchronous: a move is acked once the master has it, and a
master that dies before its replicas have it takes it along. With
``ack_replicas`` (``serve --ack-replicas K``) every coin move is acked only once
``K`` replicas hold it: ``WAIT K`` follows its script on the same connection,
to the master of the ledger's slot (``_run_batch``); short of that in
``ack_timeout`` ms the answer is ``unavailable``, the move having happened, and
its retry with the same key is acked once a ``WAIT`` after it succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, TypeVar

import msgpack
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from gifting.cluster import Connector, StoreClient
from gifting.ledger.campaigns import CampaignLedger
from gifting.ledger.shop import ShopLedger
from gifting.logs import event
from gifting.metrics import Metrics
from gifting.resp import ReplyError, command, replies
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

log = logging.getLogger("gifting.ledger")

T = TypeVar("T")


def _load(name: str) -> str:
    return resources.files("gifting.ledger").joinpath(name).read_text(encoding="utf-8")


# Error replies that say the store cannot serve now, not that the call is wrong.
_NOT_READY = frozenset(
    {"BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "OOM", "MOVED", "ASK", "CLUSTERDOWN"}
)
# Of those, the ones that say a bare connection is on the wrong node (a cluster's
# slot moved, or its shard is failing over): drop it, the next one asks anew.
_WRONG_NODE = frozenset({"READONLY", "MASTERDOWN", "TRYAGAIN", "MOVED", "ASK", "CLUSTERDOWN"})


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


def _code(reply: ReplyError) -> str:
    return str(reply).partition(" ")[0]


@dataclass(frozen=True, slots=True, eq=False)
class _Move:
    """A coin move other than a gift (a top-up, an effect, a buy...) sent through
    the pipeline so that its ``WAIT`` rides the same connection: one script."""

    script: AsyncScript
    args: list[str | int]


# What waits for the pipeliner: a gift's script arguments, a move, or a read
# command (a tuple), each with the future its answer goes to.
_Call = list[str | int] | _Move | tuple[str, ...]


class _Pipe:
    """One bare connection to the store for pipelined calls, opened on first use
    (on a cluster, on the master of the ledger's slot) and dropped on any
    failure (a reply that came too late would be misread)."""

    def __init__(self, connector: Connector, timeout: float) -> None:
        self.connector, self.timeout = connector, timeout
        self._writer: asyncio.StreamWriter | None = None
        self._replies: AsyncIterator[Any] | None = None

    async def call(self, payload: bytes, n: int) -> list[Any]:
        """Write ``n`` encoded commands and read their ``n`` replies.

        A kept connection found dead (the store restarted since its last use)
        is replaced and the commands sent once more: every call sent here is
        a read, or a coin move, idempotent by its key (a campaign's close has
        none, and a close sent twice answers ``closed`` the second time).
        """
        for _ in range(2):
            fresh = self._writer is None or self._replies is None
            try:
                if self._writer is None or self._replies is None:
                    reader, writer = await asyncio.wait_for(self.connector.open(), self.timeout)
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


def _waited(results: list[Any], k: int) -> bool:
    """Whether a batch's closing ``INCR`` and ``WAIT`` say ``k`` replicas hold it."""
    incr, waited = results[-2], results[-1]
    return isinstance(incr, int) and isinstance(waited, int) and waited >= k


def _decode_map(blob: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(blob, raw=False)
    if not isinstance(value, dict):
        raise errors.Internal("corrupt entry in the store")
    return value


class Ledger:
    """The store-side half of the server. One instance per hub, no global state."""

    def __init__(
        self,
        client: StoreClient,
        *,
        prefix: str = "g",
        creator_share_pct: int = 50,
        feed_maxlen: int = 100_000,
        idempotency_ttl: int = 48 * 3600,
        metrics: Metrics | None = None,
        ack_replicas: int = 0,
        ack_timeout: int = 1000,
        url: str | None = None,
    ) -> None:
        if ack_replicas and (url is None or ack_timeout < 1):
            # WAIT with timeout 0 blocks for ever; without the URL there is no
            # connection of our own to send it on.
            raise ValueError(
                "ack_replicas needs the store's url and an ack_timeout of 1 ms or more"
            )
        self.r = client
        self.metrics = metrics or Metrics()
        self.prefix = prefix
        self.tag = "{" + prefix + "}"
        self.bal = self.tag + ":bal"
        self.share = creator_share_pct
        self.feed_maxlen = feed_maxlen
        self.idem_ttl = idempotency_ttl
        # ``--ack-replicas``: a coin move is acked only once this many replicas
        # hold it (``WAIT`` after its script on the same connection, up to
        # ``ack_timeout`` ms; short of that the answer is ``unavailable``).
        self.ack_replicas = ack_replicas
        self.ack_timeout = ack_timeout
        self.url = url
        self._scripts: list[AsyncScript] = []
        self._gift_source = _load("gift.lua")
        self._gift = self.script("gift.lua")
        self._topup = self.script("topup.lua")
        self._live = self.script("live.lua")
        self._reverse = self.script("reverse.lua")
        # Calls waiting for the pipeliner (``_Call``), and whether ``run`` is serving them.
        self._queue: list[tuple[_Call, asyncio.Future[Any]]] = []
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

    async def move(self, call: str, script: AsyncScript, args: list[str | int]) -> Any:
        """A coin move's script (``KEYS[1]`` is ``P:bal``), timed as ``call``.

        With ``ack_replicas`` it goes through the pipeline, where ``WAIT``
        follows it on the same connection to the master of the ledger's slot
        (redis-py's client may send a ``WAIT`` to any connection, or any
        node, where it would wait for nothing); short of the replicas in
        time the answer is ``unavailable``, though the move happened."""
        if not self.ack_replicas:

            async def go() -> Any:
                return await script(keys=[self.bal], args=args)

            return await self._call(call, go)
        t0 = time.perf_counter()
        failed = True
        try:
            res = await self._acked(_Move(script, args))
            failed = False
            return res
        except errors.Unavailable:
            raise
        except errors.GiftingError:
            failed = False  # a script's verdict
            raise
        finally:
            self.metrics.store_call(call, time.perf_counter() - t0, failed)

    async def _acked(self, call: list[str | int] | _Move) -> Any:
        """A gift or move with ``ack_replicas``: through the pipeline when ``run``
        serves it, else alone on a connection of its own (the CLI, a test)."""
        if self._running:
            return await self._enqueue(call)
        assert self.url is not None
        timeout = 3.0 + self.ack_timeout / 1000
        pipe = _Pipe(Connector(self.url, self.bal, timeout=timeout), timeout)
        try:
            (res,) = await self._run_batch(pipe, [call])
        finally:
            pipe.close()
        if isinstance(res, BaseException):
            raise res
        return res

    decode_map = staticmethod(_decode_map)

    def key(self, *parts: str) -> str:
        return ":".join((self.tag, *parts))

    async def scan(self, match: str) -> AsyncIterator[bytes]:
        """This ledger's keys matching ``match`` (which starts with its tag).

        On a cluster every one of them lives on the master of the ledger's
        slot, so only that node is scanned: a plain cluster SCAN asks every
        master, and fails while any one of them is down.
        """
        if isinstance(self.r, RedisCluster):
            await self.r.initialize()  # the slot map (a no-op once known)
            node = self.r.get_node_from_key(self.bal)
            async for key in self.r.scan_iter(match=match, count=1000, target_nodes=node):
                yield key
        else:
            async for key in self.r.scan_iter(match=match, count=1000):
                yield key

    def channel(self, kind: str, name: str) -> str:
        """A sharded pub/sub channel: it carries the tag, so a script may
        ``SPUBLISH`` to it (on a cluster, only channels in the script's own slot)."""
        return f"{self.tag}:{kind}:{name}"

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
            if isinstance(exc, (rex.ClusterDownError, rex.TryAgainError, rex.AskError)):
                # A cluster failing over (MOVED left after the client's retries).
                raise errors.Unavailable(f"the store is not ready ({type(exc).__name__})") from exc
            if str(exc).partition(" ")[0] in _NOT_READY or isinstance(
                exc, (rex.ReadOnlyError, rex.OutOfMemoryError, rex.BusyLoadingError)
            ):
                # READONLY (a demoted master), OOM, BUSY, LOADING: the store
                # cannot serve now; not a verdict on the request.
                raise errors.Unavailable(f"the store is not ready ({str(exc)[:40]})") from exc
            failed = False  # a script's verdict (insufficient funds...): the store is fine
            raise lua_error(exc) from exc
        except (rex.ConnectionError, rex.TimeoutError, OSError, TimeoutError) as exc:
            raise errors.Unavailable(
                "the store cannot be reached; retry with the same key"
            ) from exc
        except (rex.RedisError, rex.RedisClusterException) as exc:
            # BUSY, LOADING, READONLY, MASTERDOWN...: not a verdict on the request.
            # (``RedisClusterException``: a cluster whose slot map could not be
            # learned, e.g. every node asked is down.)
            raise errors.Unavailable(f"the store is not ready ({type(exc).__name__})") from exc
        finally:
            self.metrics.store_call(call, time.perf_counter() - t0, failed)

    # -- setup ---------------------------------------------------------------

    async def load(self, catalog: dict[str, int], effects: dict[str, int] | None = None) -> None:
        """Load scripts and publish this hub's gift and effect prices to the store."""

        async def go() -> None:
            # Not in the pipeline: on a cluster, SCRIPT LOAD goes to every
            # master (which a cluster pipeline refuses to do).
            for s in self._scripts:
                await self.r.script_load(s.script)
            async with self.r.pipeline(transaction=False) as p:
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
        elif self.ack_replicas:
            res = await self._acked(args)
        else:

            async def go() -> Any:
                return await self._gift(keys=[self.bal], args=args)

            res = await self._call("gift", go)
        return GiftResult(int(res[0]), int(res[1]), int(res[2]), bool(res[3]))

    def _enqueue(self, call: _Call) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, fut))
        self._wake.set()
        return fut

    async def run(
        self, url: str, *, timeout: float = 3.0, workers: int = 2, max_batch: int = 512
    ) -> None:
        """Pipeline concurrent calls: one round trip carries every gift and read
        waiting (and, with ``ack_replicas``, every other coin move: see ``move``).

        Each gift stays its own atomic script call; pipelining only saves the
        round trip (and a client library's per-call work) per call. ``workers``
        connections to the store at ``url`` may each have a batch in flight,
        so the hub encodes the next batch while the store runs the last.
        """
        self._running = True
        pipes = [_Pipe(Connector(url, self.bal, timeout=timeout), timeout) for _ in range(workers)]
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
            except Exception:
                # Anything else (a reply the parser could not read...): this
                # batch is answered ``unavailable`` (each call is idempotent by
                # its key: a retry finds what did happen) and the worker goes on,
                # on a fresh connection; it must not end the hub.
                pipe.close()
                self.metrics.store_errors["pipeline"] += 1
                event(log, logging.ERROR, "ledger.batch_failed", exc_info=True, calls=len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(
                            errors.Unavailable("the store's answer was unreadable; retry")
                        )
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def _run_batch(self, pipe: _Pipe, batch: list[_Call]) -> list[Any]:
        """Send every call in one write (a gift or a move as EVALSHA); on NOSCRIPT
        load the script and run again only the calls that hit it.

        With ``ack_replicas``, a batch that carries a gift or a move ends with
        ``INCR P:acks`` and ``WAIT``: the INCR is a write of this connection
        after every script of the batch, so ``WAIT`` (which waits for the
        connection's last write) covers all of them, and the writes of any
        move a duplicate answer stands for (made before, maybe on another
        connection). Short of the replicas in time, every gift or move of the
        batch that a script answered (it moved coins, or stands for a move that
        did) is answered ``unavailable``: it happened, and its retry with the
        same key is acked once a later ``WAIT`` succeeds.
        """
        head = (b"EVALSHA", str(self._gift.sha), 1, self.bal)
        k = self.ack_replicas
        wait = bool(k) and any(not isinstance(call, tuple) for call in batch)
        tail = command(b"INCR", self.key("acks")) + command(b"WAIT", k, self.ack_timeout)

        def one(call: _Call) -> bytes:
            if isinstance(call, tuple):
                return command(*call)
            if isinstance(call, _Move):
                return command(b"EVALSHA", str(call.script.sha), 1, self.bal, *call.args)
            return command(*head, *call)

        def pack(calls: list[_Call]) -> tuple[bytes, int]:
            payload = b"".join(one(call) for call in calls)
            return (payload + tail, len(calls) + 2) if wait else (payload, len(calls))

        def source(call: _Call) -> bytes | str:
            if not isinstance(call, _Move):
                return self._gift_source
            src = call.script.script
            return bytes(src) if isinstance(src, memoryview) else src

        t0 = time.perf_counter()
        acked = True
        try:
            results = await pipe.call(*pack(batch))
            if wait:
                acked = _waited(results, k)
            again = [i for i, r in enumerate(results[: len(batch)]) if _noscript(r)]
            if again:
                for src in dict.fromkeys(source(batch[i]) for i in again):
                    await pipe.call(command(b"SCRIPT", b"LOAD", src), 1)
                redo = await pipe.call(*pack([batch[i] for i in again]))
                if wait:  # this WAIT covers the first round's writes too
                    acked = _waited(redo, k)
                for i, r in zip(again, redo, strict=False):
                    results[i] = r
        except (OSError, EOFError, TimeoutError) as exc:
            self.metrics.store_call("pipeline", time.perf_counter() - t0, True)
            raise errors.Unavailable(
                "the store cannot be reached; retry with the same key"
            ) from exc
        self.metrics.store_call("pipeline", time.perf_counter() - t0, False)
        if not acked:
            self.metrics.store_errors["wait"] += 1
        out: list[Any] = []
        for call, r in zip(batch, results, strict=False):
            if not isinstance(r, ReplyError):
                if acked or isinstance(call, tuple):
                    out.append(r)
                else:
                    out.append(
                        errors.Unavailable(
                            f"done, but not yet on {k} replica(s) of the store; "
                            "retry with the same key"
                        )
                    )
            elif _noscript(r):
                out.append(errors.Unavailable("store lost its scripts; retry"))
            elif _code(r) in _NOT_READY:
                out.append(errors.Unavailable(f"the store is not ready ({str(r)[:40]})"))
            else:
                out.append(lua_error(r))
        if any(isinstance(r, ReplyError) and _code(r) in _WRONG_NODE for r in results):
            pipe.close()
        return out

    async def topup(self, user: str, coins: int, key: str) -> TopupResult:
        if type(coins) is not int or not 1 <= coins <= MAX_TOPUP:
            raise errors.BadRequest(f"coins must be an integer from 1 to {MAX_TOPUP}")
        res = await self.move("topup", self._topup, [user, coins, key, MAX_BALANCE])
        return TopupResult(int(res[0]), bool(res[1]), int(res[2]))

    async def reverse(
        self, transfer: int, key: str, *, allow_negative: bool = False, reason: str = ""
    ) -> ReverseResult:
        """Undo ``transfer`` with a compensating one (idempotent by ``key``)."""
        if type(transfer) is not int or transfer < 1:
            raise errors.BadRequest("transfer must be a positive integer")
        args: list[str | int] = [transfer, key, 1 if allow_negative else 0, reason[:200]]
        res = await self.move("reverse", self._reverse, args)
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
            return await self.r.execute_command(*command)

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
        """Whether the store answers where the ledger lives. Not PING: on a
        cluster that goes to whichever node the client picked, and what must
        answer is the master of the ledger's slot (EXISTS goes there)."""
        try:
            await self.r.exists(self.bal)
            return True
        except (rex.RedisError, rex.RedisClusterException, OSError):
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
