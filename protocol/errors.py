"""One exception class per wire error code.

The hub raises these and turns them into ``{"id", "error": {"code", "message"}}``;
the client raises the same classes when it reads such a reply, so server and
client code catch the same names.
"""

from __future__ import annotations

from typing import ClassVar

from protocol.messages import ErrorCode

__all__ = [
    "BadRequest",
    "Closed",
    "Conflict",
    "Forbidden",
    "GiftingError",
    "InsufficientFunds",
    "Internal",
    "InvalidCount",
    "NotInRoom",
    "NotLive",
    "PriceChanged",
    "RateLimited",
    "SelfGift",
    "SoldOut",
    "Unauthenticated",
    "Unavailable",
    "UnknownGift",
    "UnknownItem",
    "UnknownOp",
    "UnknownRoom",
    "error_for_code",
    "SpendLimit",
]


class GiftingError(Exception):
    """An error with a wire code. ``str(exc)`` is the human message."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.value.replace("_", " "))

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(GiftingError):
    code = ErrorCode.BAD_REQUEST


class Unauthenticated(GiftingError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(GiftingError):
    code = ErrorCode.FORBIDDEN


class UnknownOp(GiftingError):
    code = ErrorCode.UNKNOWN_OP


class UnknownRoom(GiftingError):
    code = ErrorCode.UNKNOWN_ROOM


class NotInRoom(GiftingError):
    code = ErrorCode.NOT_IN_ROOM


class NotLive(GiftingError):
    code = ErrorCode.NOT_LIVE


class UnknownGift(GiftingError):
    code = ErrorCode.UNKNOWN_GIFT


class InvalidCount(GiftingError):
    code = ErrorCode.INVALID_COUNT


class InsufficientFunds(GiftingError):
    code = ErrorCode.INSUFFICIENT_FUNDS


class SelfGift(GiftingError):
    code = ErrorCode.SELF_GIFT


class Conflict(GiftingError):
    code = ErrorCode.CONFLICT


class RateLimited(GiftingError):
    code = ErrorCode.RATE_LIMITED


class Unavailable(GiftingError):
    code = ErrorCode.UNAVAILABLE


class Internal(GiftingError):
    code = ErrorCode.INTERNAL


class UnknownItem(GiftingError):
    code = ErrorCode.UNKNOWN_ITEM


class SoldOut(GiftingError):
    code = ErrorCode.SOLD_OUT


class PriceChanged(GiftingError):
    code = ErrorCode.PRICE_CHANGED


class Closed(GiftingError):
    code = ErrorCode.CLOSED


class SpendLimit(GiftingError):
    """The sender's daily spend cap (e.g. a minor's account) would be exceeded."""

    code = ErrorCode.SPEND_LIMIT


_BY_CODE: dict[ErrorCode, type[GiftingError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthenticated,
        Forbidden,
        UnknownOp,
        UnknownRoom,
        NotInRoom,
        NotLive,
        UnknownGift,
        InvalidCount,
        InsufficientFunds,
        SelfGift,
        Conflict,
        RateLimited,
        Unavailable,
        Internal,
        UnknownItem,
        SoldOut,
        PriceChanged,
        Closed,
        SpendLimit,
    )
}


def error_for_code(code: str, message: str = "") -> GiftingError:
    """The exception for a wire code; unknown codes become ``Internal``."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return Internal(f"{code}: {message}")
    return cls(message)
