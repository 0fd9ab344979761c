"""permessage-deflate: a busy room's frames are compressed once for everyone.

The hub negotiates the extension with no context takeover, so a message
compresses to the same bytes for every member; clients that do not offer it,
or ask for a window smaller than the hub's, get plain frames.
"""

from __future__ import annotations

import asyncio
import base64
import os
import zlib
from typing import Any

import msgpack
import pytest

from gifting.rooms import DEFLATE_BITS
from tests.conftest import T, token, topup

BIG = "x" * 80  # the longest title


class RawWs:
    """A bare client: handshake with chosen extensions, then raw frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.response = b""

    @classmethod
    async def open(cls, port: int, user: str, extensions: str | None) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        ext = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
        writer.write(
            (
                f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: gifting.v1\r\n{ext}\r\n"
            ).encode()
        )
        ws = cls(reader, writer)
        async with asyncio.timeout(T):
            ws.response = await reader.readuntil(b"\r\n\r\n")
        assert ws.response.startswith(b"HTTP/1.1 101"), ws.response
        return ws

    def send(self, msg: dict[str, Any]) -> None:
        payload = msgpack.packb(msg)
        assert len(payload) < 126
        self.writer.write(bytes([0x82, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)

    async def frame(self) -> tuple[bool, bytes]:
        """(compressed, payload as sent) of the next data frame."""
        async with asyncio.timeout(T):
            while True:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(await self.reader.readexactly(2))
                elif n == 127:
                    n = int.from_bytes(await self.reader.readexactly(8))
                payload = await self.reader.readexactly(n)
                if b0 & 0x0F in (1, 2):
                    return bool(b0 & 0x40), payload

    async def reply(self, want_id: int) -> tuple[bool, dict[str, Any]]:
        while True:
            compressed, payload = await self.frame()
            data = _inflate(payload) if compressed else payload
            msg = msgpack.unpackb(data)
            if msg.get("id") == want_id:
                return compressed, msg

    def close(self) -> None:
        self.writer.close()


def _inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


@pytest.fixture
async def raw(hub):
    opened: list[RawWs] = []

    async def make(user: str, extensions: str | None) -> RawWs:
        ws = await RawWs.open(hub.port, user, extensions)
        opened.append(ws)
        return ws

    yield make
    for ws in opened:
        ws.close()


async def test_large_frames_are_compressed_when_offered(hub, raw):
    for user in ("alice", "bob"):
        for _ in range(6):
            await topup(hub, user, 5)
    plain = await raw("alice", None)
    deflate = await raw("bob", "permessage-deflate; client_max_window_bits")
    head = deflate.response.decode().lower()
    assert "permessage-deflate" in head and "server_no_context_takeover" in head
    assert f"server_max_window_bits={DEFLATE_BITS}" in head
    assert "permessage-deflate" not in plain.response.decode().lower()

    for ws in (plain, deflate):
        ws.send({"op": "history", "id": 7})
    (was_plain, a), (was_deflated, b) = await plain.reply(7), await deflate.reply(7)
    assert not was_plain and was_deflated
    assert len(a["ok"]["entries"]) == len(b["ok"]["entries"]) == 6


async def test_a_window_smaller_than_the_hubs_gets_plain_frames(raw):
    ws = await raw("carol", "permessage-deflate; server_max_window_bits=9")
    ws.send({"op": "catalog", "id": 1})
    compressed, msg = await ws.reply(1)
    assert not compressed and msg["ok"]["gifts"]


async def test_room_frames_are_the_same_bytes_for_every_member(hub, raw, connect):
    creator = await connect(hub, "dave")
    await creator.request("go_live", title=BIG)
    members = [await raw(f"v{i}", "permessage-deflate") for i in range(3)]
    for i, ws in enumerate(members):
        ws.send({"op": "join", "id": 100 + i, "room": "dave"})
        await ws.reply(100 + i)
    await topup(hub, "erin", 1000)
    erin = await connect(hub, "erin")
    await erin.request("join", room="dave")
    for k in range(20):  # a burst: gathered into batch frames, large enough to compress
        await erin.request("gift", room="dave", gift="rose", key=f"k{k}")
    seen: list[list[bytes]] = []
    for ws in members:
        frames: list[bytes] = []
        bubbles = 0
        while bubbles < 20:
            compressed, payload = await ws.frame()
            msg = msgpack.unpackb(_inflate(payload) if compressed else payload)
            events = msg["events"] if msg.get("ev") == "batch" else [msg]
            bubbles += sum(1 for e in events if e.get("ev") == "bubble")
            if compressed:
                frames.append(payload)
        seen.append(frames)
    assert seen[0], "no room frame was compressed"
    assert seen[0] == seen[1] == seen[2]
