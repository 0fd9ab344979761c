"""Clients for fault runs: senders that keep each gift's key until it is answered,
viewers that follow a room across reconnects, and a gift load.

``Sender`` sends with ``Client.send_gift`` (each gift its own key, retried with
that key), pointing its client at a live hub of the ``Cluster`` when the
connection drops. ``Viewer`` records each bubble's ``seq`` per connection and,
once ``follow`` is called, reconnects (and re-joins) whenever it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.exceptions import WebSocketException

from gifting.config import DEFAULT_CATALOG
from protocol import errors
from protocol.client import Client, new_key

if TYPE_CHECKING:
    from tests.faults.cluster import Cluster

__all__ = ["PRICES", "Ack", "Load", "Sender", "Viewer", "error_name", "pick_gift"]

PRICES = {g.id: g.coins for g in DEFAULT_CATALOG}

# Answers that come after the store's idempotency check: the key moved nothing
# and never will. Any other error may hide an earlier attempt that did move
# coins (its answer lost), so only the same key, sent again, can tell.
FINAL_ERRORS = (errors.InsufficientFunds, errors.Conflict)


def error_name(exc: BaseException) -> str:
    """A wire error's code, else the exception's class name."""
    if isinstance(exc, errors.GiftingError):
        return exc.code.value
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class Ack:
    """A gift a sender was told succeeded."""

    user: str
    key: str
    room: str
    gift: str
    count: int
    cost: int
    transfer: int
    duplicate: bool
    url: str  # the hub that answered


class Sender:
    """A user sending gifts through ``Client.send_gift``, one at a time.

    On a dropped connection (or a failed reconnect) ``on_retry`` points the
    client at a live hub before ``send_gift`` reconnects and re-joins. With
    ``repoint``, a client whose connection closed between two gifts is pointed
    at a live hub before the next one too, as a client with a list of hubs
    would; without it ``send_gift`` first reconnects to the hub it had.
    """

    def __init__(
        self,
        cluster: Cluster,
        user: str,
        *,
        attempts: int = 30,
        backoff: float = 0.05,
        rng: random.Random | None = None,
        repoint: bool = True,
    ) -> None:
        self.cluster = cluster
        self.user = user
        self.attempts = attempts
        self.backoff = backoff
        self.repoint = repoint
        self.rng = rng or random.Random()
        self.client = self._new_client(cluster.pick_url(self.rng))
        self.acks: list[Ack] = []
        self.retries = 0
        self.retry_errors: Counter[str] = Counter()
        # ``send_gift`` raised and the driver started over with a new Client
        # (``gift_until_answered`` only), by what it raised.
        self.gave_up: Counter[str] = Counter()
        # Keys answered with an error after the idempotency check: nothing moved.
        self.final_errors: Counter[str] = Counter()
        # Keys with no answer yet: key -> (room, gift, count).
        self.pending: dict[str, tuple[str, str, int]] = {}
        self._seen: dict[str, asyncio.Event] = {}

    def _new_client(self, url: str) -> Client:
        return Client(url, token=self.cluster.token(self.user), timeout=self.cluster.timeout)

    async def open(self, url: str, rooms: list[str]) -> None:
        self.client.url = url
        await self.client.open()
        for room in rooms:
            await self.client.request("join", room=room)

    def _on_retry(self, attempt: int, exc: BaseException) -> None:
        self.retries += 1
        name = error_name(exc)
        self.retry_errors[name] += 1
        self.saw(name).set()
        # ConnectionLost and TimeoutError are OSErrors too.
        if isinstance(exc, OSError):
            self.client.url = self.cluster.pick_url(self.rng)

    def saw(self, name: str) -> asyncio.Event:
        """Set once ``send_gift`` retried after an error of this name (``error_name``)."""
        return self._seen.setdefault(name, asyncio.Event())

    async def gift(self, room: str, gift: str, count: int = 1, *, key: str | None = None) -> Ack:
        """One gift through ``send_gift``; what it raises is raised."""
        key = key or new_key()
        self.pending[key] = (room, gift, count)
        if self.repoint and self.client.closed.is_set():
            self.client.url = self.cluster.pick_url(self.rng)
        res = await self.client.send_gift(
            room,
            gift,
            count,
            key=key,
            attempts=self.attempts,
            backoff=self.backoff,
            on_retry=self._on_retry,
        )
        return self._acked(key, room, gift, count, res)

    def _acked(self, key: str, room: str, gift: str, count: int, res: dict[str, Any]) -> Ack:
        del self.pending[key]
        ack = Ack(
            user=self.user,
            key=key,
            room=room,
            gift=gift,
            count=count,
            cost=PRICES[gift] * count,
            transfer=int(res["transfer"]),
            duplicate=bool(res["duplicate"]),
            url=self.client.url,
        )
        self.acks.append(ack)
        return ack

    async def gift_until_answered(
        self, room: str, gift: str, count: int, *, key: str | None = None, within: float
    ) -> Ack | None:
        """Keep the key until it has an answer, for up to ``within`` seconds.

        Each time ``send_gift`` gives up (attempts spent, or an error it does not
        retry), the attempt is counted in ``gave_up`` and tried again with the
        same key from a new ``Client`` on a live hub. Returns None after a final
        error (no coins moved) or when time ran out (the key stays in ``pending``).
        """
        key = key or new_key()
        self.pending[key] = (room, gift, count)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self.gift(room, gift, count, key=key)
            except FINAL_ERRORS as exc:
                del self.pending[key]
                self.final_errors[error_name(exc)] += 1
                return None
            except TimeoutError:
                if loop.time() >= deadline:
                    self.gave_up["deadline"] += 1
                    return None
                self.gave_up["TimeoutError"] += 1
            except (errors.GiftingError, OSError, WebSocketException) as exc:
                # ConnectionLost is an OSError; a handshake cut short by a dying
                # hub is a WebSocketException, which ``send_gift`` does not retry.
                self.gave_up[error_name(exc)] += 1
            await self.restart()

    async def restart(self) -> None:
        """Drop the client, whatever state it is in, for a new one on a live hub."""
        old = self.client
        self.client = self._new_client(self.cluster.pick_url(self.rng))
        self.client.rooms = set(old.rooms)  # ``send_gift`` re-joins them on open
        await _close_quietly(old, self.cluster.timeout)

    def drop(self) -> None:
        """Cut the connection as a network failure would (no close handshake)."""
        ws = self.client.ws
        if ws is not None:
            ws.transport.abort()

    async def close(self) -> None:
        await _close_quietly(self.client, self.cluster.timeout)


async def _close_quietly(client: Client, timeout: float) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await client.close()


class Viewer:
    """A room member recording each bubble's ``seq`` with its connection's number.

    ``follow`` reconnects (to a live hub) and re-joins whenever the connection
    closes; ``gen`` counts connections, so order can be checked per connection.
    """

    def __init__(self, cluster: Cluster, user: str, room: str) -> None:
        self.cluster = cluster
        self.user = user
        self.room = room
        self.gen = 0
        self.seqs: list[tuple[int, int]] = []  # (gen, seq)
        self.reconnects = 0
        self.reconnecting = False
        self.reconnect_errors: Counter[str] = Counter()
        self.byes: Counter[int] = Counter()  # ``bye`` events by close code
        self.rng = random.Random(user)
        self._changed = asyncio.Event()
        self.client = Client(
            cluster.pick_url(self.rng),
            token=cluster.token(user),
            timeout=cluster.timeout,
            on_event=self._on_event,
        )
        self._task: asyncio.Task[None] | None = None

    def _on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("ev") == "bubble" and ev.get("room") == self.room:
            self.seqs.append((self.gen, int(ev["seq"])))
            self._changed.set()
        elif ev.get("ev") == "bye":
            self.byes[int(ev.get("code", 0))] += 1

    async def open(self, url: str) -> None:
        self.client.url = url
        await self.client.open()
        await self.client.request("join", room=self.room)

    def follow(self, within: float) -> None:
        """Start reconnecting on close; each reconnect must succeed within ``within`` s."""
        self._task = asyncio.get_running_loop().create_task(self._follow(within))

    async def _follow(self, within: float) -> None:
        while True:
            await self.client.closed.wait()
            self.gen += 1
            self.reconnecting = True
            try:
                async with asyncio.timeout(within):
                    await self._reopen()
            except TimeoutError:
                self.reconnect_errors["gave_up"] += 1
                return
            self.reconnecting = False
            self.reconnects += 1
            self._changed.set()

    async def _reopen(self) -> None:
        while True:
            self.client.url = self.cluster.pick_url(self.rng)
            try:
                await self.client.open()  # re-joins the room
                return
            except (errors.GiftingError, OSError, WebSocketException) as exc:
                self.reconnect_errors[error_name(exc)] += 1
                # A half-open connection (its auth or join failed): close it first.
                await _close_quietly(self.client, self.cluster.timeout)
                await asyncio.sleep(0.1)

    @property
    def last_seq(self) -> int:
        return self.seqs[-1][1] if self.seqs else 0

    async def wait_seq(self, seq: int) -> None:
        """Wait (under the caller's deadline) until a bubble with ``seq`` or later came."""
        while self.last_seq < seq:
            self._changed.clear()
            await self._changed.wait()

    async def wait_reconnects(self, n: int) -> None:
        while self.reconnects < n:
            self._changed.clear()
            await self._changed.wait()

    def by_gen(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for gen, seq in self.seqs:
            out.setdefault(gen, []).append(seq)
        return out

    def order_violations(self) -> list[str]:
        """Bubbles of one room reach a connection in ``seq`` order, each once."""
        out = []
        for gen, seqs in self.by_gen().items():
            bad = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a]
            if bad:
                out.append(f"viewer {self.user} connection {gen}: seq not increasing at {bad[:3]}")
        return out

    def drop(self) -> None:
        ws = self.client.ws
        if ws is not None:
            ws.transport.abort()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await _close_quietly(self.client, self.cluster.timeout)


def pick_gift(rng: random.Random) -> tuple[str, int]:
    """A cheap gift and a count: many gifts before any balance runs low."""
    return rng.choice(("rose", "heart", "star")), rng.randint(1, 3)


Choose = Callable[[random.Random], tuple[str, int]]


@dataclass
class Load:
    """Senders gifting to ``room`` as fast as they are answered, each gift its own
    key, until ``stop`` (each finishes the gift under way) or ``limit`` gifts each."""

    senders: list[Sender]
    room: str
    seed: int = 1
    limit: int = 10_000
    choose: Choose = pick_gift
    acks: list[Ack] = field(default_factory=list)
    stopping: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, s in enumerate(self.senders):
                tg.create_task(self._one(s, random.Random(self.seed * 1000 + i)))

    async def _one(self, s: Sender, rng: random.Random) -> None:
        for _ in range(self.limit):
            if self.stopping:
                return
            gift, count = self.choose(rng)
            self.acks.append(await s.gift(self.room, gift, count))
            self._changed.set()

    def stop(self) -> None:
        self.stopping = True

    async def reached(self, n: int) -> None:
        """Wait (under the caller's deadline) until ``n`` gifts were acked."""
        while len(self.acks) < n:
            self._changed.clear()
            await self._changed.wait()
