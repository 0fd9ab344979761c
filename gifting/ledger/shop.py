"""Effects and shops: the store-side calls (``effect.lua``, ``buy.lua``, ...).

Built by ``Ledger`` (``ledger.shop``); see the key layout at the top of this package.
Every coin move here is one script; the reads (``products``, ``orders``,
``pinned``) are plain pipelined commands, since they change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gifting.ledger.ledger import AuditReport, Ledger

__all__ = [
    "BuyResult",
    "EffectResult",
    "Order",
    "Product",
    "RefundResult",
    "ShopLedger",
]


@dataclass(frozen=True, slots=True)
class EffectResult:
    transfer: int
    coins: int  # the payer's balance after
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    name: str
    coins: int
    stock: int
    image: str | None

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "coins": self.coins,
            "stock": self.stock,
            "image": self.image,
        }


@dataclass(frozen=True, slots=True)
class BuyResult:
    order: int
    coins: int  # the buyer's balance after
    stock: int  # units left
    duplicate: bool


@dataclass(frozen=True, slots=True)
class RefundResult:
    order: int
    coins: int  # the seller's balance after
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Order:
    order: int
    shop: str
    buyer: str
    buyer_name: str
    product: str
    count: int
    coins: int  # the total paid
    status: str
    time: int

    def wire(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "shop": self.shop,
            "buyer": {"user": self.buyer, "name": self.buyer_name},
            "product": self.product,
            "count": self.count,
            "coins": self.coins,
            "status": self.status,
            "time": self.time,
        }


def _s(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "replace")


def _product(pid: str, row: list[bytes | None]) -> Product | None:
    """A product from ``HMGET name coins stock image`` (None when it does not exist)."""
    name, coins, stock, image = row
    if name is None:
        return None
    return Product(pid, _s(name), int(coins or 0), int(stock or 0), _s(image) or None)


_PRODUCT_FIELDS = ("name", "coins", "stock", "image")
_ORDER_FIELDS = ("shop", "buyer", "buyer_name", "product", "count", "coins", "status", "time")


class ShopLedger:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._effect = ledger.script("effect.lua")
        self._product_put = ledger.script("product_put.lua")
        self._pin = ledger.script("pin.lua")
        self._buy = ledger.script("buy.lua")
        self._refund = ledger.script("refund.lua")

    def audit_check(self) -> _ShopAudit:
        return _ShopAudit(self.ledger)

    # -- coin moves ----------------------------------------------------------

    async def effect(
        self,
        *,
        user: str,
        room: str,
        effect: str,
        key: str,
        name: str,
        avatar: str | None,
        limited: bool = False,
        conn: str = "",
        cap: int = 0,
    ) -> EffectResult:
        lg = self.ledger
        args: list[str | int] = [
            user,
            room,
            effect,
            key,
            name,
            avatar or "",
            1 if limited else 0,
            conn,
            lg.idem_ttl,
            cap,
        ]

        res = await lg.move("effect", self._effect, args)
        return EffectResult(int(res[0]), int(res[1]), bool(res[2]))

    async def buy(
        self,
        *,
        buyer: str,
        shop: str,
        product: str,
        count: int,
        coins: int,
        key: str,
        name: str,
        avatar: str | None,
        share: int,
        limited: bool = False,
        conn: str = "",
        cap: int = 0,
    ) -> BuyResult:
        lg = self.ledger
        args: list[str | int] = [
            buyer,
            shop,
            product,
            count,
            coins,
            key,
            name,
            avatar or "",
            share,
            1 if limited else 0,
            conn,
            lg.idem_ttl,
            cap,
        ]

        res = await lg.move("buy", self._buy, args)
        return BuyResult(int(res[0]), int(res[1]), int(res[2]), bool(res[3]))

    async def refund(self, *, user: str, order: int, key: str, conn: str = "") -> RefundResult:
        lg = self.ledger

        res = await lg.move("refund", self._refund, [user, order, key, conn, lg.idem_ttl])
        return RefundResult(int(res[0]), int(res[1]), bool(res[2]))

    # -- products ------------------------------------------------------------

    async def product_put(
        self, *, shop: str, product: str, name: str, coins: int, stock: int, image: str | None
    ) -> Product:
        lg = self.ledger
        args: list[str | int] = [shop, product, name, coins, stock, image or ""]

        async def go() -> Any:
            return await self._product_put(keys=[lg.bal], args=args)

        await lg.call("product_put", go)
        return Product(product, name, coins, stock, image or None)

    async def products(self, shop: str) -> list[Product]:
        """A shop's products, in the order they were first put."""
        lg = self.ledger

        async def go() -> Any:
            ids: Any = await lg.r.zrange(lg.key("shop", shop), 0, -1)
            if not ids:
                return [], []
            async with lg.r.pipeline(transaction=False) as p:
                for pid in ids:
                    p.hmget(lg.key("prod", shop, pid.decode()), _PRODUCT_FIELDS)
                return ids, await p.execute()

        ids, rows = await lg.call("products", go)
        found = (_product(pid.decode(), row) for pid, row in zip(ids, rows, strict=True))
        return [p for p in found if p is not None]

    async def pin(self, room: str, product: str | None) -> int:
        """Pin ``product`` (None: unpin) in ``room``; returns the room's session."""
        lg = self.ledger

        async def go() -> Any:
            return await self._pin(keys=[lg.bal], args=[room, product or ""])

        res = await lg.call("pin", go)
        return int(res[0])

    async def pinned(self, room: str) -> Product | None:
        """The product pinned in ``room`` during its current live session, if any."""
        lg = self.ledger

        async def go() -> Any:
            state: Any = await lg.r.hmget(
                lg.key("room", room), ["live", "session", "pinned", "pinsess"]
            )
            live, session, pid, pinsess = state
            if live != b"1" or pid is None or pinsess != session:
                return None
            row: Any = await lg.r.hmget(lg.key("prod", room, pid.decode()), _PRODUCT_FIELDS)
            return _product(pid.decode(), row)

        result: Product | None = await lg.call("pinned", go)
        return result

    # -- orders --------------------------------------------------------------

    async def orders(self, user: str, role: str, before: int | None, limit: int) -> list[Order]:
        """``user``'s orders as ``role`` (buyer or seller), newest first."""
        lg = self.ledger
        hi = "+inf" if before is None else f"({before}"

        async def go() -> Any:
            ids: Any = await lg.r.zrevrangebyscore(
                lg.key("orders", role, user), hi, "-inf", start=0, num=limit
            )
            if not ids:
                return [], []
            async with lg.r.pipeline(transaction=False) as p:
                for oid in ids:
                    p.hmget(lg.key("order", oid.decode()), _ORDER_FIELDS)
                return ids, await p.execute()

        ids, rows = await lg.call("orders", go)
        out = []
        for oid, row in zip(ids, rows, strict=True):
            shop, buyer, buyer_name, product, count, coins, status, time = row
            if shop is None:
                continue
            out.append(
                Order(
                    order=int(oid),
                    shop=_s(shop),
                    buyer=_s(buyer),
                    buyer_name=_s(buyer_name),
                    product=_s(product),
                    count=int(count or 0),
                    coins=int(coins or 0),
                    status=_s(status),
                    time=int(time or 0),
                )
            )
        return out


class _ShopAudit:
    """Orders and stock, replayed from the journal.

    Orders: a purchase makes its order ``paid``, a refund ``refunded``; a refund
    of an order never purchased, or refunded before, is a difference, and so is
    a refund whose postings do not mirror the purchase's. Stock: a ``stock``
    record sets a product's stock, a purchase takes ``count`` from it, a refund
    puts it back. Then every stored order's status and every stored product's
    stock must be what the replay says.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.orders: dict[int, str] = {}
        self.paid: dict[int, dict[str, int]] = {}  # order -> its purchase's postings
        self.stock: dict[tuple[str, str], int] = {}

    def entry(
        self,
        t: int,
        kind: str,
        fields: dict[bytes, bytes],
        postings: dict[str, int],
        report: AuditReport,
    ) -> None:
        if kind not in ("stock", "purchase", "refund"):
            return
        item = (_s(fields.get(b"shop")), _s(fields.get(b"product")))
        if kind == "stock":
            self.stock[item] = int(fields.get(b"stock", b"0"))
            return
        order = int(fields.get(b"order", b"0"))
        count = int(fields.get(b"count", b"0"))
        if kind == "purchase":
            if order in self.orders:
                report.differences.append(f"order {order} purchased twice (transfer {t})")
            self.orders[order] = "paid"
            self.paid[order] = postings
            if item not in self.stock:
                report.differences.append(
                    f"order {order}: purchase of {item[0]}/{item[1]}, which was never put"
                )
                self.stock[item] = 0
            self.stock[item] -= count
            if self.stock[item] < 0:
                report.differences.append(
                    f"order {order}: stock of {item[0]}/{item[1]} below zero ({self.stock[item]})"
                )
            return
        # refund
        status = self.orders.get(order)
        if status is None:
            report.differences.append(f"refund {t} of order {order}, which was never purchased")
        elif status == "refunded":
            report.differences.append(f"order {order} refunded twice (again by transfer {t})")
        elif self.paid.get(order) != {a: -d for a, d in postings.items()}:
            report.differences.append(f"refund {t} does not mirror order {order}'s purchase")
        self.orders[order] = "refunded"
        self.stock[item] = self.stock.get(item, 0) + count

    async def finish(self, balances: dict[str, int], report: AuditReport) -> None:
        lg = self.ledger
        r = lg.r
        # Products: every product stored was put (journaled), and holds the replayed stock.
        stored: dict[tuple[str, str], int] = {}
        head = lg.key("prod", "")
        keys = [k async for k in lg.scan(head + "*")]
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            async with r.pipeline(transaction=False) as p:
                for k in chunk:
                    p.hget(k, "stock")
                values = await p.execute()
            for k, v in zip(chunk, values, strict=True):
                shop, _, product = k.decode()[len(head) :].partition(":")
                stored[(shop, product)] = int(v or 0)
        for item in sorted(set(stored) | set(self.stock)):
            name = f"{item[0]}/{item[1]}"
            if item not in stored:
                report.differences.append(f"product {name}: in the journal, not in the store")
            elif item not in self.stock:
                report.differences.append(f"product {name}: in the store, never journaled")
            elif stored[item] != self.stock[item]:
                report.differences.append(
                    f"product {name}: stock {stored[item]}, journal says {self.stock[item]}"
                )
        # Orders: ids 1..last, each with the status the replay gives it.
        last = int(await r.get(lg.key("order")) or 0)
        for lo in range(1, last + 1, 1000):
            ids = range(lo, min(last, lo + 999) + 1)
            async with r.pipeline(transaction=False) as p:
                for oid in ids:
                    p.hget(lg.key("order", str(oid)), "status")
                statuses = await p.execute()
            for oid, raw in zip(ids, statuses, strict=True):
                have, want = (None if raw is None else _s(raw)), self.orders.get(oid)
                if have != want:
                    report.differences.append(f"order {oid}: status {have}, journal says {want}")
        for oid in sorted(o for o in self.orders if o > last):
            report.differences.append(f"order {oid}: in the journal, beyond the last order id")
