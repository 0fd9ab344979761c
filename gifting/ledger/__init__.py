"""Every coin move lives here: typed calls in ``ledger.py``, Lua in ``*.lua``.

Key layout. ``P`` is the hash-tagged prefix (``{g}`` by default, ``{<prefix>}``
in general): every key a script touches carries it, so all of them hash to one
slot and the same scripts run unchanged on a Valkey Cluster. Each script gets
``P:bal`` as ``KEYS[1]`` (which routes it to that slot) and derives the rest.

    P:bal                   HASH   account -> balance (integer coins). Accounts are
                                   user ids plus system accounts "~issuer" (top-ups
                                   draw from it; negative) and "~platform" (fees).
                                   "~" is not allowed in user ids, so they cannot clash.
    P:xfer                  STRING last transfer id (INCR)
    P:journal               STREAM append-only journal, one entry per transfer:
                                   t (transfer), kind, ms, post ("acct=delta;...")
                                   and kind-specific fields. ``audit`` replays it.
    P:catalog               HASH   gift id -> price (written by each hub at start)
    P:room:<room>           HASH   live (0|1), session, earned (this session), seq,
                                   title, started, ended
    P:feed:<room>           STREAM creator feed; entry id = feed ``offset``;
                                   field e = msgpack of the ``gift`` event
    P:top:<room>:<session>  ZSET   sender -> coins paid this session (7 days)
    P:combo:<room>:<user>   HASH   gift, n; expires 3 s after the last gift
    P:names                 HASH   user -> display name (for leaderboards)
    P:hist:<user>           ZSET   transfer id -> msgpack history entry
    P:idem:<user>:<key>     HASH   body, transfer, coins, combo (expires after
                                   ``idempotency_ttl``; only gifts that moved coins)
    P:topup:<key>           HASH   body, transfer (never expires)
    P:posts                 HASH   transfer -> "kind|post" (the journal entry's
                                   postings, to find a transfer to reverse)
    P:reversed              HASH   transfer -> the transfer that reversed it
    P:reverse:<key>         HASH   body, transfer (a reversal's key; never expires)
    P:spent:<user>:<day>    STRING coins gifted on that UTC day (day = unix time
                                   // 86400), kept 2 days; only while a cap applies

Keys no script shares carry no tag (plain ``<prefix>:``):

    <prefix>:pres:<room>    HASH   hub id -> viewer connections on that hub
    <prefix>:hubs           ZSET   hub id -> ms until which the hub counts as alive

Pub/sub channels: ``<prefix>:room:<room>`` (room events, published by the
scripts after their writes) and ``<prefix>:user:<user>`` (balance events).
"""

from gifting.ledger.ledger import (
    AuditReport,
    GiftResult,
    Ledger,
    LiveResult,
    ReverseResult,
    TopupResult,
)

__all__ = ["AuditReport", "GiftResult", "Ledger", "LiveResult", "ReverseResult", "TopupResult"]
