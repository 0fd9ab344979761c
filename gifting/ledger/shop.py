"""Effects and shops: the store-side calls (``effect.lua``, ``buy.lua``, ...).

Built by ``Ledger`` (``ledger.shop``); see the key layout at the top of this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gifting.ledger.ledger import AuditReport, Ledger

__all__ = ["ShopLedger"]


class ShopLedger:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def audit_check(self) -> _ShopAudit:
        return _ShopAudit()


class _ShopAudit:
    """Orders and stock, replayed from the journal."""

    def entry(
        self,
        t: int,
        kind: str,
        fields: dict[bytes, bytes],
        postings: dict[str, int],
        report: AuditReport,
    ) -> None:
        pass

    async def finish(self, balances: dict[str, int], report: AuditReport) -> None:
        pass
