"""Counters for ``/metrics`` (Prometheus text format). Plain ints: one event loop."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Metrics"]


@dataclass
class Metrics:
    connections: int = 0
    connections_total: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    gifts: int = 0
    bubbles: int = 0
    frames_out: int = 0
    evictions: int = 0
    rooms: int = 0

    def render(self) -> str:
        lines = [
            "# TYPE gifting_connections gauge",
            f"gifting_connections {self.connections}",
            "# TYPE gifting_connections_total counter",
            f"gifting_connections_total {self.connections_total}",
            "# TYPE gifting_rooms gauge",
            f"gifting_rooms {self.rooms}",
            "# TYPE gifting_gifts_total counter",
            f"gifting_gifts_total {self.gifts}",
            "# TYPE gifting_bubbles_total counter",
            f"gifting_bubbles_total {self.bubbles}",
            "# TYPE gifting_frames_out_total counter",
            f"gifting_frames_out_total {self.frames_out}",
            "# TYPE gifting_slow_consumer_evictions_total counter",
            f"gifting_slow_consumer_evictions_total {self.evictions}",
            "# TYPE gifting_commands_total counter",
        ]
        lines += [
            f'gifting_commands_total{{op="{op}"}} {n}' for op, n in sorted(self.commands.items())
        ]
        lines.append("# TYPE gifting_errors_total counter")
        lines += [f'gifting_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
        return "\n".join(lines) + "\n"
