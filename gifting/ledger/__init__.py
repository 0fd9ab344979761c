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
                                   title, started, ended; pinned (product id) and
                                   pinsess (the session it was pinned in: a pin
                                   lasts for that session only)
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
                                   postings, to find a transfer to reverse; escrow
                                   and reward transfers are left out: reversing one
                                   would refill or drain an escrow behind its campaign)
    P:reversed              HASH   transfer -> the transfer that reversed it (a
                                   refund marks its purchase here too, so a purchase
                                   is undone at most once, by a refund or an admin)
    P:reverse:<key>         HASH   body, transfer (a reversal's key; never expires)
    P:spent:<user>:<day>    STRING coins spent on gifts, effects and buys that UTC
                                   day (day = unix time // 86400), kept 2 days;
                                   only while a cap applies
    P:acks                  STRING a counter written after each pipelined batch of
                                   coin moves when ``--ack-replicas`` is set: the
                                   batch's ``WAIT`` waits for the connection's last
                                   write, which this makes come after every move
                                   the batch answers (a duplicate's included)

The coin economy beyond gifts (``shop.py``, ``campaigns.py``). Idempotency keys of
effects, buys, refunds and campaign creation share ``P:idem:<user>:<key>`` with
gifts; the stored ``body`` starts with the move's kind and a colon (``effect:``,
``buy:``, ``refund:``, ``campaign:``; a gift's body starts with a room id, which has no colon), so
a key reused for another kind of move is ``conflict``. Besides ``body`` the hash
holds what the first answer needs: transfer and coins (effect); order, coins, stock
and transfer (buy); order, coins (the seller's balance after) and transfer (refund);
transfer and coins (the brand's balance after) (campaign creation).

    P:effects               HASH   effect id -> price (written by each hub at start)
    P:prod:<shop>:<product> HASH   name, coins, stock, image ("" for none), created
    P:shop:<shop>           ZSET   product id -> position when first put (1, 2, ...:
                                   a shop's listing order; products are never deleted)
    P:order                 STRING last order id (INCR)
    P:order:<id>            HASH   shop, buyer, buyer_name, product, count, coins (total
                                   paid), earned (seller), fee (platform), status
                                   (paid|refunded), time, transfer, refund (transfer)
    P:orders:buyer:<user>   ZSET   order id -> order id (newest first by score)
    P:orders:seller:<shop>  ZSET   order id -> order id
    P:camp:<id>             HASH   brand, brand_name, title, budget, reward, metric,
                                   threshold, ends, status (open|exhausted|closed),
                                   restricted (0|1), created, transfer (the hold),
                                   body (the creation's, for a replay under another
                                   key); once closed: closed_at, closed_by (transfer
                                   of the return, 0 when the escrow was empty), refunded
    P:camp:<id>:allowed     SET    creators allowed to join (when restricted)
    P:camp:<id>:joined      HASH   creator -> join time ms (the first join)
    P:camp:<id>:rewarded    HASH   creator -> reward transfer
    P:camp:<id>:prog:<user> HASH   session, value: the creator's metric in that session
    P:camp:<id>:fans:<user>:<session>  SET  distinct gifters (metric ``gifters``;
                                   expires an hour after the campaign ends)
    P:camps:brand:<brand>   ZSET   campaign id -> created ms
    P:camps:open            ZSET   campaign id -> ends ms: open and exhausted ones
                                   (the sweeper's queue; an exhausted campaign may
                                   still hold a rest to return)
    P:camps:joined:<user>   ZSET   campaign id -> ends ms: what a gift to <user>
                                   checks; joined campaigns not seen closed,
                                   exhausted or ended (gift.lua and campaign_join.lua
                                   drop those), so it holds at most the open limit
    P:camps:member:<user>   ZSET   campaign id -> join ms: every campaign <user>
                                   joined (what ``campaigns`` lists as joined)

Escrow is an account in ``P:bal``: ``~escrow:<campaign>``, so the zero-sum rule and
the audit's replay cover it. Journal kinds beyond ``gift``/``topup``/``reverse``:
``effect``, ``purchase``, ``refund``, ``escrow`` (budget held, or the rest returned:
fields campaign, brand and step ``hold`` or ``return``), ``reward`` (fields
campaign, creator, session and gift, the transfer that earned it), and ``stock`` (a
``product_put``: no postings, no transfer id; the audit replays stock from it).
``purchase`` and ``refund`` entries carry order, shop, product, count and buyer (a
refund also ``of``, its purchase's transfer): the audit replays orders and stock
from them. Room events a script publishes whole go out as ``["event", {...}]`` on
the room channel (``effect``, ``sale``, ``reward`` with the room's ``seq``;
``pinned`` without), user events as ``["event", {...}, skip_conn]`` on the user
channel (``order``, ``reward``).

With ``serve --partitions N`` (N >= 2) the money path runs on a ledger
partitioned by user instead: the same names under one tag per partition,
``{<prefix>.p<k>}``, plus an outbox and an in-flight account per partition
(``partitioned.py`` describes them).

Keys no script shares carry no tag (plain ``<prefix>:``):

    <prefix>:pres:<room>    HASH   hub id -> viewer connections on that hub
    <prefix>:hubs           ZSET   hub id -> ms until which the hub counts as alive

Pub/sub channels are sharded (``SPUBLISH``/``SSUBSCRIBE``, Valkey/Redis >= 7) and
carry the tag too: ``P:room:<room>`` (room events, published by the scripts after
their writes) and ``P:user:<user>`` (balance and user events). A script may only
``SPUBLISH`` to a channel in its own slot, and on a cluster a plain ``PUBLISH``
would cross the whole cluster bus; a tagged sharded channel stays on the one
shard that runs the script, where the hub's bus subscribes (channel names and
key names are separate namespaces: ``P:room:<room>`` is both a hash and a channel).
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
