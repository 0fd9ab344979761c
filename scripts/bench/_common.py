"""Shared pieces of the benchmarks: a private store, a hub subprocess, raw
WebSocket clients cheap enough that the client is not what is measured, and
the JSON result file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gifting import auth  # noqa: E402
from gifting.store import EmbeddedStore  # noqa: E402

SECRET = b"bench-secret-0123456789abcdef0123456789"
RESULTS = ROOT / "scripts" / "bench" / "results"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def token(user: str) -> str:
    return auth.mint(SECRET, user, name=user.title())


@contextlib.contextmanager
def store(tmp: Path, fsync: str = "always") -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp / "store", fsync=fsync)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def hub_process(redis_url: str, *extra: str, prefix: str = "bench") -> Iterator[tuple[int, int]]:
    """Run `gifting serve` against a store; yields (port, pid)."""
    env = {**os.environ, "GIFTING_SECRET": SECRET.decode()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gifting",
            "serve",
            "--port",
            "0",
            "--no-demo",
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            "--log-level",
            "WARNING",
            *extra,
        ],
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        preexec_fn=raise_nofile,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "serving http://" not in line:
        proc.kill()
        raise RuntimeError(f"hub did not start: {line!r}")
    port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    try:
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def handshake_request(path: str, host: str = "127.0.0.1") -> bytes:
    """The client's WebSocket upgrade request for ``path``, with a fresh key."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: gifting.v1\r\n\r\n"
    ).encode()


def split_handshake(buf: bytes) -> tuple[bytes | None, bytes]:
    """(head, rest) once the server's answer head (up to the blank line) is
    whole in ``buf``; (None, buf) until then."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None, buf
    return buf[:end], buf[end + 4 :]


def split_frames(buf: bytes, on_frame: Callable[[int, bytes], object]) -> bytes:
    """Call ``on_frame(opcode, payload)`` for each whole (unmasked) frame in
    ``buf``, in order; returns the incomplete rest."""
    pos, n = 0, len(buf)
    while n - pos >= 2:
        ln, hdr = buf[pos + 1] & 0x7F, 2
        if ln == 126:
            if n - pos < 4:
                break
            ln, hdr = struct.unpack_from("!H", buf, pos + 2)[0], 4
        elif ln == 127:
            if n - pos < 10:
                break
            ln, hdr = struct.unpack_from("!Q", buf, pos + 2)[0], 10
        if n - pos < hdr + ln:
            break
        start = pos + hdr
        pos = start + ln
        on_frame(buf[start - hdr] & 0x0F, buf[start:pos])
    return buf[pos:]


class RawClient(asyncio.Protocol):
    """A WebSocket client that does the handshake by hand and only counts:
    frames, and events inside them when ``decode`` is set. Subclasses change
    what a frame does by overriding ``frame_received``."""

    def __init__(self, path: str, decode: Callable[[bytes], int] | None = None) -> None:
        self.path = path
        self.decode = decode
        self.buf = b""
        self.open = asyncio.get_running_loop().create_future()
        self.frames = 0
        self.events = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not
        # asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(handshake_request(self.path))

    def upgraded(self) -> bool:
        """Take the server's answer off ``buf`` once it is whole. True when it
        was a 101 (``open`` is then resolved); False while it is incomplete, and
        when it was a refusal (handed to ``refused``)."""
        head, self.buf = split_handshake(self.buf)
        if head is None:
            return False
        if not head.startswith(b"HTTP/1.1 101"):
            self.refused(ConnectionError(head[:60].decode(errors="replace")))
            return False
        self.open.set_result(None)
        return True

    def refused(self, exc: Exception) -> None:
        self.open.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open.done() and not self.upgraded():
            return
        self.buf = split_frames(self.buf, self.frame_received)

    def frame_received(self, opcode: int, payload: bytes) -> None:
        if opcode in (1, 2):
            self.frames += 1
            if self.decode is not None:
                self.events += self.decode(payload)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        head = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0xFE]) + struct.pack("!H", n)
        self.transport.write(head + mask + masked)


async def open_raw(port: int, path: str, decode: Callable[[bytes], int] | None = None) -> RawClient:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: RawClient(path, decode), "127.0.0.1", port)
    await asyncio.wait_for(proto.open, 30)
    return proto


def write_result(name: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Print a table and write ``results/<name>.json``: each row has value, baseline, ratio."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **meta,
        "results": rows,
    }
    out.write_text(json.dumps(doc, indent=2))
    w = max(len(r["metric"]) for r in rows)
    print(f"\n{'metric'.ljust(w)}  {'value':>12}  {'baseline':>12}  {'ratio':>7}  unit")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:12.1f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:7.2f}"
        print(f"{r['metric'].ljust(w)}  {r['value']:12.1f}  {base:>12}  {ratio:>7}  {r['unit']}")
    print(f"\nwrote {out}")
    return out


def row(
    metric: str, value: float, baseline: float | None, unit: str, **extra: Any
) -> dict[str, Any]:
    ratio = None if not baseline else value / baseline
    return {
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "ratio": ratio,
        "unit": unit,
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
