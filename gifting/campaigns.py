"""Brand campaigns on the wire: the ops ``campaign_create``, ``campaign_join``,
``campaigns`` and ``campaign_close``, and the sweeper that closes expired ones.

Rewards are paid inside the gift's own script (``gift.lua``); the sweeper
returns an expired campaign's escrow exactly once however many hubs run it,
because closing is one script that does nothing to a closed campaign.

Field checks run here, before the store is called; checks that need the
store's clock or data (``ends`` in the future, the key, the balance) run in the
scripts, so a replay is answered as a replay even once ``ends`` has passed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gifting.ledger.campaigns import METRICS, Campaign, now_ms
from gifting.logs import event
from gifting.rooms import Conn
from protocol import errors
from protocol.messages import FieldError, req_id_str, req_key, valid_id, valid_text

if TYPE_CHECKING:
    from gifting.hub import Hub

__all__ = ["Campaigns"]

log = logging.getLogger("gifting.campaigns")

Result = dict[str, Any]
Handler = Callable[[Conn, dict[str, Any]], Awaitable[Result]]

MAX_TITLE = 80
MAX_BUDGET = 10**12
MAX_THRESHOLD = 10**9
MAX_CREATORS = 1000
# ``ends`` must fit a Lua number exactly; the script bounds it by store time.
_MAX_MS = 2**53
# Campaigns one ``campaigns`` answer lists per kind (own, joined, joinable).
_LIST = 200
# Expired campaigns one sweep closes (the next sweep takes the rest).
_SWEEP_BATCH = 100


def _req_int(args: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = args.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise FieldError(f"{name!r} must be an integer from {lo} to {hi}")
    return value


def _title(args: dict[str, Any]) -> str:
    value = args.get("title")
    if type(value) is not str or not 1 <= len(value) <= MAX_TITLE or not valid_text(value):
        raise FieldError(f"'title' must be a string of 1-{MAX_TITLE} characters")
    return value


def _creators(args: dict[str, Any]) -> list[str] | None:
    value = args.get("creators")
    if value is None:
        return None
    # An empty list would be a campaign no one may join, its budget locked
    # until ``ends``: refused rather than read as "anyone".
    if type(value) is not list or not 1 <= len(value) <= MAX_CREATORS:
        raise FieldError(f"'creators' must be a list of 1-{MAX_CREATORS} user ids")
    if not all(valid_id(v) for v in value):
        raise FieldError("'creators' must hold user ids matching [A-Za-z0-9_-]{1,64}")
    return list(value)


class Campaigns:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.ops: dict[str, Handler] = {
            "campaign_create": self.op_create,
            "campaign_join": self.op_join,
            "campaigns": self.op_campaigns,
            "campaign_close": self.op_close,
        }
        # Sweeps run so far (failed ones included), and a condition notified
        # after each: lets a caller (a test) wait for the next sweep.
        self.sweeps = 0
        self.swept = asyncio.Condition()

    async def _view(self, campaign: str, viewer: str) -> dict[str, Any]:
        found: Campaign | None = await self.hub.ledger.campaigns.get(campaign, viewer)
        if found is None:  # only if deleted behind our back
            raise errors.UnknownItem(f"no such campaign: {campaign}")
        return found.wire(now_ms())

    # -- ops -----------------------------------------------------------------

    async def op_create(self, conn: Conn, args: dict[str, Any]) -> Result:
        campaign = req_id_str(args, "campaign")
        title = _title(args)
        budget = _req_int(args, "budget", 1, MAX_BUDGET)
        reward = _req_int(args, "reward", 1, budget)
        metric = args.get("metric")
        if type(metric) is not str or metric not in METRICS:
            raise FieldError(f"'metric' must be one of {', '.join(sorted(METRICS))}")
        threshold = _req_int(args, "threshold", 1, MAX_THRESHOLD)
        ends = _req_int(args, "ends", 1, _MAX_MS)
        creators = _creators(args)
        key = req_key(args)
        claims = conn.claims
        assert claims is not None
        if not claims.brand:
            raise errors.Forbidden("only a brand can create campaigns")
        if self.hub.money_limited(conn):
            raise errors.RateLimited("too many coin moves, slow down")
        res = await self.hub.ledger.campaigns.create(
            brand=claims.user,
            brand_name=claims.name,
            key=key,
            campaign=campaign,
            title=title,
            budget=budget,
            reward=reward,
            metric=metric,
            threshold=threshold,
            ends=ends,
            creators=creators,
            conn=conn.id,
        )
        if not res.duplicate:
            event(
                log,
                logging.INFO,
                "campaign.created",
                conn=conn.id,
                user=claims.user,
                campaign=campaign,
                transfer=res.transfer,
                budget=budget,
            )
        return {"campaign": await self._view(campaign, claims.user), "duplicate": res.duplicate}

    async def op_join(self, conn: Conn, args: dict[str, Any]) -> Result:
        campaign = req_id_str(args, "campaign")
        claims = conn.claims
        assert claims is not None
        await self.hub.ledger.campaigns.join(
            user=claims.user,
            name=claims.name,
            campaign=campaign,
            limit=self.hub.config.max_open_campaigns,
        )
        return {"campaign": await self._view(campaign, claims.user)}

    async def op_campaigns(self, conn: Conn, args: dict[str, Any]) -> Result:
        claims = conn.claims
        assert claims is not None
        store = self.hub.ledger.campaigns
        now = now_ms()
        if claims.brand:
            own = await store.many(await store.brand_ids(claims.user, _LIST), claims.user)
            return {"campaigns": [c.wire(now) for c in own]}
        joined = await store.member_ids(claims.user, _LIST)
        seen = set(joined)
        joinable = [c for c in await store.open_ids(now, _LIST) if c not in seen]
        found = await store.many(joined + joinable, claims.user)
        listed = [
            c
            for c in found
            if c.id in seen or (c.allowed and c.status(now) == "open" and not c.joined)
        ]
        return {"campaigns": [c.wire(now) for c in listed]}

    async def op_close(self, conn: Conn, args: dict[str, Any]) -> Result:
        campaign = req_id_str(args, "campaign")
        res = await self.hub.ledger.campaigns.close(campaign, by=conn.user, conn=conn.id)
        event(
            log,
            logging.INFO,
            "campaign.closed",
            conn=conn.id,
            user=conn.user,
            campaign=campaign,
            refunded=res.refunded,
            transfer=res.transfer or None,
        )
        return {"campaign": await self._view(campaign, conn.user), "refunded": res.refunded}

    # -- sweeper -------------------------------------------------------------

    async def sweeper(self) -> None:
        """Close campaigns whose ``ends`` has passed, every ``config.campaign_sweep`` s.

        Any number of hubs may sweep one store: closing is one script that
        leaves a closed campaign alone, so the rest returns exactly once. A
        failed sweep (the store down) is logged and the next one tries again;
        nothing but cancellation ends this task.
        """
        config = self.hub.config
        while True:
            try:
                async with asyncio.timeout(2 * config.store_timeout):
                    await self.sweep()
            except Exception as exc:
                self.hub.metrics.store_errors["campaign_sweep"] += 1
                event(log, logging.WARNING, "campaigns.sweep_failed", error=str(exc)[:200])
            async with self.swept:
                self.sweeps += 1
                self.swept.notify_all()
            await asyncio.sleep(config.campaign_sweep)

    async def sweep(self) -> int:
        """One pass: close what has ended; returns how many this hub closed."""
        store = self.hub.ledger.campaigns
        closed = 0
        for campaign in await store.due(now_ms(), _SWEEP_BATCH):
            try:
                res = await store.close(campaign, expire=True)
            except errors.Unavailable:
                raise
            except errors.UnknownItem:
                # Listed as open with no campaign behind it: drop it from the
                # queue, or it would hold a place in every sweep for ever.
                await store.forget_open(campaign)
                continue
            except errors.GiftingError as exc:
                # One broken campaign must not stop the others from closing.
                event(
                    log,
                    logging.WARNING,
                    "campaign.expire_failed",
                    campaign=campaign,
                    code=exc.code.value,
                    error=str(exc)[:200],
                )
                continue
            if res.closed:
                closed += 1
                event(
                    log,
                    logging.INFO,
                    "campaign.expired",
                    campaign=campaign,
                    refunded=res.refunded,
                    transfer=res.transfer or None,
                )
        return closed
