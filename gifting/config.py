"""The one frozen Config, built once in ``cli.py`` from flags, env and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_CATALOG", "DEFAULT_EFFECTS", "CatalogGift", "Config"]


@dataclass(frozen=True, slots=True)
class CatalogGift:
    id: str
    name: str
    coins: int


DEFAULT_CATALOG: tuple[CatalogGift, ...] = (
    CatalogGift("rose", "Rose", 1),
    CatalogGift("heart", "Heart", 5),
    CatalogGift("star", "Star", 10),
    CatalogGift("cake", "Cake", 50),
    CatalogGift("rocket", "Rocket", 100),
    CatalogGift("castle", "Castle", 500),
)

# Paid animations played in a live room, bought from the platform (same shape).
DEFAULT_EFFECTS: tuple[CatalogGift, ...] = (
    CatalogGift("confetti", "Confetti", 20),
    CatalogGift("fireworks", "Fireworks", 200),
    CatalogGift("crown", "Crown", 1000),
)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8765
    # None: start the embedded Valkey under data_dir.
    redis_url: str | None = None
    data_dir: Path = Path(".gifting")
    # Never in a repr (so never in a log line that prints the config).
    secret: bytes = field(default=b"", repr=False)
    # Hash-tag prefix of every store key; tests give each hub its own.
    prefix: str = "g"
    creator_share_pct: int = 50
    # Coins a user may spend on gifts per UTC day (0: no cap), and the cap for
    # tokens with the ``minor`` claim; enforced inside the gift script.
    daily_spend_cap: int = 0
    minor_daily_spend_cap: int = 1000
    catalog: tuple[CatalogGift, ...] = DEFAULT_CATALOG
    effects: tuple[CatalogGift, ...] = DEFAULT_EFFECTS
    # A shop sale: the seller's percent of the total (rounded down), the platform the rest.
    seller_share_pct: int = 90
    # Seconds between sweeps that close expired campaigns (the contract allows 10).
    campaign_sweep: float = 1.0
    # Open campaigns a creator may have joined at a time.
    max_open_campaigns: int = 10
    # Bytes a connection may have waiting (beyond the socket's own 32 KiB write
    # buffer) before it is a slow consumer and is closed with 4009.
    send_queue: int = 256 * 1024
    auth_timeout: float = 10.0
    # Seconds a store call may take before the answer is `unavailable`.
    store_timeout: float = 3.0
    # A coin move is acked only once this many replicas of the store hold it
    # (``WAIT`` after its script, on the same connection); short of that within
    # ``ack_timeout`` ms the move has happened but the answer is `unavailable`,
    # and its retry with the same key is acked once the replicas have it.
    # 0: acked as soon as the master has it (replication is asynchronous).
    ack_replicas: int = 0
    ack_timeout: int = 1000
    feed_maxlen: int = 100_000
    idempotency_ttl: int = 48 * 3600
    # Token buckets per connection: commands and gifts (rate/s, burst).
    command_rate: float = 1000.0
    command_burst: int = 2000
    gift_rate: float = 500.0
    gift_burst: int = 1000
    # The same per user, over all of that user's connections to this hub.
    user_command_rate: float = 2000.0
    user_command_burst: int = 4000
    user_gift_rate: float = 500.0
    user_gift_burst: int = 1000
    # Connections one user may hold on this hub (more: rate_limited / 4008).
    max_conns_per_user: int = 50
    # Consecutive rate_limited answers before the connection is closed (4008).
    rate_limit_strikes: int = 100
    max_rooms_per_conn: int = 100
    # A busy room's events are gathered this long into one `batch` frame (0: never).
    batch_window: float = 0.1
    # Seconds between presence/leaderboard ticks (events at most once per tick).
    tick: float = 1.0
    # Print demo tokens and top up the demo viewer once at start.
    demo: bool = True
    hub_id: str = field(default="")
    # Listen with SO_REUSEPORT: ``serve --workers N`` runs N hubs on one port
    # and the kernel spreads new connections over them.
    reuse_port: bool = False
    # The ledger partitioned by user over this many slots (docs/scaling.md §5);
    # 1: the one-slot ledger. Effects, shop, campaigns and reversals need 1.
    partitions: int = 1

    def catalog_prices(self) -> dict[str, int]:
        return {g.id: g.coins for g in self.catalog}
