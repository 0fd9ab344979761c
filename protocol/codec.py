"""Bytes/str <-> messages, in MessagePack (binary frames) or JSON (text frames).

Pure functions, no I/O. ``decode_command`` is the one gate every client frame
passes through on the hub: it either returns a ``Command`` or raises, and what
it raises decides the answer:

- ``MalformedCommand`` carries the frame's integer ``id``: answered
  ``bad_request`` with that id;
- ``UndecodableFrame``: no usable id, answered with an ``error`` event.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack

from protocol.messages import Command

__all__ = [
    "MalformedCommand",
    "UndecodableFrame",
    "decode",
    "decode_command",
    "encode",
    "encode_json",
    "encode_msgpack",
]

# A frame is at most 16 KiB, so these bound what a hostile one can make us build.
_MAX_DEPTH = 32
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


class UndecodableFrame(ValueError):
    """Not a map with an integer ``id``: the hub answers with an error event."""


class MalformedCommand(ValueError):
    """A map with an integer ``id`` that is not a valid command."""

    def __init__(self, id: int, message: str) -> None:
        super().__init__(message)
        self.id = id


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise ValueError("map keys must be strings")
            _check_depth(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_depth(v, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinities are not allowed")


def decode(frame: bytes | str, *, strict: bool = True) -> Any:
    """Decode one frame: text frames are JSON, binary frames MessagePack.

    Raises ``UndecodableFrame`` for anything that is not a well-formed value.
    ``strict`` (what a server needs from clients) also walks the value to refuse
    deep nesting, non-string map keys and NaN; a client reading its server's
    frames skips that walk, which costs more than the decoding itself.
    """
    try:
        if isinstance(frame, str):
            value = json.loads(frame, parse_constant=_reject_constant)
        else:
            value = msgpack.unpackb(
                frame, raw=False, strict_map_key=True, use_list=True, timestamp=0
            )
        if strict:
            _check_depth(value)
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData) as exc:
        raise UndecodableFrame(f"cannot decode frame: {exc}") from None
    except Exception as exc:  # msgpack raises a few private classes
        raise UndecodableFrame(f"cannot decode frame: {type(exc).__name__}") from None
    return value


def decode_command(frame: bytes | str) -> Command:
    """Decode a client frame into a ``Command`` (op and id checked, args not)."""
    value = decode(frame)
    if not isinstance(value, dict):
        raise UndecodableFrame("a command must be a map")
    id_ = value.get("id")
    if type(id_) is not int or not _INT64_MIN <= id_ <= _UINT64_MAX:
        raise UndecodableFrame("a command needs an integer 'id'")
    if not 1 <= id_ < 2**31:
        raise MalformedCommand(id_, "'id' must be 1 <= id < 2^31")
    op = value.get("op")
    if type(op) is not str:
        raise MalformedCommand(id_, "a command needs a string 'op'")
    args = {k: v for k, v in value.items() if k not in ("op", "id")}
    return Command(op=op, id=id_, args=args)


def encode_msgpack(message: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(message, use_bin_type=True)
    return data


def encode_json(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(message: dict[str, Any], *, json: bool) -> bytes | str:
    """Encode one message for a connection: text (JSON) or binary (MessagePack)."""
    return encode_json(message) if json else encode_msgpack(message)
