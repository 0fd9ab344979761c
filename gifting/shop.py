"""Effects and shops on the wire: the ops ``effects``, ``effect``, ``product_put``,
``products``, ``pin``, ``buy``, ``orders`` and ``refund``.

Field checks run here, in the contract's order, before the store is called;
every coin move is one script in ``gifting/ledger/`` (``ledger.shop``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gifting.rooms import Conn

if TYPE_CHECKING:
    from gifting.hub import Hub

__all__ = ["Shop"]

Result = dict[str, Any]
Handler = Callable[[Conn, dict[str, Any]], Awaitable[Result]]


class Shop:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.ops: dict[str, Handler] = {}

    async def pinned(self, room: str) -> dict[str, Any] | None:
        """The product pinned in ``room`` (for ``join``), or None."""
        return None
