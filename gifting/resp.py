"""The store's wire protocol (RESP2) on a bare asyncio stream.

The hub's two hot store paths use it instead of redis-py: the pub/sub bus and
the gift pipeline. Replies are parsed by hiredis (the ``fast`` extra) when it is
installed, else by the small parser here; error replies come back as
``ReplyError`` values, not exceptions, so a pipeline can map each one.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["ReplyError", "command", "open_node", "open_stream", "replies"]


class ReplyError(ConnectionError):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``, a script's own error)."""


def command(*parts: bytes | str | int) -> bytes:
    """One command, encoded: bytes as they are, str as UTF-8, int in decimal."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        if isinstance(p, str):
            p = p.encode()
        elif isinstance(p, int):
            p = b"%d" % p
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


async def open_stream(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a ``redis://``, ``valkey://`` or ``unix://`` URL and authenticate."""
    u = urlparse(url)
    username = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password else None
    if u.scheme == "unix":
        reader, writer = await asyncio.open_unix_connection(u.path, limit=2**20)
        return await _auth(reader, writer, username, password)
    return await open_node(u.hostname or "127.0.0.1", u.port or 6379, username, password)


async def open_node(
    host: str, port: int, username: str | None = None, password: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to one server over TCP and authenticate (a cluster node, say)."""
    reader, writer = await asyncio.open_connection(host, port, limit=2**20)
    return await _auth(reader, writer, username, password)


async def _auth(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    username: str | None,
    password: str | None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if password:
        args = [username, password] if username else [password]
        writer.write(command(b"AUTH", *args))
        line = await reader.readline()
        if not line.startswith(b"+"):
            writer.close()
            raise ConnectionError("store rejected the password")
    return reader, writer


def _hiredis() -> Any:
    """hiredis (the ``fast`` extra) parses replies in C; None when not installed."""
    try:
        return importlib.import_module("hiredis")
    except ImportError:
        return None


_HIREDIS = _hiredis()


async def _replies_hiredis(reader: asyncio.StreamReader, hiredis: Any) -> AsyncIterator[Any]:
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
            msg = ReplyError(str(msg))
        yield msg


async def _replies_python(reader: asyncio.StreamReader) -> AsyncIterator[Any]:
    while True:
        yield await _read_reply(reader)


def replies(reader: asyncio.StreamReader, *, use_hiredis: bool = True) -> AsyncIterator[Any]:
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
        return ReplyError(rest.decode("utf-8", "replace"))
    raise ConnectionError(f"unexpected reply from store: {line[:40]!r}")
