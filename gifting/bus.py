"""A minimal pub/sub subscriber for the store, on one asyncio stream.

Why not redis-py's ``PubSub``: fan-out is the hot path, and here every message
goes from the socket to one callback with no per-message bookkeeping; a
subscription is confirmed (the server has it) before ``subscribe`` returns, so
a viewer who joined never misses the next bubble; and after the store restarts
the bus reconnects and subscribes again by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["Bus", "open_stream"]

log = logging.getLogger("gifting.bus")

Handler = Callable[[bytes, bytes], None]


async def open_stream(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a ``redis://``, ``valkey://`` or ``unix://`` URL and authenticate."""
    u = urlparse(url)
    if u.scheme == "unix":
        reader, writer = await asyncio.open_unix_connection(u.path, limit=2**20)
    else:
        reader, writer = await asyncio.open_connection(
            u.hostname or "127.0.0.1", u.port or 6379, limit=2**20
        )
    if u.password:
        args = [unquote(u.username), unquote(u.password)] if u.username else [unquote(u.password)]
        writer.write(_command(b"AUTH", *(a.encode() for a in args)))
        line = await reader.readline()
        if not line.startswith(b"+"):
            writer.close()
            raise ConnectionError("store rejected the password")
    return reader, writer


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def _hiredis() -> Any:
    """hiredis (the ``fast`` extra) parses replies in C; None when not installed."""
    try:
        return importlib.import_module("hiredis")
    except ImportError:
        return None


_HIREDIS = _hiredis()


async def _replies_hiredis(reader: asyncio.StreamReader, hiredis: Any) -> Any:
    """Every reply, parsed in C from whatever each read brings."""
    parser = hiredis.Reader()
    while True:
        msg = parser.gets()
        if msg is False:
            data = await reader.read(1 << 16)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            parser.feed(data)
            continue
        if isinstance(msg, hiredis.ReplyError):
            msg = ConnectionError(str(msg))
        yield msg


async def _replies_python(reader: asyncio.StreamReader) -> Any:
    while True:
        yield await _read_reply(reader)


def replies(reader: asyncio.StreamReader, *, use_hiredis: bool = True) -> Any:
    """An async iterator of the store's replies on ``reader`` (hiredis when installed)."""
    if use_hiredis and _HIREDIS is not None:
        return _replies_hiredis(reader, _HIREDIS)
    return _replies_python(reader)


async def _read_reply(reader: asyncio.StreamReader) -> object:
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind in (b"*", b">"):
        n = int(rest)
        return [await _read_reply(reader) for _ in range(n)]
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2]
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest
    if kind == b"-":
        return ConnectionError(rest.decode("utf-8", "replace"))
    raise ConnectionError(f"unexpected reply from store: {line[:40]!r}")


class Bus:
    """Channel subscriptions shared by every connection of one hub."""

    def __init__(
        self, url: str, on_message: Handler, *, timeout: float = 3.0, use_hiredis: bool = True
    ) -> None:
        self.url = url
        self.use_hiredis = use_hiredis
        self.on_message = on_message
        self.timeout = timeout
        self.channels: set[bytes] = set()
        # SUBSCRIBEs sent and not yet confirmed, and per channel never yet
        # confirmed an event set (and dropped) once the store confirms it.
        self._pending: dict[bytes, int] = {}
        self._ready: dict[bytes, asyncio.Event] = {}
        self._writer: asyncio.StreamWriter | None = None
        # Set while the bus is connected and subscribed to every channel.
        self.connected = asyncio.Event()

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait until the store confirms (``TimeoutError`` if it does not)."""
        ch = channel.encode()
        if ch not in self.channels:
            self.channels.add(ch)
            self._ready[ch] = asyncio.Event()
            if self._writer is not None:
                self._pending[ch] = self._pending.get(ch, 0) + 1
                self._writer.write(_command(b"SUBSCRIBE", ch))
        ready = self._ready.get(ch)
        if ready is not None:
            async with asyncio.timeout(self.timeout):
                await ready.wait()

    def unsubscribe(self, channel: str) -> None:
        ch = channel.encode()
        if ch in self.channels:
            self.channels.discard(ch)
            self._ready.pop(ch, None)
            if self._writer is not None:
                self._writer.write(_command(b"UNSUBSCRIBE", ch))

    async def run(self) -> None:
        """Read forever, reconnecting with backoff; owned by the hub's task group."""
        delay = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(open_stream(self.url), self.timeout)
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("bus.connect_failed error=%s retry_in=%.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._writer = writer
            self._pending = {ch: 1 for ch in self.channels}
            try:
                # ``connected`` is set once every channel is confirmed again, so
                # nothing this hub lets through is published to a deaf bus.
                if self.channels:
                    writer.write(_command(b"SUBSCRIBE", *self.channels))
                else:
                    self.connected.set()
                await self._read(reader)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                log.warning("bus.disconnected error=%s", exc)
            finally:
                self.connected.clear()
                self._writer = None
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        on_message = self.on_message
        async for msg in replies(reader, use_hiredis=self.use_hiredis):
            if isinstance(msg, Exception):
                raise msg
            if not isinstance(msg, list) or len(msg) < 3:
                continue
            kind = msg[0]
            if kind == b"message":
                try:
                    on_message(msg[1], msg[2])
                except Exception:
                    log.exception("bus.handler_failed channel=%r", msg[1])
            elif kind == b"subscribe":
                ch = msg[1]
                left = self._pending.get(ch, 0) - 1
                if left > 0:
                    self._pending[ch] = left
                    continue
                self._pending.pop(ch, None)
                ready = self._ready.pop(ch, None)  # kept only until first confirmed
                if ready is not None:
                    ready.set()
                if not self._pending:
                    self.connected.set()
