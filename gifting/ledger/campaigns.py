"""Brand campaigns: the store-side calls (``campaign_*.lua``; rewards run inside ``gift.lua``).

Built by ``Ledger`` (``ledger.campaigns``); see the key layout at the top of this package.
Every coin move is one script: ``campaign_create.lua`` holds the budget in the
escrow account ``~escrow:<id>``, ``gift.lua`` pays rewards out of it, and
``campaign_close.lua`` returns the rest. The reads here build the campaign object
a caller sees; ``_CampaignAudit`` replays the escrow accounts from the journal.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gifting.ledger.ledger import AuditReport, Ledger

__all__ = [
    "METRICS",
    "Campaign",
    "CampaignLedger",
    "CloseResult",
    "CreateResult",
    "JoinResult",
    "escrow_account",
]

METRICS = frozenset({"gifts", "gift_coins", "gifters"})
ESCROW = "~escrow:"
# How far ahead ``ends`` may be (the script checks it against store time).
MAX_DURATION_MS = 366 * 24 * 3600 * 1000
_FIELDS = (
    "brand",
    "brand_name",
    "title",
    "budget",
    "reward",
    "metric",
    "threshold",
    "ends",
    "status",
    "restricted",
)


def escrow_account(campaign: str) -> str:
    return ESCROW + campaign


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class CreateResult:
    transfer: int
    coins: int  # the brand's balance after
    duplicate: bool


@dataclass(frozen=True, slots=True)
class JoinResult:
    since: int  # ms of the (first) join
    again: bool  # already joined before this call


@dataclass(frozen=True, slots=True)
class CloseResult:
    refunded: int
    transfer: int  # 0: nothing moved (the escrow was empty, or nothing to close)
    closed: bool  # this call closed it (the sweeper's calls may find nothing to do)


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign as one caller (``viewer``) sees it."""

    id: str
    title: str
    brand: str
    brand_name: str
    budget: int
    escrow: int
    reward: int
    metric: str
    threshold: int
    ends: int
    stored_status: str
    restricted: bool
    joined: bool
    progress: int
    rewarded: bool
    allowed: bool  # the viewer may join (unrestricted, or listed)

    def status(self, now: int) -> str:
        # Shown closed as soon as it ended: the sweeper returns the escrow
        # within ``campaign_sweep`` seconds, but no one may join it meanwhile.
        return "closed" if now >= self.ends else self.stored_status

    def wire(self, now: int) -> dict[str, Any]:
        """The contract's campaign object."""
        return {
            "id": self.id,
            "title": self.title,
            "brand": {"user": self.brand, "name": self.brand_name},
            "budget": self.budget,
            "escrow": self.escrow,
            "reward": self.reward,
            "metric": self.metric,
            "threshold": self.threshold,
            "ends": self.ends,
            "status": self.status(now),
            "joined": self.joined,
            "progress": self.progress,
            "rewarded": self.rewarded,
        }


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


class CampaignLedger:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._create = ledger.script("campaign_create.lua")
        self._join = ledger.script("campaign_join.lua")
        self._close = ledger.script("campaign_close.lua")

    # -- coin moves ----------------------------------------------------------

    async def create(
        self,
        *,
        brand: str,
        brand_name: str,
        key: str,
        campaign: str,
        title: str,
        budget: int,
        reward: int,
        metric: str,
        threshold: int,
        ends: int,
        creators: Sequence[str] | None,
        conn: str = "",
    ) -> CreateResult:
        """Hold ``budget`` in escrow (idempotent by ``key``; see ``campaign_create.lua``)."""
        allowed = sorted(set(creators)) if creators is not None else []
        # Every field, canonically: a replay must match all of them to be one.
        body = json.dumps(
            [campaign, title, budget, reward, metric, threshold, ends, creators is not None]
            + allowed,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        args: list[str | int] = [
            brand,
            brand_name,
            key,
            body,
            campaign,
            title,
            budget,
            reward,
            metric,
            threshold,
            ends,
            MAX_DURATION_MS,
            self.ledger.idem_ttl,
            conn,
            1 if creators is not None else 0,
            *allowed,
        ]

        res = await self.ledger.move("campaign_create", self._create, args)
        return CreateResult(int(res[0]), int(res[1]), bool(res[2]))

    async def join(self, *, user: str, name: str, campaign: str, limit: int) -> JoinResult:
        async def go() -> Any:
            return await self._join(keys=[self.ledger.bal], args=[user, name, campaign, limit])

        res = await self.ledger.call("campaign_join", go)
        return JoinResult(int(res[0]), bool(res[1]))

    async def close(
        self, campaign: str, *, by: str = "", expire: bool = False, conn: str = ""
    ) -> CloseResult:
        """Close ``campaign`` for its brand ``by``, or, with ``expire``, for the
        sweeper (a no-op unless it has ended and is not closed yet)."""

        args: list[str | int] = [campaign, by, 1 if expire else 0, conn]
        res = await self.ledger.move("campaign_close", self._close, args)
        return CloseResult(int(res[0]), int(res[1]), bool(res[2]))

    # -- reads ---------------------------------------------------------------

    async def due(self, now: int, limit: int = 100) -> list[str]:
        """Campaigns not yet closed whose ``ends`` is at or before ``now`` (ms)."""
        key = self.ledger.key("camps", "open")

        async def go() -> Any:
            return await self.ledger.r.zrangebyscore(key, "-inf", now, start=0, num=limit)

        return [_str(c) for c in await self.ledger.call("campaigns_due", go)]

    async def forget_open(self, campaign: str) -> None:
        """Drop ``campaign`` from the sweeper's queue (it has no campaign hash)."""
        key = self.ledger.key("camps", "open")

        async def go() -> Any:
            return await self.ledger.r.zrem(key, campaign)

        await self.ledger.call("campaigns_forget", go)

    async def brand_ids(self, brand: str, limit: int) -> list[str]:
        """A brand's campaigns, newest first."""
        key = self.ledger.key("camps", "brand", brand)

        async def go() -> Any:
            return await self.ledger.r.zrevrange(key, 0, limit - 1)

        return [_str(c) for c in await self.ledger.call("campaigns_list", go)]

    async def member_ids(self, user: str, limit: int) -> list[str]:
        """The campaigns ``user`` joined, latest join first."""
        key = self.ledger.key("camps", "member", user)

        async def go() -> Any:
            return await self.ledger.r.zrevrange(key, 0, limit - 1)

        return [_str(c) for c in await self.ledger.call("campaigns_list", go)]

    async def open_ids(self, now: int, limit: int) -> list[str]:
        """Campaigns not closed and not ended, soonest ending first."""
        key = self.ledger.key("camps", "open")

        async def go() -> Any:
            return await self.ledger.r.zrangebyscore(key, f"({now}", "+inf", start=0, num=limit)

        return [_str(c) for c in await self.ledger.call("campaigns_list", go)]

    async def get(self, campaign: str, viewer: str) -> Campaign | None:
        found = await self.many([campaign], viewer)
        return found[0] if found else None

    async def many(self, ids: Sequence[str], viewer: str) -> list[Campaign]:
        """The campaigns ``ids`` as ``viewer`` sees them (missing ones left out),
        in one round trip."""
        if not ids:
            return []
        led = self.ledger
        per = 6

        async def go() -> Any:
            async with led.r.pipeline(transaction=False) as p:
                p.hget(led.key("room", viewer), "session")
                for c in ids:
                    ck = led.key("camp", c)
                    p.hmget(ck, list(_FIELDS))
                    p.hget(led.bal, escrow_account(c))
                    p.hexists(f"{ck}:joined", viewer)
                    p.hexists(f"{ck}:rewarded", viewer)
                    p.hmget(f"{ck}:prog:{viewer}", ["session", "value"])
                    p.sismember(f"{ck}:allowed", viewer)
                return await p.execute()

        res = await led.call("campaigns_read", go)
        session = _int(res[0])
        out: list[Campaign] = []
        for i, c in enumerate(ids):
            row, escrow, joined, rewarded, prog, listed = res[1 + i * per : 1 + (i + 1) * per]
            if row[0] is None:
                continue
            f = dict(zip(_FIELDS, row, strict=True))
            restricted = f["restricted"] == b"1"
            progress = _int(prog[1]) if prog[0] is not None and _int(prog[0]) == session else 0
            out.append(
                Campaign(
                    id=c,
                    title=_str(f["title"]),
                    brand=_str(f["brand"]),
                    brand_name=_str(f["brand_name"]),
                    budget=_int(f["budget"]),
                    escrow=_int(escrow),
                    reward=_int(f["reward"]),
                    metric=_str(f["metric"]),
                    threshold=_int(f["threshold"]),
                    ends=_int(f["ends"]),
                    stored_status=_str(f["status"]),
                    restricted=restricted,
                    joined=bool(joined),
                    progress=progress,
                    rewarded=bool(rewarded),
                    allowed=not restricted or bool(listed),
                )
            )
        return out

    # -- audit ---------------------------------------------------------------

    def audit_check(self) -> _CampaignAudit:
        return _CampaignAudit(self.ledger)


@dataclass(slots=True)
class _Escrow:
    held: int = 0
    holds: int = 0
    rewarded: int = 0
    returned: int = 0
    returns: int = 0


class _CampaignAudit:
    """Escrow accounts and rewards, replayed from the journal.

    Each ``~escrow:<id>`` must hold its budget less the rewards paid and the
    rest returned, never below zero, and nothing once closed; a creator is
    rewarded at most once per campaign, and the rest returns at most once.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.camps: dict[str, _Escrow] = {}
        self.rewards: dict[tuple[str, str], int] = {}  # (campaign, creator) -> transfer

    def _camp(self, campaign: str) -> _Escrow:
        e = self.camps.get(campaign)
        if e is None:
            e = self.camps[campaign] = _Escrow()
        return e

    def entry(
        self,
        t: int,
        kind: str,
        fields: dict[bytes, bytes],
        postings: dict[str, int],
        report: AuditReport,
    ) -> None:
        escrows = {a: d for a, d in postings.items() if a.startswith(ESCROW)}
        if not escrows:
            return
        campaign = fields.get(b"campaign", b"").decode()
        if kind not in ("escrow", "reward") or list(escrows) != [escrow_account(campaign)]:
            report.differences.append(
                f"transfer {t} ({kind}) moves escrow {sorted(escrows)} outside its campaign's steps"
            )
            return
        delta = escrows[escrow_account(campaign)]
        e = self._camp(campaign)
        if kind == "reward":
            creator = fields.get(b"creator", b"").decode()
            first = self.rewards.setdefault((campaign, creator), t)
            if first != t:
                report.differences.append(
                    f"campaign {campaign}: creator {creator} rewarded twice "
                    f"(transfers {first} and {t})"
                )
            e.rewarded -= delta
        elif fields.get(b"step") == b"hold":
            e.holds += 1
            e.held += delta
            if e.holds > 1:
                report.differences.append(f"campaign {campaign}: budget held twice (transfer {t})")
        else:
            e.returns += 1
            e.returned -= delta
            if e.returns > 1:
                report.differences.append(
                    f"campaign {campaign}: escrow returned twice (transfer {t})"
                )

    async def finish(self, balances: dict[str, int], report: AuditReport) -> None:
        ids = set(self.camps) | {a[len(ESCROW) :] for a in balances if a.startswith(ESCROW)}
        order = sorted(ids)
        led = self.ledger
        rows: list[Any] = []
        for i in range(0, len(order), 500):
            chunk = order[i : i + 500]
            async with led.r.pipeline(transaction=False) as p:
                for c in chunk:
                    p.hmget(led.key("camp", c), ["status", "budget"])
                    p.hlen(led.key("camp", c, "rewarded"))
                got: Any = await p.execute()
            rows.extend(got)
        rewards = Counter(camp for camp, _ in self.rewards)
        for i, c in enumerate(order):
            (status, budget), paid = rows[2 * i], rows[2 * i + 1]
            e = self.camps.get(c, _Escrow())
            have = balances.get(escrow_account(c), 0)
            want = e.held - e.rewarded - e.returned
            if status is None:
                report.differences.append(f"campaign {c}: escrow {have} but no such campaign")
                continue
            if int(budget) != e.held:
                report.differences.append(
                    f"campaign {c}: budget {int(budget)}, but the journal held {e.held}"
                )
            if have != want:
                report.differences.append(
                    f"campaign {c}: escrow {have}, but budget {e.held} - rewards {e.rewarded}"
                    f" - returned {e.returned} = {want}"
                )
            if have < 0:
                report.differences.append(f"campaign {c}: escrow below zero ({have})")
            if status == b"closed" and have != 0:
                report.differences.append(f"campaign {c}: closed with {have} left in escrow")
            if int(paid) != rewards[c]:
                report.differences.append(
                    f"campaign {c}: {int(paid)} creators marked rewarded,"
                    f" the journal has {rewards[c]} rewards"
                )
