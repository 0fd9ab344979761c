"""A client that stops reading is evicted (4009) and the others keep flowing.

On loopback the kernel grows a stalled socket's buffers to megabytes, so the
stalled client here shrinks its receive buffer and segment size first; without
that the hub's queue would never fill and the test would prove nothing.
"""

import asyncio
import base64
import os
import socket
import struct

from tests.conftest import T, token, topup


def _stalled_socket(port: int, tok: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    s.settimeout(T)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: gifting.v1.json\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return s


def _send_frame(s: socket.socket, text: str) -> None:
    data = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert len(data) < 126
    s.sendall(bytes([0x81, 0x80 | len(data)]) + mask + masked)


def _read_close_code(s: socket.socket) -> tuple[int | None, list[str]]:
    return _read_frames(s, None)


def _read_frames(s: socket.socket, count: int | None) -> tuple[int | None, list[str]]:
    """Read ``count`` text frames, or else up to the close frame; return its code
    and the text frames seen. Reads one byte at a time when counting, so nothing
    after the last frame wanted is taken off the socket."""
    buf = b""
    texts: list[str] = []

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = s.recv(1 if count is not None else 65536)
            if not chunk:
                raise EOFError
            buf += chunk

    try:
        while True:
            need(2)
            op, ln = buf[0] & 0x0F, buf[1] & 0x7F
            hdr = 2
            if ln == 126:
                need(4)
                ln, hdr = struct.unpack("!H", buf[2:4])[0], 4
            elif ln == 127:
                need(10)
                ln, hdr = struct.unpack("!Q", buf[2:10])[0], 10
            need(hdr + ln)
            payload, buf = buf[hdr : hdr + ln], buf[hdr + ln :]
            if op == 1:
                texts.append(payload.decode())
                if count is not None and len(texts) == count:
                    return None, texts
            elif op == 8:
                return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None), texts
    except (EOFError, OSError):
        return None, texts


async def hot_room(start_hub, connect, send_queue: int):
    """A hub with ``send_queue`` bytes per connection, alice live, and bob (rate
    limits off, a long name for big bubbles) joined with coins to flood it."""
    hub = await start_hub(
        send_queue=send_queue,
        gift_rate=1e6,
        gift_burst=10**6,
        command_rate=1e6,
        command_burst=10**6,
    )
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    sender = await connect(hub, "bob", name="B" * 64)
    await topup(hub, "bob", 100_000)
    await sender.request("join", room="alice")
    return hub, sender


async def test_stalled_client_is_evicted_others_unharmed(start_hub, connect):
    hub, sender = await hot_room(start_hub, connect, 16 * 1024)
    healthy = await connect(hub, "carol")
    await healthy.request("join", room="alice")

    stalled = await asyncio.to_thread(_stalled_socket, hub.port, token("dave"))
    try:
        _send_frame(stalled, '{"op":"join","id":1,"room":"alice"}')
        # its last read: the join's answer, so the flood starts after the join
        _, texts = await asyncio.to_thread(_read_frames, stalled, 1)
        assert '"role":"viewer"' in texts[0]
        sent = 0
        async with asyncio.timeout(4 * T):
            while hub.metrics.evictions == 0 and sent < 20_000:
                await asyncio.gather(
                    *(
                        sender.request("gift", room="alice", gift="rose", key=f"k{sent + i}")
                        for i in range(20)
                    )
                )
                sent += 20
        assert hub.metrics.evictions == 1, f"no eviction after {sent} gifts"
        code, texts = await asyncio.to_thread(_read_close_code, stalled)
        assert code == 4009
        assert any('"ev":"bye"' in t and "4009" in t for t in texts)
    finally:
        stalled.close()
    # the healthy viewer got every bubble, in order
    async with asyncio.timeout(T):
        seqs = [(await healthy.next_event("bubble"))["seq"] for _ in range(sent)]
    assert seqs == list(range(1, sent + 1))
