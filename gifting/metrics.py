"""What ``/metrics`` shows: Prometheus text format, rendered by prometheus-client.

The hot paths only bump plain ints, Counters and lists on the hub's one event
loop. prometheus-client's own metric objects take a lock on every update, and
the fan-out path counts a frame per member per bubble (millions a second in a
busy room); so a custom collector turns these numbers into metric families
only when ``/metrics`` is scraped. Labels are bounded: ops are the hub's own
op names (anything else is ``unknown``), outcomes are ``ok`` or a wire error code.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "CONTENT_TYPE", "Gauges", "Histogram", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a LAN round trip to the store timeout (3 s by default).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """A fixed-bucket histogram: one list index and one add per observation."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass(frozen=True, slots=True)
class Gauges:
    """Read from the hub at scrape time (nothing on the hot path keeps them)."""

    connections: int = 0
    authenticated: int = 0
    rooms: int = 0
    members: int = 0
    queued_bytes: int = 0
    queued_frames: int = 0
    max_queued_bytes: int = 0
    backlogged: int = 0  # connections with frames waiting for their socket
    batching_rooms: int = 0  # rooms with an open batch window
    batched_events: int = 0
    bus_connected: bool = True


@dataclass
class Metrics:
    connections_total: int = 0
    closes: Counter[int] = field(default_factory=Counter)
    commands: Counter[tuple[str, ...]] = field(default_factory=Counter)
    gifts: Counter[str] = field(default_factory=Counter)
    gift_seconds: Histogram = field(default_factory=Histogram)
    store_seconds: defaultdict[str, Histogram] = field(
        default_factory=lambda: defaultdict(Histogram)
    )
    store_errors: Counter[str] = field(default_factory=Counter)
    bad_frames: int = 0
    bubbles: int = 0
    frames_out: int = 0
    evictions: int = 0
    bus_messages: int = 0
    bus_reconnects: int = 0
    admin_requests: Counter[tuple[str, ...]] = field(default_factory=Counter)
    gauges: Callable[[], Gauges] = Gauges
    info: dict[str, str] = field(default_factory=dict)
    _registry: CollectorRegistry | None = None

    def store_call(self, call: str, seconds: float, failed: bool) -> None:
        """A store round trip took ``seconds``; ``failed``: it did not reach a verdict."""
        self.store_seconds[call].observe(seconds)
        if failed:
            self.store_errors[call] += 1

    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            reg = CollectorRegistry(auto_describe=False)
            reg.register(_Collector(self))
            # The process's CPU, memory and file descriptors, and the GC: the
            # library's collectors, registered here rather than globally.
            for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                reg.register(c)
            self._registry = reg
        return self._registry

    def render(self) -> bytes:
        return generate_latest(self.registry())


def _counter(name: str, doc: str, labels: list[str], rows: Mapping[tuple[str, ...], int]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(rows.items()):
        fam.add_metric(list(key), n)
    return fam


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


class _Collector(Collector):
    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        g = m.gauges()
        yield InfoMetricFamily("gifting_hub", "This hub's id and version.", value=m.info)
        yield _gauge("gifting_connections", "Open WebSocket connections.", g.connections)
        yield _gauge(
            "gifting_connections_authenticated",
            "Open connections that have authenticated.",
            g.authenticated,
        )
        yield CounterMetricFamily(
            "gifting_connections_accepted",
            "WebSocket connections accepted.",
            value=m.connections_total,
        )
        yield _counter(
            "gifting_connection_closes",
            "Connections closed, by close code: the hub's if it closed, else the client's"
            " (1006: none).",
            ["code"],
            {(str(code) if code else "other",): n for code, n in m.closes.items()},
        )
        yield _gauge("gifting_rooms", "Rooms with a member on this hub.", g.rooms)
        yield _gauge("gifting_room_members", "Room memberships on this hub.", g.members)
        yield _counter(
            "gifting_commands",
            "Commands answered, by op and outcome (ok or the error code).",
            ["op", "outcome"],
            m.commands,
        )
        yield CounterMetricFamily(
            "gifting_bad_frames",
            "Frames that could not be decoded into a command (answered with an error event).",
            value=m.bad_frames,
        )
        yield _counter(
            "gifting_gifts",
            "Gift commands answered, by outcome: ok, duplicate (a replayed key) or the error code.",
            ["outcome"],
            {(k,): n for k, n in m.gifts.items()},
        )
        yield _histogram(
            "gifting_gift_seconds",
            "From reading a gift command to queueing its answer (store step included).",
            {(): m.gift_seconds},
        )
        yield _histogram(
            "gifting_store_seconds",
            "Store round trips by call (pipeline: one batch of gifts and reads).",
            {(call,): h for call, h in m.store_seconds.items()},
            ["call"],
        )
        yield _counter(
            "gifting_store_errors",
            "Store calls that failed (unreachable, timed out, not ready), by call.",
            ["call"],
            {(k,): n for k, n in m.store_errors.items()},
        )
        yield _gauge(
            "gifting_bus_connected",
            "1 while the room-event subscription is up.",
            1 if g.bus_connected else 0,
        )
        yield CounterMetricFamily(
            "gifting_bus_messages",
            "Room and user events read from the store.",
            value=m.bus_messages,
        )
        yield CounterMetricFamily(
            "gifting_bus_reconnects",
            "Times the room-event subscription was lost and made again.",
            value=m.bus_reconnects,
        )
        yield CounterMetricFamily("gifting_bubbles", "Bubbles fanned out.", value=m.bubbles)
        yield CounterMetricFamily(
            "gifting_frames_out", "WebSocket frames written to clients.", value=m.frames_out
        )
        yield _gauge(
            "gifting_send_queue_bytes",
            "Bytes waiting in connections' send queues, all connections.",
            g.queued_bytes,
        )
        yield _gauge("gifting_send_queue_frames", "Frames waiting in send queues.", g.queued_frames)
        yield _gauge(
            "gifting_send_queue_max_bytes",
            "The longest send queue, in bytes (evicted at the configured limit).",
            g.max_queued_bytes,
        )
        yield _gauge(
            "gifting_send_queue_backlogged",
            "Connections whose socket could not take a frame at once.",
            g.backlogged,
        )
        yield _gauge("gifting_batch_rooms", "Rooms with an open batch window.", g.batching_rooms)
        yield _gauge(
            "gifting_batch_events", "Events waiting in open batch windows.", g.batched_events
        )
        yield CounterMetricFamily(
            "gifting_slow_consumer_evictions",
            "Connections closed with 4009 because their send queue overflowed.",
            value=m.evictions,
        )
        yield _counter(
            "gifting_admin_requests",
            "Admin API requests, by path and outcome.",
            ["path", "outcome"],
            m.admin_requests,
        )


def _histogram(
    name: str, doc: str, rows: dict[tuple[str, ...], Histogram], labels: list[str] | None = None
) -> Metric:
    fam = HistogramMetricFamily(name, doc, labels=labels or [])
    for key, h in sorted(rows.items()):
        fam.add_metric(list(key), h.buckets(), h.sum)
    return fam
