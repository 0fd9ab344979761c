"""Membership, presence, leaderboards and fan-out, with bounded send queues.

Room events reach a hub through the store's pub/sub (so hubs sharing a store
share rooms); each event is encoded once per encoding for the whole room and
the same bytes go into every member's queue. A queue holds at most
``send_queue`` frames: a member that falls that far behind is a slow consumer,
gets ``bye`` and is closed with 4009, so no buffer grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis.exceptions as rex
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gifting.auth import Claims
from gifting.bus import Bus
from gifting.cluster import StoreClient
from gifting.ledger import Ledger
from gifting.logs import event
from gifting.metrics import Metrics
from protocol import codec, errors
from protocol.messages import CLOSE_SLOW_CONSUMER

__all__ = ["Conn", "Frames", "Rooms"]

log = logging.getLogger("gifting.rooms")

# Seconds a closing client has, from ``Conn.close``, to read what is left for
# it (its ``bye`` last) and answer the close frame; then the socket is aborted.
CLOSE_DRAIN_TIMEOUT = 2.0
# Failed-command log lines per connection: a burst, then this many a second.
_LOG_BURST = 20.0
_LOG_RATE = 1.0

CREATOR = "creator"
VIEWER = "viewer"


class Frames:
    """One message, framed lazily at most once per encoding and compression.

    ``get`` returns the whole WebSocket frame (header and payload). A server's
    frames are unmasked, and compression (permessage-deflate, negotiated with
    no context takeover so each message is compressed on its own) gives the
    same bytes for every receiver too: a room's members all get the very same
    bytes object and the hub compresses and serializes nothing per connection.
    """

    __slots__ = ("_frames", "event")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self._frames: dict[tuple[bool, bool], bytes] = {}

    def get(self, json: bool, deflate: bool = False) -> bytes:
        frame = self._frames.get((json, deflate))
        if frame is None:
            plain = self._frames.get((json, False))
            if plain is None:
                if json:
                    payload = codec.encode_json(self.event).encode()
                    plain = _frame(OP_TEXT, payload)
                else:
                    payload = codec.encode_msgpack(self.event)
                    plain = _frame(OP_BINARY, payload)
                self._frames[(json, False)] = plain
            frame = plain
            if deflate:
                frame = _deflated(plain, json)
                self._frames[(json, True)] = frame
        return frame


OP_TEXT = 0x81  # FIN + text
OP_BINARY = 0x82  # FIN + binary
RSV1 = 0x40  # "this message is compressed" under permessage-deflate
# The compressor's window (server_max_window_bits, negotiated), and the size
# under which a message is not worth compressing.
DEFLATE_BITS = 11
DEFLATE_MIN = 256


def _deflated(plain: bytes, json: bool) -> bytes:
    """The compressed frame of ``plain`` (RFC 7692), or ``plain`` if small."""
    n = plain[1] & 0x7F
    head = 2 if n < 126 else 4 if n == 126 else 10
    payload = plain[head:]
    if len(payload) < DEFLATE_MIN:
        return plain
    c = zlib.compressobj(6, zlib.DEFLATED, -DEFLATE_BITS)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    if data.endswith(b"\x00\x00\xff\xff"):
        data = data[:-4]
    return _frame((OP_TEXT if json else OP_BINARY) | RSV1, data)


def _frame(first: int, payload: bytes) -> bytes:
    """An unfragmented, unmasked server frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


@dataclass(eq=False, slots=True)
class Conn:
    """One client connection: its identity, rooms and bounded send queue.

    A frame goes straight to the socket when nothing is queued and the
    transport is below its high-water mark (as websockets' ``broadcast`` does,
    with no task switch); otherwise it waits in ``queue``, at most ``limit``
    bytes, drained by ``writer`` as the socket drains.
    """

    ws: ServerConnection
    id: str
    json: bool
    limit: int
    metrics: Metrics
    # permessage-deflate was negotiated in a form ``Frames`` can serve.
    deflate: bool = False
    claims: Claims | None = None
    rooms: dict[str, str] = field(default_factory=dict)
    queue: deque[bytes] = field(default_factory=deque)
    queued: int = 0  # bytes in ``queue``
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closing: tuple[int, str] | None = None
    # Loop time by which the close must be done, and the writer's deadline that
    # ``close`` moves there: without it a client that stopped reading would keep
    # the writer in ``drain`` forever (and the hub's shutdown with it).
    close_by: float | None = None
    deadline: asyncio.Timeout | None = None
    finished: bool = False
    # The writer task exists only once something had to wait (or a close): an
    # idle connection costs no task.
    task: asyncio.Task[None] | None = None
    # Frames read, commands that failed, and the budget of failure log lines
    # (a token bucket: a burst of ``_LOG_BURST``, then one a second).
    frames_in: int = 0
    # This connection's money-move bucket (gifts, effects, buys), set by the hub.
    money: Any = None
    failures: int = 0
    log_tokens: float = 0.0
    log_at: float = 0.0

    @property
    def user(self) -> str:
        assert self.claims is not None
        return self.claims.user

    def may_log(self, now: float) -> bool:
        if self.log_at == 0.0:
            self.log_tokens = _LOG_BURST
        else:
            self.log_tokens = min(_LOG_BURST, self.log_tokens + (now - self.log_at) * _LOG_RATE)
        self.log_at = now
        if self.log_tokens < 1:
            return False
        self.log_tokens -= 1
        return True

    def _write(self, frame: bytes) -> None:
        # websockets hands its own frames (pongs, close) to the transport as
        # soon as it makes them, so a ready frame written here keeps its order.
        self.ws.transport.write(frame)
        self.metrics.frames_out += 1

    def push(self, frame: bytes) -> None:
        """Send or queue a frame; a full queue makes this a slow consumer."""
        if self.closing is not None:
            return
        ws = self.ws
        if not self.queue and not ws.paused and ws.protocol.state is State.OPEN:
            self._write(frame)
            return
        if self.queued + len(frame) > self.limit:
            self.metrics.evictions += 1
            event(
                log,
                logging.INFO,
                "conn.slow_consumer",
                conn=self.id,
                user=self.claims.user if self.claims else None,
                queued_bytes=self.queued,
            )
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: could not keep up with its room")
            return
        self.queue.append(frame)
        self.queued += len(frame)
        self._kick()

    def _kick(self) -> None:
        self.wakeup.set()
        if self.task is None and not self.finished:
            self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        # A peer that vanishes mid-write (reset, EOF) just ends this connection.
        with contextlib.suppress(ConnectionClosed, ConnectionError):
            await self.writer()

    def send(self, message: dict[str, Any]) -> None:
        self.push(Frames(message).get(self.json, self.deflate))

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Send ``bye`` and close with ``code``, within ``CLOSE_DRAIN_TIMEOUT``.

        What is queued is dropped (a slow consumer's backlog), unless ``flush``:
        a hub going away still delivers the answers it queued, the ``bye`` after them.
        """
        if self.closing is not None:
            return
        if not flush:
            self.queue.clear()
            self.queued = 0
        bye = Frames({"ev": "bye", "code": code, "reason": reason}).get(self.json, self.deflate)
        self.queue.append(bye)
        self.queued += len(bye)
        self.closing = (code, reason)
        self.close_by = asyncio.get_running_loop().time() + CLOSE_DRAIN_TIMEOUT
        if self.deadline is not None:
            self.deadline.reschedule(self.close_by)
        self._kick()

    async def done(self) -> None:
        """The reader is gone: wait for the writer, if any, to empty the queue."""
        self.finished = True
        self.wakeup.set()
        if self.task is not None:
            try:
                await self.task
            except BaseException:
                self.task.cancel()
                raise

    async def writer(self) -> None:
        """Drain the queue into the socket as it drains; ends after the close frame.

        Runs under ``deadline``, which ``close`` sets: the bye, the queue before
        it and the closing handshake all fit in ``CLOSE_DRAIN_TIMEOUT`` or the
        socket is aborted. (websockets' own ``close`` drains without a bound.)
        """
        try:
            async with asyncio.timeout_at(self.close_by) as self.deadline:
                await self._pump()
        except TimeoutError:
            self.ws.transport.abort()
        finally:
            self.deadline = None

    async def _pump(self) -> None:
        ws, queue = self.ws, self.queue
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while queue:
                await ws.drain()
                if ws.protocol.state is not State.OPEN:
                    queue.clear()
                    self.queued = 0
                    return
                while queue and not ws.paused:
                    frame = queue.popleft()
                    self.queued -= len(frame)
                    self._write(frame)
            if self.closing is not None:
                await ws.close(*self.closing)
                return
            if self.finished:
                return


@dataclass
class _Room:
    members: dict[Conn, str] = field(default_factory=dict)
    # Events gathered while the room's batch window is open (None: closed), each
    # with whether only creators receive it; the timer that flushes them.
    window: list[tuple[dict[str, Any], bool]] | None = None
    timer: asyncio.TimerHandle | None = None
    viewers_sent: int = -1
    top_sent: list[dict[str, Any]] = field(default_factory=list)
    top_dirty: bool = True
    session: int = 0

    @property
    def local_viewers(self) -> int:
        return sum(1 for role in self.members.values() if role == VIEWER)


class Rooms:
    """This hub's rooms and users, fed by the store's pub/sub."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        client: StoreClient,
        bus_url: str,
        hub_id: str,
        metrics: Metrics,
        tick: float = 1.0,
        timeout: float = 3.0,
        batch_window: float = 0.1,
    ) -> None:
        self.ledger = ledger
        self.r = client
        self.hub_id = hub_id
        self.metrics = metrics
        self.tick = tick
        self.batch_window = batch_window
        self.rooms: dict[str, _Room] = {}
        self.users: dict[str, set[Conn]] = {}
        # The bus subscribes where the scripts publish: the ledger's slot.
        self.bus = Bus(
            bus_url, self._on_message, timeout=timeout, metrics=metrics, slot_key=ledger.bal
        )
        self.pres_prefix = f"{ledger.prefix}:pres:"
        self.hubs_key = f"{ledger.prefix}:hubs"
        self.room_prefix = ledger.channel("room", "").encode()
        self.user_prefix = ledger.channel("user", "").encode()
        # A partitioned ledger's channels carry one tag per partition: the
        # bus hands them over without it (``on_message``).
        self.on_message: Callable[[bytes, bytes], None] = self._on_message
        if getattr(ledger, "partitions", 1) > 1:
            self.room_prefix, self.user_prefix = b"room:", b"user:"
            self.on_message = self._on_untagged

    # -- membership ----------------------------------------------------------

    async def add_user(self, conn: Conn) -> None:
        conns = self.users.setdefault(conn.user, set())
        conns.add(conn)
        await self.bus.subscribe(self.ledger.channel("user", conn.user))

    def remove_conn(self, conn: Conn) -> list[str]:
        """Forget a closed connection; returns the rooms whose presence changed."""
        changed = [room for room in list(conn.rooms) if self._leave_local(conn, room)]
        if conn.claims is not None:
            conns = self.users.get(conn.user)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.users[conn.user]
                    self.bus.unsubscribe(self.ledger.channel("user", conn.user))
        return changed

    async def join(self, conn: Conn, room: str, role: str) -> None:
        r = self.rooms.get(room)
        if r is None:
            r = self.rooms[room] = _Room()
        r.members[conn] = role
        conn.rooms[room] = role
        try:
            await self.bus.subscribe(self.ledger.channel("room", room))
        except TimeoutError:
            self._leave_local(conn, room)
            raise
        if role == VIEWER:
            await self.publish_presence(room)

    async def leave(self, conn: Conn, room: str) -> None:
        if self._leave_local(conn, room):
            await self.publish_presence(room)

    def _leave_local(self, conn: Conn, room: str) -> bool:
        role = conn.rooms.pop(room, None)
        r = self.rooms.get(room)
        if r is None:
            return False
        r.members.pop(conn, None)
        if not r.members:
            if r.timer is not None:
                r.timer.cancel()
            del self.rooms[room]
            self.bus.unsubscribe(self.ledger.channel("room", room))
        return role == VIEWER

    # -- presence ------------------------------------------------------------

    async def publish_presence(self, room: str) -> None:
        """Record this hub's viewer count for a room in the store."""
        r = self.rooms.get(room)
        n = r.local_viewers if r is not None else 0
        key = self.pres_prefix + room
        if n:
            await self.r.hset(key, self.hub_id, n)
        else:
            await self.r.hdel(key, self.hub_id)

    async def viewers(self, rooms: Iterable[str]) -> dict[str, int]:
        """Viewer counts over every live hub, one round trip for many rooms."""
        names = list(rooms)
        now = int(time.time() * 1000)
        async with self.r.pipeline(transaction=False) as p:
            p.zrangebyscore(self.hubs_key, now, "+inf")
            for room in names:
                p.hgetall(self.pres_prefix + room)
            res = await p.execute()
        alive = {h.decode() for h in res[0]} | {self.hub_id}
        out = {}
        for room, counts in zip(names, res[1:], strict=True):
            out[room] = sum(int(v) for h, v in counts.items() if h.decode() in alive)
        return out

    async def heartbeat(self) -> None:
        await self.r.zadd(self.hubs_key, {self.hub_id: int((time.time() + 5 * self.tick) * 1000)})

    async def ticker(self) -> None:
        """Once a tick: heartbeat, then presence and leaderboards that changed."""
        while True:
            try:
                await self._tick()
            except (rex.RedisError, rex.RedisClusterException, OSError, errors.Unavailable) as exc:
                # ``Unavailable``: from the ledger (leaderboards). On a cluster
                # the ledger's shard can fail over while the presence keys,
                # spread over the others, still answer.
                self.metrics.store_errors["rooms"] += 1
                event(log, logging.WARNING, "rooms.tick_failed", error=str(exc))
            await asyncio.sleep(self.tick)

    async def _tick(self) -> None:
        await self.heartbeat()
        if not self.rooms:
            return
        counts = await self.viewers(self.rooms)
        for room, n in counts.items():
            r = self.rooms.get(room)
            if r is not None and n != r.viewers_sent:
                r.viewers_sent = n
                self._emit(room, r, [({"ev": "presence", "room": room, "viewers": n}, False)])
        for room, r in list(self.rooms.items()):
            if not r.top_dirty:
                continue
            r.top_dirty = False
            top = await self.ledger.top(room, r.session)
            if top != r.top_sent and room in self.rooms:
                r.top_sent = top
                self._emit(room, r, [({"ev": "top", "room": room, "top": top}, False)])

    async def stop(self) -> None:
        """Remove this hub's presence so other hubs stop counting its viewers."""
        async with self.r.pipeline(transaction=False) as p:
            for room in self.rooms:
                p.hdel(self.pres_prefix + room, self.hub_id)
            p.zrem(self.hubs_key, self.hub_id)
            await p.execute()

    def set_session(self, room: str, session: int) -> None:
        """The room's current session, whose leaderboard the ticks follow."""
        r = self.rooms.get(room)
        if r is not None and session > r.session:
            r.session = session
            r.top_dirty = True

    # -- fan-out -------------------------------------------------------------

    def _emit(self, room: str, r: _Room, events: list[tuple[dict[str, Any], bool]]) -> None:
        """Deliver a room's events now if the room is quiet, else gather them.

        The first events after a quiet spell go out at once and open a window of
        ``batch_window`` seconds; what arrives meanwhile leaves at its end as
        one ``batch`` frame, encoded once per encoding for the whole room. A
        busy room thus costs one frame per window per member, not one per event.
        """
        if r.window is not None:
            r.window.extend(events)
            return
        self._deliver(r, events)
        if self.batch_window > 0:
            r.window = []
            r.timer = asyncio.get_running_loop().call_later(self.batch_window, self._flush, room)

    def _flush(self, room: str) -> None:
        r = self.rooms.get(room)
        if r is None:
            return
        pending = r.window
        if not pending:
            r.window, r.timer = None, None
            return
        r.window = []
        r.timer = asyncio.get_running_loop().call_later(self.batch_window, self._flush, room)
        self._deliver(r, pending)

    def _deliver(self, r: _Room, events: list[tuple[dict[str, Any], bool]]) -> None:
        everyone = [ev for ev, creators_only in events if not creators_only]
        viewer_frames = _frames(everyone)
        creator_frames = (
            _frames([ev for ev, _ in events]) if len(everyone) < len(events) else viewer_frames
        )
        for conn, role in list(r.members.items()):
            frames = creator_frames if role == CREATOR else viewer_frames
            if frames is not None:
                conn.push(frames.get(conn.json, conn.deflate))

    def _on_untagged(self, channel: bytes, data: bytes) -> None:
        self._on_message(channel[channel.find(b"}:") + 2 :], data)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        self.metrics.bus_messages += 1
        msg = msgpack.unpackb(data, raw=False)
        if channel.startswith(self.room_prefix):
            room = channel[len(self.room_prefix) :].decode()
            r = self.rooms.get(room)
            if r is not None:
                self._room_event(room, r, msg)
        elif channel.startswith(self.user_prefix):
            user = channel[len(self.user_prefix) :].decode()
            kind, value, skip = msg
            if kind == "balance":
                frames = Frames({"ev": "balance", "coins": value})
            elif kind == "event":  # ``value`` is the whole event: order, reward...
                frames = Frames(value)
            else:
                return
            for conn in list(self.users.get(user, ())):
                if conn.id != skip:
                    conn.push(frames.get(conn.json, conn.deflate))

    def _room_event(self, room: str, r: _Room, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "gift":
            bubble, entry = msg[1], msg[2]
            bubble["from"].setdefault("avatar", None)
            bubble["ev"] = "bubble"
            entry["ev"] = "gift"
            r.session = bubble["session"]
            r.top_dirty = True
            self.metrics.bubbles += 1
            self._emit(room, r, [(bubble, False), (entry, True)])
        elif kind == "event":
            # A room event a script published whole (effect, sale, reward, pinned);
            # those that carry ``seq`` took it from the room's one counter.
            self._emit(room, r, [(msg[1], False)])
        elif kind == "live":
            _, _, live, session, title = msg
            r.session = session
            r.top_dirty = True
            event = {"ev": "live", "room": room, "live": live, "session": session, "title": title}
            self._emit(room, r, [(event, False)])


def _frames(events: list[dict[str, Any]]) -> Frames | None:
    if not events:
        return None
    if len(events) == 1:
        return Frames(events[0])
    return Frames({"ev": "batch", "events": events})
