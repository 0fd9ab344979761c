"""``/metrics``: what an operator scrapes, read back with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol import errors
from tests.conftest import T, token, topup
from tests.test_http import request
from tests.test_slow_consumer import (
    _read_close_code,
    _read_frames,
    _send_frame,
    _stalled_socket,
    hot_room,
)


class Scrape:
    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples[s.name, frozenset(s.labels.items())] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


async def scrape(port: int) -> Scrape:
    reply = await request(port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return Scrape(reply.body.decode())


async def scrape_until(port: int, holds: Callable[[Scrape], bool], timeout: float = T) -> Scrape:
    """Scrape until ``holds`` is true of the scrape (a gauge that moves by itself)."""
    async with asyncio.timeout(timeout):
        while True:
            m = await scrape(port)
            if holds(m):
                return m
            await asyncio.sleep(0.02)


async def test_families_are_typed_and_the_process_is_described(hub):
    m = await scrape(hub.port)
    assert m.types["gifting_connections"] == "gauge"
    assert m.types["gifting_commands"] == "counter"
    assert m.types["gifting_gift_seconds"] == "histogram"
    assert m.types["gifting_store_seconds"] == "histogram"
    assert m.types["gifting_send_queue_bytes"] == "gauge"
    assert m.value("gifting_hub_info", hub=hub.hub_id, version="0.1.0") == 1
    assert m.value("gifting_bus_connected") == 1
    assert m.value("process_resident_memory_bytes") > 0
    assert m.value("process_open_fds") > 0


async def test_connections_and_closes_by_code(hub, connect):
    a = await connect(hub, "alice")
    await connect(hub, "bob")
    m = await scrape(hub.port)
    assert m.value("gifting_connections") == 2
    assert m.value("gifting_connections_authenticated") == 2
    assert m.value("gifting_connections_accepted_total") == 2
    await a.close()
    m = await scrape_until(hub.port, lambda m: m.value("gifting_connections") == 1)
    assert m.value("gifting_connection_closes_total", code="1000") == 1


async def test_commands_and_gifts_by_outcome(hub, connect):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 12)
    await bob.request("join", room="alice")
    await bob.request("gift", room="alice", gift="star", key="k1")
    await bob.request("gift", room="alice", gift="star", key="k1")  # the replay
    with pytest.raises(errors.InsufficientFunds):
        await bob.request("gift", room="alice", gift="star", key="k2")
    with pytest.raises(errors.UnknownGift):
        await bob.request("gift", room="alice", gift="nope", key="k3")
    m = await scrape(hub.port)
    assert m.value("gifting_gifts_total", outcome="ok") == 1
    assert m.value("gifting_gifts_total", outcome="duplicate") == 1
    assert m.value("gifting_gifts_total", outcome="insufficient_funds") == 1
    assert m.value("gifting_gifts_total", outcome="unknown_gift") == 1
    assert m.value("gifting_commands_total", op="gift", outcome="ok") == 2
    assert m.value("gifting_commands_total", op="gift", outcome="insufficient_funds") == 1
    assert m.value("gifting_commands_total", op="join", outcome="ok") == 1
    assert m.value("gifting_commands_total", op="go_live", outcome="ok") == 1
    # every gift answered is in the latency histogram, the refused ones included
    assert m.value("gifting_gift_seconds_count") == 4
    assert m.value("gifting_gift_seconds_bucket", le="+Inf") == 4
    assert m.value("gifting_gift_seconds_sum") > 0
    # the gifts went through the pipelined store connection, timed per batch
    assert m.value("gifting_store_seconds_count", call="pipeline") >= 1
    assert m.value("gifting_store_seconds_count", call="go_live") == 1
    # a script's verdict (insufficient funds) is not a store error
    assert m.series("gifting_store_errors_total") == {}
    assert m.value("gifting_bubbles_total") == 1


async def test_hostile_ops_and_frames_do_not_mint_series(hub, connect):
    bob = await connect(hub, "bob")
    for i in range(30):
        with pytest.raises(errors.UnknownOp):
            await bob.request(f"op-{uuid.uuid4().hex}-{i}")
    await bob.send_raw(b"\xc1 not msgpack")
    async with asyncio.timeout(T):
        await bob.next_event("error")
    m = await scrape(hub.port)
    ops = {dict(labels)["op"] for labels in m.series("gifting_commands_total")}
    assert ops == {"auth", "unknown"}
    assert m.value("gifting_commands_total", op="unknown", outcome="unknown_op") == 30
    assert m.value("gifting_bad_frames_total") == 1


async def test_admin_requests_are_counted(hub):
    from gifting import auth
    from tests.conftest import SECRET

    admin = auth.mint(SECRET, "ops", admin=True)
    ok = await request(
        hub.port,
        "POST",
        "/admin/topup",
        body=b'{"user": "bob", "coins": 5, "key": "m1"}',
        headers={"Authorization": f"Bearer {admin}", "X-Request-Id": "trace-42"},
    )
    assert ok.status == 200 and ok.headers["x-request-id"] == "trace-42"
    bad = await request(
        hub.port,
        "POST",
        "/admin/topup",
        body=b'{"user": "bob", "coins": 5, "key": "m2"}',
        headers={"Authorization": "Bearer nope", "X-Request-Id": "bad id with spaces"},
    )
    assert bad.status == 401
    assert bad.headers["x-request-id"].startswith("adm-")  # not the untidy one sent
    m = await scrape(hub.port)
    assert m.value("gifting_admin_requests_total", path="/admin/topup", outcome="ok") == 1
    assert (
        m.value("gifting_admin_requests_total", path="/admin/topup", outcome="unauthenticated") == 1
    )


async def test_send_queue_gauges_and_eviction(start_hub, connect):
    """A viewer that stops reading shows in the queue gauges, then as an eviction."""
    hub, sender = await hot_room(start_hub, connect, 64 * 1024)
    stalled = await asyncio.to_thread(_stalled_socket, hub.port, token("dave"))
    backlog = []
    try:
        _send_frame(stalled, '{"op":"join","id":1,"room":"alice"}')
        await asyncio.to_thread(_read_frames, stalled, 1)
        sent = 0
        async with asyncio.timeout(4 * T):
            while sent < 20_000:
                await asyncio.gather(
                    *(
                        sender.request("gift", room="alice", gift="rose", key=f"k{sent + i}")
                        for i in range(10)
                    )
                )
                sent += 10
                m = await scrape(hub.port)
                if m.value("gifting_slow_consumer_evictions_total"):
                    break
                if m.value("gifting_send_queue_backlogged"):
                    backlog.append(
                        (
                            m.value("gifting_send_queue_bytes"),
                            m.value("gifting_send_queue_max_bytes"),
                        )
                    )
        assert backlog, "the stalled viewer never showed in the queue gauges"
        assert all(0 < total and 0 < top <= total for total, top in backlog)
        code, _ = await asyncio.to_thread(_read_close_code, stalled)
        assert code == 4009
    finally:
        stalled.close()
    m = await scrape_until(
        hub.port, lambda m: m.value("gifting_connection_closes_total", code="4009") == 1
    )
    assert m.value("gifting_slow_consumer_evictions_total") == 1
    assert m.value("gifting_send_queue_bytes") == 0


async def test_store_errors_and_the_bus(own_store, start_hub, connect):
    hub = await start_hub(url=own_store.url, store_timeout=1.0)
    bob = await connect(hub, "bob")
    await bob.request("balance")
    own_store.stop()
    with pytest.raises(errors.Unavailable):
        await bob.request("balance")
    m = await scrape_until(hub.port, lambda m: m.value("gifting_bus_connected") == 0)
    assert m.value("gifting_store_errors_total", call="pipeline") >= 1
    assert m.value("gifting_bus_reconnects_total") == 1
    assert m.value("gifting_commands_total", op="balance", outcome="unavailable") == 1
    own_store.start()
    await scrape_until(hub.port, lambda m: m.value("gifting_bus_connected") == 1, 3 * T)


async def test_a_client_chosen_close_code_does_not_mint_a_series(hub, connect):
    for code in (4321, 3999):
        c = await connect(hub, "bob")
        await c.ws.close(code)
    m = await scrape_until(
        hub.port, lambda m: m.value("gifting_connection_closes_total", code="other") == 2
    )
    codes = {dict(labels)["code"] for labels in m.series("gifting_connection_closes_total")}
    assert codes == {"other"}
