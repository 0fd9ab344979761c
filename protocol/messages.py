"""Messages of the wire protocol v1: error codes, limits and field validation.

Pure: no I/O and no asyncio, so the hub, the client and the tests share one
definition of what a well-formed command is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NOT_AUTHENTICATED",
    "CLOSE_RATE_LIMITED",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOO_BIG",
    "COMMANDS",
    "MAX_COUNT",
    "MAX_FRAME",
    "MAX_ID",
    "SUBPROTOCOL_JSON",
    "SUBPROTOCOL_MSGPACK",
    "Command",
    "FieldError",
    "ErrorCode",
    "opt_int",
    "opt_str",
    "req_id_str",
    "req_key",
    "valid_id",
    "valid_key",
    "valid_text",
]

SUBPROTOCOL_MSGPACK = "gifting.v1"
SUBPROTOCOL_JSON = "gifting.v1.json"

MAX_FRAME = 16 * 1024  # bytes a client frame may carry; more closes with 1009
MAX_ID = 2**31  # command ids are 1 <= id < MAX_ID
MAX_COUNT = 99

# Every op a hub answers (v1 core); the docs (docs/asyncapi.yaml) are checked against it.
COMMANDS = frozenset(
    {
        "auth",
        "catalog",
        "balance",
        "go_live",
        "end_live",
        "join",
        "leave",
        "gift",
        "feed",
        "history",
        "ping",
        # The coin economy: effects and shops (gifting/shop.py).
        "effects",
        "effect",
        "product_put",
        "products",
        "pin",
        "buy",
        "orders",
        "refund",
        # Brand campaigns (gifting/campaigns.py).
        "campaign_create",
        "campaign_join",
        "campaigns",
        "campaign_close",
    }
)

CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_NOT_AUTHENTICATED = 4001
CLOSE_RATE_LIMITED = 4008
CLOSE_SLOW_CONSUMER = 4009


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_ROOM = "unknown_room"
    NOT_IN_ROOM = "not_in_room"
    NOT_LIVE = "not_live"
    UNKNOWN_GIFT = "unknown_gift"
    INVALID_COUNT = "invalid_count"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    SELF_GIFT = "self_gift"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    UNKNOWN_ITEM = "unknown_item"
    SOLD_OUT = "sold_out"
    PRICE_CHANGED = "price_changed"
    CLOSED = "closed"
    SPEND_LIMIT = "spend_limit"


_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_RE = re.compile(r"[\x20-\x7e]{1,64}")


def valid_id(value: object) -> bool:
    """A user or room id: ``[A-Za-z0-9_-]{1,64}``."""
    return type(value) is str and _ID_RE.fullmatch(value) is not None


def valid_key(value: object) -> bool:
    """An idempotency key: 1-64 printable ASCII characters."""
    return type(value) is str and _KEY_RE.fullmatch(value) is not None


def valid_text(value: object) -> bool:
    """A string UTF-8 can carry. JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no frame (nor the store) can encode: kept, one would fail
    every later frame or store call that carries it."""
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded command: ``op``, ``id`` and the remaining fields, unvalidated."""

    op: str
    id: int
    args: dict[str, Any] = field(default_factory=dict)


class FieldError(ValueError):
    """A field is missing or malformed; the hub answers ``bad_request``."""


def req_id_str(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not valid_id(value):
        raise FieldError(f"{name!r} must be a string matching [A-Za-z0-9_-]{{1,64}}")
    assert isinstance(value, str)
    return value


def req_key(args: dict[str, Any], name: str = "key") -> str:
    value = args.get(name)
    if not valid_key(value):
        raise FieldError(f"{name!r} must be 1-64 printable ASCII characters")
    assert isinstance(value, str)
    return value


def opt_str(args: dict[str, Any], name: str, max_len: int, default: str = "") -> str:
    value = args.get(name)
    if value is None:
        return default
    if type(value) is not str or len(value) > max_len or not valid_text(value):
        raise FieldError(f"{name!r} must be a string of at most {max_len} characters")
    return value


def opt_int(args: dict[str, Any], name: str, default: int) -> int:
    """An optional integer field (bool is not an integer here)."""
    value = args.get(name)
    if value is None:
        return default
    if type(value) is not int:
        raise FieldError(f"{name!r} must be an integer")
    return value
