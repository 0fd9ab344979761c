"""An asyncio client for the gifting protocol: request/reply by id, events, gift retry.

    async with await Client.connect("ws://127.0.0.1:8765/ws", token=t) as c:
        await c.request("join", room="alice")
        res = await c.send_gift("alice", "rose", count=3)   # retries safely by key
        bubble = await c.next_event("bubble", timeout=5)

``request`` raises the ``protocol.errors`` class of the reply's error code.
``batch`` events are unwrapped: callers see their events one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from protocol import codec, errors
from protocol.messages import MAX_ID, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK

__all__ = ["Client", "ConnectionLost", "new_key"]

Event = dict[str, Any]


def new_key() -> str:
    """A fresh idempotency key: create it before the first attempt, keep it until answered."""
    return secrets.token_hex(16)


class ConnectionLost(ConnectionError):
    """The connection closed before the answer came; ``code`` is the close code."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


class Client:
    """One connection. Not thread-safe; one event loop."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        json: bool = False,
        token_in_query: bool = False,
        timeout: float = 10.0,
        on_event: Callable[[Event], None] | None = None,
        on_frame: Callable[[bytes | str], bool] | None = None,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.json = json
        self.token_in_query = token_in_query
        self.timeout = timeout
        self.on_event = on_event
        # Sees each frame before it is decoded; True means "handled, skip it"
        # (a load generator counting a room's frames without decoding each).
        self.on_frame = on_frame
        self.connect_kwargs = connect_kwargs or {}
        self.ws: ClientConnection | None = None
        self.user: str | None = None
        self.rooms: set[str] = set()
        self.events: deque[Event] = deque()
        self._event_waiters: list[asyncio.Future[None]] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.closed = asyncio.Event()
        self.frames_in = 0  # frames received, a ``batch`` counting once
        self.undecodable = 0  # frames that were not JSON/MessagePack
        self.batches = 0

    # -- connection ----------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        client = cls(url, **kwargs)
        await client.open()
        return client

    async def open(self) -> None:
        """Open (or reopen) the connection, authenticate, and re-join known rooms."""
        url = self.url
        if self.token and self.token_in_query:
            url += ("&" if "?" in url else "?") + "token=" + self.token
        proto = SUBPROTOCOL_JSON if self.json else SUBPROTOCOL_MSGPACK
        async with asyncio.timeout(self.timeout):
            ws = await connect(
                url,
                subprotocols=[Subprotocol(proto)],
                max_size=2**22,
                open_timeout=self.timeout,
                **self.connect_kwargs,
            )
        # Only a connection that opened replaces the old one: after a failed
        # attempt the client still reads as closed, so the next one reopens.
        self.ws = ws
        self.closed = asyncio.Event()
        self.close_code, self.close_reason = None, ""
        self._reader = asyncio.create_task(self._read(ws))
        try:
            if self.token and not self.token_in_query:
                res = await self.request("auth", token=self.token)
                self.user = res["user"]
            for room in list(self.rooms):
                await self.request("join", room=room)
        except BaseException:
            # Not authenticated or not back in its rooms: not usable, so not kept.
            await self.close()
            raise

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                self.frames_in += 1
                if self.on_frame is not None and self.on_frame(frame):
                    continue
                try:
                    msg = codec.decode(frame, strict=False)
                except codec.UndecodableFrame:
                    self.undecodable += 1  # a broken frame is skipped, not fatal
                    continue
                if not isinstance(msg, dict):
                    continue
                if "id" in msg and ("ok" in msg or "error" in msg):
                    fut = self._pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif msg.get("ev") == "batch":
                    self.batches += 1
                    for ev in msg.get("events", []):
                        self._event(ev)
                else:
                    self._event(msg)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason or ""
            lost = ConnectionLost(self.close_code, self.close_reason)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(lost)
            self._pending.clear()
            self.closed.set()
            self._wake()

    def _event(self, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(ev)
            return
        self.events.append(ev)
        self._wake()

    def _wake(self) -> None:
        for w in self._event_waiters:
            if not w.done():
                w.set_result(None)
        self._event_waiters.clear()

    # -- commands ------------------------------------------------------------

    async def send_raw(self, frame: bytes | str) -> None:
        """Send a frame as is (tests of malformed input)."""
        assert self.ws is not None
        await self.ws.send(frame)

    async def request(
        self, op: str, *, timeout: float | None = None, **args: Any
    ) -> dict[str, Any]:
        """Send a command and return its ``ok`` result; raise its error's class."""
        reply = await self.request_raw({"op": op, **args}, timeout=timeout)
        if "error" in reply:
            err = reply["error"]
            raise errors.error_for_code(str(err.get("code")), str(err.get("message", "")))
        result: dict[str, Any] = reply["ok"]
        if op == "join":
            self.rooms.add(args["room"])
        elif op == "leave":
            self.rooms.discard(args["room"])
        elif op == "auth":
            self.user = result.get("user")
        return result

    async def request_raw(
        self, message: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a map (an ``id`` is added unless present); return the whole reply."""
        if self.ws is None or self.closed.is_set():
            raise ConnectionLost(self.close_code, self.close_reason)
        id_ = message.get("id")
        if id_ is None:
            id_ = next(self._ids) % (MAX_ID - 1) + 1
            message = {**message, "id": id_}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[id_] = fut
        try:
            await self.ws.send(codec.encode(message, json=self.json))
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                return await fut
        except ConnectionClosed:
            raise ConnectionLost(self.close_code, self.close_reason) from None
        finally:
            self._pending.pop(id_, None)

    async def send_gift(
        self,
        room: str,
        gift: str,
        count: int = 1,
        *,
        key: str | None = None,
        attempts: int = 5,
        backoff: float = 0.1,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> dict[str, Any]:
        """Send a gift, retrying with the same key after ``unavailable``, a timeout
        or a dropped connection (reconnecting and re-joining first). Any other
        error is the answer and is raised. ``on_retry(attempt, error)`` is
        called before each retry."""
        key = key or new_key()
        for attempt in range(attempts):
            try:
                if self.ws is None or self.closed.is_set():
                    await self.open()
                return await self.request("gift", room=room, gift=gift, count=count, key=key)
            except (
                errors.Unavailable,
                TimeoutError,
                ConnectionLost,
                OSError,
                InvalidHandshake,  # the hub went away mid-handshake, or is stopping (503)
            ) as exc:
                if attempt == attempts - 1:
                    raise
                if on_retry is not None:
                    on_retry(attempt, exc)
                await asyncio.sleep(min(backoff * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    # -- events --------------------------------------------------------------

    async def next_event(self, ev: str | None = None, *, timeout: float | None = None) -> Event:
        """The next event (of kind ``ev``), earlier events of other kinds kept in order."""
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            while True:
                for i, event in enumerate(self.events):
                    if ev is None or event.get("ev") == ev:
                        del self.events[i]
                        return event
                if self.closed.is_set():
                    raise ConnectionLost(self.close_code, self.close_reason)
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._event_waiters.append(waiter)
                await waiter

    def drain(self, ev: str | None = None) -> list[Event]:
        """Take every queued event (of kind ``ev``) without waiting."""
        taken = [e for e in self.events if ev is None or e.get("ev") == ev]
        self.events = deque(e for e in self.events if not (ev is None or e.get("ev") == ev))
        return taken

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait for the server to close the connection; return the close code."""
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            await self.closed.wait()
        return self.close_code
