"""Effects and shops on the wire: the ops ``effects``, ``effect``, ``product_put``,
``products``, ``pin``, ``buy``, ``orders`` and ``refund``.

Field checks run here, in the contract's order, before the store is called;
every coin move is one script in ``gifting/ledger/`` (``ledger.shop``), which
runs the checks that need the store, in their place in the same order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gifting.rooms import Conn
from protocol import errors
from protocol.messages import (
    MAX_COUNT,
    FieldError,
    opt_int,
    req_id_str,
    req_key,
    valid_id,
    valid_text,
)

if TYPE_CHECKING:
    from gifting.hub import Hub

__all__ = ["Shop"]

Result = dict[str, Any]
Handler = Callable[[Conn, dict[str, Any]], Awaitable[Result]]

MAX_NAME = 80
MAX_PRICE = 10**9
MAX_STOCK = 10**9
MAX_IMAGE = 512
# Order ids are store integers: anything past this is no order (and not an id).
_MAX_ORDER = 2**63 - 1


def _int(args: dict[str, Any], name: str, lo: int, hi: int) -> int:
    """A required integer field in ``lo..hi`` (bool is not an integer here)."""
    value = args.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise FieldError(f"{name!r} must be an integer from {lo} to {hi}")
    return value


def _name(args: dict[str, Any]) -> str:
    value = args.get("name")
    if not isinstance(value, str) or not valid_text(value) or not 1 <= len(value) <= MAX_NAME:
        raise FieldError(f"'name' must be a string of 1-{MAX_NAME} characters")
    return value


def _image(args: dict[str, Any]) -> str | None:
    """An optional ``https:`` URL. Anything else (``javascript:``, ``http:``, a
    data URL) is refused: the pages put it in an ``<img src>`` for every viewer."""
    value = args.get("image")
    if value is None:
        return None
    if (
        type(value) is not str
        or not 0 < len(value) <= MAX_IMAGE
        or not value.isascii()
        or not value.isprintable()
        or any(c.isspace() for c in value)
    ):
        raise FieldError(f"'image' must be an https: URL of at most {MAX_IMAGE} characters")
    try:
        url = urlsplit(value)
    except ValueError:
        url = None
    if url is None or url.scheme != "https" or not url.hostname:
        raise FieldError(f"'image' must be an https: URL of at most {MAX_IMAGE} characters")
    return value


def _limit(args: dict[str, Any], default: int) -> int:
    n = opt_int(args, "limit", default)
    if not 1 <= n <= 500:
        raise FieldError("'limit' must be 1-500")
    return n


class Shop:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.ledger = hub.ledger.shop
        effects = hub.config.effects
        self.effects = [{"id": e.id, "name": e.name, "coins": e.coins} for e in effects]
        self.effect_prices = {e.id: e.coins for e in effects}
        self.ops: dict[str, Handler] = {
            "effects": self.op_effects,
            "effect": self.op_effect,
            "product_put": self.op_product_put,
            "products": self.op_products,
            "pin": self.op_pin,
            "buy": self.op_buy,
            "orders": self.op_orders,
            "refund": self.op_refund,
        }

    def _cap(self, conn: Conn) -> int:
        """The daily spend cap shared with gifts (see ``Hub._gift_checks``)."""
        claims, config = conn.claims, self.hub.config
        assert claims is not None
        return config.minor_daily_spend_cap if claims.minor else config.daily_spend_cap

    async def pinned(self, room: str) -> dict[str, Any] | None:
        """The product pinned in ``room`` (for ``join``), or None."""
        product = await self.ledger.pinned(room)
        return None if product is None else product.wire()

    # -- effects -------------------------------------------------------------

    async def op_effects(self, conn: Conn, args: dict[str, Any]) -> Result:
        return {"effects": self.effects}

    async def op_effect(self, conn: Conn, args: dict[str, Any]) -> Result:
        # Taken first, as for a gift: every attempt counts against the bucket.
        limited = self.hub.money_limited(conn)
        # Checks in the contract's order: bad_request, unknown_item, not_in_room;
        # the store answers not_live, rate_limited, conflict, insufficient_funds.
        room = req_id_str(args, "room")
        effect = args.get("effect")
        if type(effect) is not str or not 0 < len(effect) <= 64:
            raise FieldError("'effect' must be an effect id")
        key = req_key(args)
        if effect not in self.effect_prices:
            raise errors.UnknownItem(f"no such effect: {effect!r}")
        if room not in conn.rooms:
            raise errors.NotInRoom(f"join {room!r} first")
        if not self.hub.rooms.bus.connected.is_set():
            # The effect would play for no one on this hub: let the client retry.
            raise errors.Unavailable("reconnecting to the store; retry with the same key")
        claims = conn.claims
        assert claims is not None
        res = await self.ledger.effect(
            user=claims.user,
            room=room,
            effect=effect,
            key=key,
            name=claims.name,
            avatar=claims.avatar,
            limited=limited,
            conn=conn.id,
            cap=self._cap(conn),
        )
        return {"transfer": res.transfer, "coins": res.coins, "duplicate": res.duplicate}

    # -- shop ----------------------------------------------------------------

    async def op_product_put(self, conn: Conn, args: dict[str, Any]) -> Result:
        product = req_id_str(args, "product")
        name = _name(args)
        coins = _int(args, "coins", 1, MAX_PRICE)
        stock = _int(args, "stock", 0, MAX_STOCK)
        image = _image(args)
        p = await self.ledger.product_put(
            shop=conn.user, product=product, name=name, coins=coins, stock=stock, image=image
        )
        return {"product": p.wire()}

    async def op_products(self, conn: Conn, args: dict[str, Any]) -> Result:
        shop = req_id_str(args, "shop")
        return {"products": [p.wire() for p in await self.ledger.products(shop)]}

    async def op_pin(self, conn: Conn, args: dict[str, Any]) -> Result:
        # ``product`` must be present; null (None) is how a client unpins.
        if "product" not in args:
            raise FieldError("'product' is required: a product id, or null to unpin")
        product = args["product"]
        if product is not None and not valid_id(product):
            raise FieldError("'product' must be a product id or null")
        # The room is the caller's own; the store answers not_live, then unknown_item.
        await self.ledger.pin(conn.user, product)
        return {"room": conn.user}

    async def op_buy(self, conn: Conn, args: dict[str, Any]) -> Result:
        limited = self.hub.money_limited(conn)
        # Checks in the contract's order: bad_request, invalid_count here; the
        # store answers unknown_item, forbidden, rate_limited, conflict,
        # price_changed, sold_out, insufficient_funds.
        shop = req_id_str(args, "shop")
        product = req_id_str(args, "product")
        coins = _int(args, "coins", 1, MAX_PRICE)
        key = req_key(args)
        count = opt_int(args, "count", 1)
        if not 1 <= count <= MAX_COUNT:
            raise errors.InvalidCount(f"count must be 1-{MAX_COUNT}, got {count}")
        claims = conn.claims
        assert claims is not None
        res = await self.ledger.buy(
            buyer=claims.user,
            shop=shop,
            product=product,
            count=count,
            coins=coins,
            key=key,
            name=claims.name,
            avatar=claims.avatar,
            share=self.hub.config.seller_share_pct,
            limited=limited,
            conn=conn.id,
            cap=self._cap(conn),
        )
        return {
            "order": res.order,
            "coins": res.coins,
            "stock": res.stock,
            "duplicate": res.duplicate,
        }

    async def op_orders(self, conn: Conn, args: dict[str, Any]) -> Result:
        role = args.get("role")
        if role not in ("buyer", "seller"):
            raise FieldError("'role' must be 'buyer' or 'seller'")
        before = args.get("before")
        if before is not None and (type(before) is not int or not 1 <= before <= _MAX_ORDER):
            raise FieldError("'before' must be an order id")
        limit = _limit(args, 50)
        entries = await self.ledger.orders(conn.user, str(role), before, limit)
        return {"entries": [o.wire() for o in entries]}

    async def op_refund(self, conn: Conn, args: dict[str, Any]) -> Result:
        # Checks: bad_request here; the store answers unknown_item, forbidden
        # (not the shop's owner), conflict/duplicate, conflict (already
        # refunded), insufficient_funds.
        order = _int(args, "order", 1, _MAX_ORDER)
        key = req_key(args)
        res = await self.ledger.refund(user=conn.user, order=order, key=key, conn=conn.id)
        return {
            "order": res.order,
            "status": "refunded",
            "coins": res.coins,
            "duplicate": res.duplicate,
        }
