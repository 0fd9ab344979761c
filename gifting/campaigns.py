"""Brand campaigns on the wire: the ops ``campaign_create``, ``campaign_join``,
``campaigns`` and ``campaign_close``, and the sweeper that closes expired ones.

Rewards are paid inside the gift's own script (``gift.lua``); the sweeper
returns an expired campaign's escrow exactly once however many hubs run it,
because closing is one script that does nothing to a closed campaign.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gifting.rooms import Conn

if TYPE_CHECKING:
    from gifting.hub import Hub

__all__ = ["Campaigns"]

Result = dict[str, Any]
Handler = Callable[[Conn, dict[str, Any]], Awaitable[Result]]


class Campaigns:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.ops: dict[str, Handler] = {}

    async def sweeper(self) -> None:
        """Close campaigns whose ``ends`` has passed, every ``config.campaign_sweep`` s."""
        return
