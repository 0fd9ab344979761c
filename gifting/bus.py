"""A minimal pub/sub subscriber for the store, on one asyncio stream.

Why not redis-py's ``PubSub``: fan-out is the hot path, and here every message
goes from the socket to one callback with no per-message bookkeeping; a
subscription is confirmed (the server has it) before ``subscribe`` returns, so
a viewer who joined never misses the next bubble; and after the store restarts
the bus reconnects and subscribes again by itself.

Channels are sharded (``SSUBSCRIBE``): the scripts ``SPUBLISH`` to channels in
their own slot, which on a cluster reach only the shard that serves it, so the
bus subscribes on that shard's master (``cluster.Connector``) and on a single
server just there. When the shard's slot moves (a failover with the old master
still up), the server drops the subscriptions with an ``sunsubscribe`` the bus
did not ask for: the bus reconnects, to wherever the slot went.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gifting.cluster import Connector
from gifting.logs import event
from gifting.metrics import Metrics
from gifting.resp import command as _command
from gifting.resp import replies

__all__ = ["Bus"]

log = logging.getLogger("gifting.bus")

Handler = Callable[[bytes, bytes], None]

# Seconds of message handling after which the reader lets other tasks run.
_SLICE = 0.005


class Bus:
    """Channel subscriptions shared by every connection of one hub."""

    def __init__(
        self,
        url: str,
        on_message: Handler,
        *,
        timeout: float = 3.0,
        use_hiredis: bool = True,
        metrics: Metrics | None = None,
        slot_key: str = "",
    ) -> None:
        """``slot_key``: a key in the slot of every channel (required on a cluster)."""
        self.url = url
        self.connector = Connector(url, slot_key, timeout=timeout)
        self.metrics = metrics or Metrics()
        self.use_hiredis = use_hiredis
        self.on_message = on_message
        self.timeout = timeout
        self.channels: set[bytes] = set()
        # SUBSCRIBEs sent and not yet confirmed, and per channel never yet
        # confirmed an event set (and dropped) once the store confirms it.
        self._pending: dict[bytes, int] = {}
        self._ready: dict[bytes, asyncio.Event] = {}
        # SUNSUBSCRIBEs sent and not yet confirmed: any other ``sunsubscribe``
        # is the server dropping a channel whose slot moved.
        self._leaving: dict[bytes, int] = {}
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
                self._writer.write(_command(b"SSUBSCRIBE", ch))
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
                self._leaving[ch] = self._leaving.get(ch, 0) + 1
                self._writer.write(_command(b"SUNSUBSCRIBE", ch))

    async def run(self) -> None:
        """Read forever, reconnecting with backoff; owned by the hub's task group."""
        delay = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(self.connector.open(), self.timeout)
            except (OSError, ConnectionError, TimeoutError) as exc:
                self.metrics.store_errors["bus"] += 1
                event(log, logging.WARNING, "bus.connect_failed", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._writer = writer
            self._pending = {ch: 1 for ch in self.channels}
            self._leaving = {}
            try:
                # ``connected`` is set once every channel is confirmed again, so
                # nothing this hub lets through is published to a deaf bus.
                if self.channels:
                    writer.write(_command(b"SSUBSCRIBE", *self.channels))
                else:
                    self.connected.set()
                await self._read(reader)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                self.metrics.bus_reconnects += 1
                event(log, logging.WARNING, "bus.disconnected", error=str(exc))
            finally:
                self.connected.clear()
                self._writer = None
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        on_message = self.on_message
        clock = asyncio.get_running_loop().time
        since = clock()
        async for msg in replies(reader, use_hiredis=self.use_hiredis):
            if isinstance(msg, Exception):
                raise msg
            if not isinstance(msg, list) or len(msg) < 3:
                continue
            kind = msg[0]
            if kind == b"smessage":
                try:
                    on_message(msg[1], msg[2])
                except Exception:
                    event(
                        log,
                        logging.ERROR,
                        "bus.handler_failed",
                        exc_info=True,
                        channel=msg[1].decode(errors="replace"),
                    )
                # One read can hold hundreds of messages, each a room's fan-out:
                # let acks, timers and other reads run between slices of them.
                if clock() - since > _SLICE:
                    await asyncio.sleep(0)
                    since = clock()
            elif kind == b"ssubscribe":
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
            elif kind == b"sunsubscribe":
                ch = msg[1]
                left = self._leaving.get(ch, 0) - 1
                if left >= 0:
                    if left:
                        self._leaving[ch] = left
                    else:
                        del self._leaving[ch]
                elif ch in self.channels:
                    raise ConnectionError("the store moved the slot of the bus's channels")
