"""The money checks of a fault run: what the senders were told against the store."""

from __future__ import annotations

from dataclasses import dataclass

from tests.faults.clients import Ack

__all__ = ["StoreState", "money_violations"]

ISSUER = "~issuer"


@dataclass
class StoreState:
    """The journal (each entry's fields) and every balance, read after the run."""

    journal: list[dict[str, str]]
    balances: dict[str, int]


def money_violations(
    state: StoreState,
    *,
    topups: dict[str, int],
    acks: list[Ack],
    creators: dict[str, int] | None = None,
    share_pct: int = 50,
    complete: bool = True,
) -> list[str]:
    """What the senders were told against what the store holds.

    - every acked transfer is in the journal exactly once, as a gift of that
      sender, room and cost;
    - no two keys were acked with the same transfer;
    - with ``complete`` (every key has its answer): each sender's gifts in the
      journal are exactly the acked ones (a retry that paid twice leaves a
      transfer no ack names), and each sender's balance is its top-up less
      what its acks cost;
    - each creator in ``creators`` (room -> balance before) earned its share of
      every acked gift to its room, and nothing else;
    - no balance is negative but the issuer's, and all of them sum to zero.
    """
    out: list[str] = []
    entries: dict[int, list[dict[str, str]]] = {}
    for e in state.journal:
        entries.setdefault(int(e.get("t", "0")), []).append(e)
    by_transfer: dict[int, list[Ack]] = {}
    for a in acks:
        by_transfer.setdefault(a.transfer, []).append(a)
    for t, same in sorted(by_transfer.items()):
        if len(same) > 1:
            out.append(f"transfer {t} acked for {len(same)} keys: {[a.key for a in same]}")
    for a in acks:
        found = entries.get(a.transfer, [])
        if len(found) != 1:
            out.append(
                f"acked gift {a.key} of {a.user} (transfer {a.transfer}) is in the journal "
                f"{len(found)} times"
            )
            continue
        e = found[0]
        first = e.get("post", "").split(";")[0]
        if e.get("kind") != "gift" or first != f"{a.user}={-a.cost}" or e.get("room") != a.room:
            out.append(f"acked gift {a.key} (transfer {a.transfer}) does not match its entry {e}")
    acked_by_user: dict[str, set[int]] = {}
    for a in acks:
        acked_by_user.setdefault(a.user, set()).add(a.transfer)
    if complete:
        spent: dict[str, set[int]] = {}
        for e in state.journal:
            if e.get("kind") != "gift":
                continue
            sender = e.get("post", "").split(";")[0].partition("=")[0]
            if sender in topups:
                spent.setdefault(sender, set()).add(int(e["t"]))
        for user in sorted(topups):
            extra = spent.get(user, set()) - acked_by_user.get(user, set())
            if extra:
                out.append(
                    f"{user}: gift transfers in the journal that no ack reported "
                    f"(paid twice, or an answer lost): {sorted(extra)[:10]}"
                )
            cost = sum(a.cost for a in acks if a.user == user)
            have = state.balances.get(user, 0)
            if have != topups[user] - cost:
                out.append(
                    f"{user}: balance {have}, expected top-up {topups[user]} - acked "
                    f"{cost} = {topups[user] - cost}"
                )
    for room, before in sorted((creators or {}).items()):
        earned = sum(a.cost * share_pct // 100 for a in acks if a.room == room)
        have = state.balances.get(room, 0)
        if complete and have != before + earned:
            out.append(f"creator {room}: balance {have}, expected {before} + {earned}")
    for acct, coins in sorted(state.balances.items()):
        if acct != ISSUER and coins < 0:
            out.append(f"account {acct}: negative balance {coins}")
    total = sum(state.balances.values())
    if total != 0:
        out.append(f"balances sum to {total}, not 0")
    return out
