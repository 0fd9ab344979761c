"""The ledger partitioned by user (``serve --partitions N``, N >= 2; docs/scaling.md §5).

With one ledger every coin move runs in one slot, on one core of one master.
Here user ``u``'s balance, history, idempotency keys, combos and spend counter
live in partition ``p(u) = crc32(u) % N``, under the tag ``{<prefix>.p<k>}``
(``Pk`` below), and a room's state (live, session, seq, earned), feed,
leaderboards and channel live in its creator's partition. Every script still
touches the keys of one partition only, so on a cluster the partitions spread
over the masters and the gift work with them.

Keys of a partition ``Pk`` beyond those of ``gifting/ledger/__init__.py`` (the
same names, now per partition):

    Pk:bal "~transit"   this partition's in-flight account: + the coins debited
                        here and not yet credited, - the coins credited here
                        (summed over every partition: the coins in flight)
    Pk:out     HASH     the outbox: transfer -> msgpack entry (room, creator
                        partition, gift, count, cost, earned, fee, combo, the
                        sender's name and avatar, debit time, ...)
    Pk:done:<t> STRING  "credit" or "refund": transfer ``t`` (of any
                        partition) was applied here; kept ``idempotency_ttl``
                        (an outbox entry older than that raises the relay's alarm)

A transfer id is ``n * N + k`` (``n``: partition k's counter), an integer
unique over all partitions whose partition is ``t % N``.

A gift from ``s`` to room ``r`` (``gift``): the hub reads whether ``r`` is live
(one read in ``p(r)``: ``not_live`` is answered before any debit), then

1. ``gift_debit.lua`` in ``p(s)``: the checks (catalog copy, the hub's live
   flag, rate limit, idempotency key, funds, daily cap), then the debit into
   ``~transit``, combo, journal (``gift_debit``), history, key, outbox entry;
2. ``gift_credit.lua`` in ``p(r)``: at most once per transfer; if the room
   ended meanwhile it credits nothing and answers "refund" (3. is then
   ``gift_refund.lua`` in ``p(s)``, which gives the coins back and drops the key,
   and the gift is answered ``not_live``); else the creator's share, the
   platform's fee, journal (``gift_credit``), seq, feed, leaderboard, and the
   bubble on ``Pr:room:<r>``;
3. ``HDEL Ps:out <t>``: the ack.

A hub that dies after 1. leaves the outbox entry: every hub runs ``relay``,
which re-runs 2. and 3. for entries older than ``RELAY_AGE_MS``; 2. and 3. are
idempotent, so two relays or a slow hub and a relay do it once between them.

Not partitioned (refused with ``forbidden`` by the hub): effects, the shop,
campaigns and reversals. ``--ack-replicas`` is not supported with partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from redis.commands.core import AsyncScript

from gifting.bus import Bus, Handler
from gifting.cluster import Connector, StoreClient
from gifting.ledger.ledger import (
    _NOT_READY,
    _WRONG_NODE,
    ISSUER,
    MAX_BALANCE,
    MAX_TOPUP,
    AuditReport,
    GiftResult,
    Ledger,
    LiveResult,
    RoomState,
    TopupResult,
    _code,
    _decode_map,
    _noscript,
    _Pipe,
    _postings,
    lua_error,
)
from gifting.logs import event
from gifting.metrics import Metrics
from gifting.resp import ReplyError, command
from protocol import errors

__all__ = ["TRANSIT", "PartBus", "PartitionAuditReport", "PartitionedLedger"]

log = logging.getLogger("gifting.relay")

TRANSIT = "~transit"
# The relay takes over outbox entries this old (younger ones are a hub's own, in flight).
RELAY_AGE_MS = 3000
RELAY_INTERVAL = 1.0

_NOT_PARTITIONED = "not available with --partitions"


def partition_of(user: str, n: int) -> int:
    return zlib.crc32(user.encode()) % n


@dataclass(slots=True)
class PartitionAuditReport(AuditReport):
    in_flight: int = 0  # transfers debited and not credited (or refunded)
    in_flight_coins: int = 0


class _Refunding(errors.Unavailable):
    """The credit found the room ended; the refund back to the sender failed."""


class PartitionedLedger(Ledger):
    """``Ledger``'s money path (top-up, balance, gift, history, feed, audit) over
    ``partitions`` partitions; the rest of the economy is refused."""

    def __init__(
        self,
        client: StoreClient,
        *,
        partitions: int,
        prefix: str = "g",
        creator_share_pct: int = 50,
        feed_maxlen: int = 100_000,
        idempotency_ttl: int = 48 * 3600,
        metrics: Metrics | None = None,
        url: str | None = None,
    ) -> None:
        if partitions < 2:
            raise ValueError("a partitioned ledger needs 2 partitions or more")
        super().__init__(
            client,
            prefix=prefix,
            creator_share_pct=creator_share_pct,
            feed_maxlen=feed_maxlen,
            idempotency_ttl=idempotency_ttl,
            metrics=metrics,
            url=url,
        )
        self.partitions = partitions
        self.tags = ["{" + f"{prefix}.p{k}" + "}" for k in range(partitions)]
        self._debit = self.script("gift_debit.lua")
        self._credit = self.script("gift_credit.lua")
        self._refund = self.script("gift_refund.lua")
        self._topup_part = self.script("topup_part.lua")
        # Per partition, the calls waiting for ``run``'s pipeliners (none: direct).
        self._parts: list[_Partition] = []

    # -- layout --------------------------------------------------------------

    def part(self, user: str) -> int:
        return partition_of(user, self.partitions)

    def bal_at(self, k: int) -> str:
        return self.tags[k] + ":bal"

    def key_at(self, k: int, *parts: str) -> str:
        return ":".join((self.tags[k], *parts))

    def channel(self, kind: str, name: str) -> str:
        """A user's channel lives in the user's partition, a room's in its creator's."""
        return f"{self.tags[self.part(name)]}:{kind}:{name}"

    # -- setup ---------------------------------------------------------------

    async def load(self, catalog: dict[str, int], effects: dict[str, int] | None = None) -> None:
        """Load the scripts; a copy of the catalog in every partition (the debit reads it)."""

        async def go() -> None:
            for s in self._scripts:
                await self.r.script_load(s.script)
            if catalog:
                for k in range(self.partitions):
                    await self.r.hset(
                        self.key_at(k, "catalog"), mapping={g: c for g, c in catalog.items()}
                    )

        await self._call("load", go)

    async def run(
        self, url: str, *, timeout: float = 3.0, workers: int = 2, max_batch: int = 512
    ) -> None:
        """Pipeline concurrent calls per partition: ``workers`` bare connections
        to each partition's master, each carrying a batch per round trip (as
        ``Ledger.run`` does for the one slot). Until cancelled."""
        self._parts = [_Partition(self, k) for k in range(self.partitions)]
        pipes = [
            (part, _Pipe(Connector(url, self.bal_at(part.k), timeout=timeout), timeout))
            for part in self._parts
            for _ in range(workers)
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                for part, pipe in pipes:
                    tg.create_task(part.worker(pipe, max_batch))
        finally:
            parts, self._parts = self._parts, []
            for _, pipe in pipes:
                pipe.close()
            for part in parts:
                part.fail_all()

    async def ping(self) -> bool:
        for k in range(self.partitions):
            try:
                await self.r.exists(self.bal_at(k))
            except Exception:
                return False
        return True

    # -- calls ---------------------------------------------------------------

    async def _script(
        self, call: str, script: AsyncScript, k: int, args: list[bytes | str | int]
    ) -> Any:
        """A script in partition ``k`` (``KEYS[1]`` is its ``bal``)."""
        if self._parts:
            return await self._parts[k].enqueue(
                (b"EVALSHA", str(script.sha), 1, self.bal_at(k), *args), script
            )

        async def go() -> Any:
            return await script(keys=[self.bal_at(k)], args=args)

        return await self._call(call, go)

    async def _cmd(self, call: str, k: int, *cmd: str | int) -> Any:
        """A plain command on partition ``k``'s keys."""
        if self._parts:
            return await self._parts[k].enqueue(cmd, None)

        async def go() -> Any:
            return await self.r.execute_command(*cmd)

        return await self._call(call, go)

    async def topup(self, user: str, coins: int, key: str) -> TopupResult:
        if type(coins) is not int or not 1 <= coins <= MAX_TOPUP:
            raise errors.BadRequest(f"coins must be an integer from 1 to {MAX_TOPUP}")
        k = self.part(user)
        args: list[bytes | str | int] = [user, coins, key, MAX_BALANCE, self.partitions, k]
        res = await self._script("topup", self._topup_part, k, args)
        return TopupResult(int(res[0]), bool(res[1]), int(res[2]))

    async def reverse(
        self, transfer: int, key: str, *, allow_negative: bool = False, reason: str = ""
    ) -> Any:
        raise errors.Forbidden(f"reversals are {_NOT_PARTITIONED}")

    async def go_live(self, room: str, title: str) -> LiveResult:
        res = await self._script("go_live", self._live, self.part(room), [room, 1, title])
        return LiveResult(int(res[0]), int(res[1]))

    async def end_live(self, room: str) -> LiveResult:
        res = await self._script("end_live", self._live, self.part(room), [room, 0, ""])
        return LiveResult(int(res[0]), int(res[1]))

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
        """Debit, credit, ack (see the module's docstring); answered after the
        credit, or after the debit alone when the creator's partition fails."""
        res, entry = await self.debit(
            sender=sender,
            room=room,
            gift=gift,
            count=count,
            key=key,
            name=name,
            avatar=avatar,
            limited=limited,
            conn=conn,
            cap=cap,
        )
        if entry is not None:
            try:
                applied = await self.finish(entry)
            except _Refunding:
                applied = 2  # the refund itself failed: the relay makes it
            except errors.Unavailable:
                applied = 1  # debited: the relay credits it once the partition answers
            if applied == 2:
                raise errors.NotLive(f"room {room} is not live")
        return res

    async def debit(
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
    ) -> tuple[GiftResult, bytes | None]:
        """Step 1 alone (a test stops here to play a hub that died): the
        result and the outbox entry still to credit (None once credited)."""
        kd, ks = self.part(room), self.part(sender)
        live = await self._cmd("gift_live", kd, "HGET", self.key_at(kd, "room", room), "live")
        args: list[bytes | str | int] = [
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
            self.idem_ttl,
            cap,
            1 if live == b"1" else 0,
            self.partitions,
            ks,
            kd,
        ]
        res = await self._script("gift_debit", self._debit, ks, args)
        entry = res[4] if len(res) > 4 and isinstance(res[4], bytes) else None
        return GiftResult(int(res[0]), int(res[1]), int(res[2]), bool(res[3])), entry

    async def finish(self, entry: bytes) -> int:
        """Steps 2 and 3 for an outbox entry: 1 credited now, 0 before, 2 refunded."""
        e = _decode_map(entry)
        t, kd = int(e["t"]), int(e["dest"])
        ks = t % self.partitions
        args: list[bytes | str | int] = [entry, self.feed_maxlen, self.idem_ttl]
        applied = int(await self._script("gift_credit", self._credit, kd, args))
        if applied == 2:
            try:
                await self._script("gift_refund", self._refund, ks, [t])
            except errors.Unavailable as exc:
                raise _Refunding(str(exc)) from exc
        else:
            await self._cmd("gift_ack", ks, "HDEL", self.key_at(ks, "out"), t)
        return applied

    async def relay(self, min_age_ms: int = RELAY_AGE_MS) -> int:
        """One pass over every outbox: finish entries older than ``min_age_ms``,
        oldest first. Returns how many it credited (or refunded) now."""
        done = 0
        cutoff = int(time.time() * 1000) - min_age_ms
        for k in range(self.partitions):
            out_key = self.key_at(k, "out")

            async def scan(key: str = out_key) -> Any:
                return await self.r.hgetall(key)

            try:
                raw: dict[bytes, bytes] = await self._call("relay_scan", scan)
            except errors.GiftingError as exc:
                # One partition down must not hold up the others' outboxes.
                event(log, logging.WARNING, "relay.scan_failed", partition=k, error=str(exc))
                continue
            box = sorted((int(t), v) for t, v in raw.items())
            for t, v in box:
                try:
                    ms = int(_decode_map(v)["ms"])
                    if ms > cutoff:
                        continue
                    if ms < cutoff - self.idem_ttl * 500:
                        # Half the life of a credit's mark gone: past it, a credit
                        # already applied (and not acked) would be applied again.
                        event(log, logging.ERROR, "relay.old_entry", transfer=t, age_ms=cutoff - ms)
                    if await self.finish(v):
                        done += 1
                        event(log, logging.INFO, "relay.finished", transfer=t)
                except _Refunding as exc:
                    event(log, logging.WARNING, "relay.refund_failed", transfer=t, error=str(exc))
                except Exception as exc:
                    # A bad entry (or a store error on it) is logged and left for
                    # the next pass; the entries after it are still finished.
                    self.metrics.store_errors["relay"] += 1
                    event(log, logging.WARNING, "relay.entry_failed", transfer=t, error=str(exc))
        return done

    async def relay_loop(self, interval: float = RELAY_INTERVAL) -> None:
        """Every hub's relay task: a pass every ``interval`` seconds, for ever."""
        while True:
            try:
                await self.relay()
            except Exception as exc:  # the store's, or a corrupt entry: try again later
                self.metrics.store_errors["relay"] += 1
                event(log, logging.WARNING, "relay.failed", error=str(exc))
            await asyncio.sleep(interval)

    # -- reads ---------------------------------------------------------------

    async def balance(self, user: str) -> int:
        k = self.part(user)
        value = await self._cmd("read", k, "HGET", self.bal_at(k), user)
        return int(value or 0)

    async def room_state(self, room: str) -> RoomState:
        k = self.part(room)
        live, session, title = await self._cmd(
            "read", k, "HMGET", self.key_at(k, "room", room), "live", "session", "title"
        )
        return RoomState(
            live=live == b"1",
            session=int(session or 0),
            title=(title or b"").decode("utf-8", "replace"),
        )

    async def top(self, room: str, session: int, n: int = 10) -> list[dict[str, Any]]:
        k = self.part(room)

        async def go() -> Any:
            return await self.r.zrevrange(
                self.key_at(k, "top", room, str(session)), 0, n - 1, withscores=True
            )

        rows = await self._call("top", go)
        if not rows:
            return []
        users = [u.decode() for u, _ in rows]

        async def names() -> Any:
            return await self.r.hmget(self.key_at(k, "names"), users)

        got = await self._call("top_names", names)
        return [
            {"user": u, "name": (nm or b"").decode("utf-8", "replace"), "coins": int(score)}
            for u, (_, score), nm in zip(users, rows, got, strict=True)
        ]

    async def feed(self, room: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        start = "-" if after is None else "(" + after
        feed_key = self.key_at(self.part(room), "feed", room)

        async def go() -> Any:
            return await self.r.xrange(feed_key, start, "+", count=limit)

        out = []
        for entry_id, fields in await self._call("feed", go):
            entry = _decode_map(fields[b"e"])
            entry["offset"] = entry_id.decode()
            out.append(entry)
        return out

    async def history(self, user: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        hi = "+inf" if before is None else f"({before}"
        hist = self.key_at(self.part(user), "hist", user)

        async def go() -> Any:
            return await self.r.zrevrangebyscore(hist, hi, "-inf", start=0, num=limit)

        return [_decode_map(b) for b in await self._call("history", go)]

    # -- audit ---------------------------------------------------------------

    async def _journal_at(
        self, k: int, batch: int
    ) -> AsyncIterator[tuple[bytes, dict[bytes, bytes]]]:
        start = "-"
        while True:
            rows: Any = await self.r.xrange(self.key_at(k, "journal"), start, "+", count=batch)
            for entry_id, fields in rows:
                yield entry_id, fields
            if len(rows) < batch:
                return
            start = "(" + rows[-1][0].decode()

    async def audit(self, batch: int = 1000) -> PartitionAuditReport:
        """Replay every partition's journal against its balances; then, over all
        partitions, the balances (``~transit`` included) must sum to 0 and
        ``~transit`` must equal the coins of the outbox entries not yet credited.

        Each partition is read on its own while transfers may move, so a run
        under load can see a transfer half-way; an audit at rest is exact."""
        report = PartitionAuditReport()
        transit = 0
        for k in range(self.partitions):
            replayed: dict[str, int] = {}
            seen: set[tuple[int, str]] = set()
            async for entry_id, fields in self._journal_at(k, batch):
                report.entries += 1
                t = int(fields.get(b"t", b"0"))
                kind = fields.get(b"kind", b"").decode()
                if (t, kind) in seen:
                    report.differences.append(f"p{k}: transfer {t} ({kind}) appears twice")
                seen.add((t, kind))
                mine = _postings(fields)
                for acct, delta in mine.items():
                    replayed[acct] = replayed.get(acct, 0) + delta
                if sum(mine.values()):
                    report.differences.append(
                        f"p{k}: journal entry {entry_id.decode()} (transfer {t}) "
                        f"does not sum to 0: {sum(mine.values())}"
                    )
            raw: Any = await self.r.hgetall(self.bal_at(k))
            stored = {a.decode(): int(v) for a, v in raw.items()}
            report.accounts += len(stored)
            for acct in sorted(set(stored) | set(replayed)):
                have, want = stored.get(acct, 0), replayed.get(acct, 0)
                if have != want:
                    report.differences.append(
                        f"p{k}: account {acct}: balance {have}, journal says {want} "
                        f"(off by {have - want})"
                    )
                if acct not in (ISSUER, TRANSIT) and have < 0:
                    report.differences.append(f"p{k}: account {acct}: negative balance {have}")
            transit += stored.get(TRANSIT, 0)
            report.total += sum(stored.values())
            box: Any = await self.r.hgetall(self.key_at(k, "out"))
            for t_raw, entry in box.items():
                e = _decode_map(entry)
                mark = await self.r.get(self.key_at(int(e["dest"]), "done", str(int(t_raw))))
                if mark != b"credit":
                    report.in_flight += 1
                    report.in_flight_coins += int(e["cost"])
        if report.total != 0:
            report.differences.append(f"balances sum to {report.total}, not 0")
        if transit != report.in_flight_coins:
            report.differences.append(
                f"{transit} coins in transit, but the outboxes hold {report.in_flight_coins}"
            )
        if report.in_flight:
            report.notes.append(
                f"{report.in_flight_coins} coins in flight in {report.in_flight} transfers"
            )
        return report


_Cmd = tuple[bytes | str | int, ...]


class _Partition:
    """The calls waiting for one partition's pipeliners (``PartitionedLedger.run``)."""

    def __init__(self, ledger: PartitionedLedger, k: int) -> None:
        self.ledger, self.k = ledger, k
        self.queue: list[tuple[_Cmd, AsyncScript | None, asyncio.Future[Any]]] = []
        self.wake = asyncio.Event()

    def enqueue(self, cmd: _Cmd, script: AsyncScript | None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((cmd, script, fut))
        self.wake.set()
        return fut

    def fail_all(self) -> None:
        for _, _, fut in self.queue:
            if not fut.done():
                fut.set_exception(errors.Unavailable("the hub is stopping; retry"))
        self.queue.clear()

    async def worker(self, pipe: _Pipe, max_batch: int) -> None:
        metrics = self.ledger.metrics
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch, self.queue = self.queue[:max_batch], self.queue[max_batch:]
            t0 = time.perf_counter()
            try:
                results = await pipe.call(b"".join(command(*c) for c, _, _ in batch), len(batch))
                again = [i for i, r in enumerate(results) if _noscript(r)]
                if again:
                    for src in dict.fromkeys(_source(batch[i][1]) for i in again):
                        await pipe.call(command(b"SCRIPT", b"LOAD", src), 1)
                    redo = await pipe.call(
                        b"".join(command(*batch[i][0]) for i in again), len(again)
                    )
                    for i, r in zip(again, redo, strict=True):
                        results[i] = r
            except (OSError, EOFError, TimeoutError):
                metrics.store_call("pipeline", time.perf_counter() - t0, True)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(
                            errors.Unavailable(
                                "the store cannot be reached; retry with the same key"
                            )
                        )
                continue
            metrics.store_call("pipeline", time.perf_counter() - t0, False)
            for (_, _, fut), r in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if not isinstance(r, ReplyError):
                    fut.set_result(r)
                elif _noscript(r):
                    fut.set_exception(errors.Unavailable("store lost its scripts; retry"))
                elif _code(r) in _NOT_READY:
                    fut.set_exception(errors.Unavailable(f"the store is not ready ({str(r)[:40]})"))
                else:
                    fut.set_exception(lua_error(r))
            if any(isinstance(r, ReplyError) and _code(r) in _WRONG_NODE for r in results):
                pipe.close()


def _source(script: AsyncScript | None) -> bytes | str:
    assert script is not None  # only a script's call answers NOSCRIPT
    src = script.script
    return bytes(src) if isinstance(src, memoryview) else src


class _AllConnected(asyncio.Event):
    """Set while every partition's bus is connected (read-only)."""

    def __init__(self, buses: list[Bus]) -> None:
        super().__init__()
        self._buses = buses

    def is_set(self) -> bool:
        return all(b.connected.is_set() for b in self._buses)

    async def wait(self) -> Literal[True]:
        for b in self._buses:
            await b.connected.wait()
        return True


class PartBus(Bus):
    """One ``Bus`` per partition: the scripts of partition k publish on its
    slot's shard, so each subscribes on its own connection to that slot's
    master (on a single server, N connections to it)."""

    def __init__(
        self,
        url: str,
        on_message: Handler,
        ledger: PartitionedLedger,
        *,
        timeout: float = 3.0,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(url, on_message, timeout=timeout, metrics=metrics, slot_key=ledger.bal)
        self.ledger = ledger
        self.buses = [
            Bus(url, on_message, timeout=timeout, metrics=metrics, slot_key=ledger.bal_at(k))
            for k in range(ledger.partitions)
        ]
        self.connected = _AllConnected(self.buses)

    def _bus(self, channel: str) -> Bus:
        tag = channel[: channel.index("}") + 1]
        return self.buses[self.ledger.tags.index(tag)]

    async def subscribe(self, channel: str) -> None:
        await self._bus(channel).subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        self._bus(channel).unsubscribe(channel)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for b in self.buses:
                tg.create_task(b.run())


def refused_ops(ops: Iterable[str]) -> dict[str, Any]:
    """Handlers answering ``forbidden`` for the economy not partitioned yet."""

    async def refuse(conn: Any, args: dict[str, Any]) -> dict[str, Any]:
        raise errors.Forbidden(_NOT_PARTITIONED)

    return dict.fromkeys(ops, refuse)
