"""Brand campaigns: the store-side calls (``campaign_*.lua``; rewards run inside ``gift.lua``).

Built by ``Ledger`` (``ledger.campaigns``); see the key layout at the top of this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gifting.ledger.ledger import AuditReport, Ledger

__all__ = ["CampaignLedger"]


class CampaignLedger:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def audit_check(self) -> _CampaignAudit:
        return _CampaignAudit()


class _CampaignAudit:
    """Escrow accounts and rewards, replayed from the journal."""

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
