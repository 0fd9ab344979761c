"""The client's retry path after failures the fault runs found: a reconnect that
fails, a reconnect whose auth fails, a handshake cut short; and the hub's answer
to a join while the store is down."""

import asyncio
import socket

import pytest

from gifting.store import EmbeddedStore
from protocol import errors
from protocol.client import Client
from tests.conftest import T, balances, topup, ws_url
from tests.test_faults import _until


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"ws://127.0.0.1:{port}/ws"  # nothing listens there now


async def _room(hub, connect):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    await topup(hub, "bob", 100)
    bob = await connect(hub, "bob")
    await bob.request("join", room="alice")
    return bob


async def test_a_failed_reconnect_does_not_jam_later_attempts(hub, connect):
    bob = await _room(hub, connect)
    await bob.ws.close()  # dropped
    live = bob.url
    bob.url = _dead_url()  # and the first reconnect finds nobody

    def on_retry(attempt: int, exc: BaseException) -> None:
        bob.url = live  # the next attempt goes to a live hub

    res = await bob.send_gift("alice", "star", key="k", attempts=3, backoff=0.01, on_retry=on_retry)
    assert res["duplicate"] is False
    assert (await balances(hub))["bob"] == 90


async def test_a_reconnect_whose_auth_fails_leaves_no_half_open_connection(hub):
    c = Client(ws_url(hub), token="not.a.token", timeout=T)
    with pytest.raises(errors.Unauthenticated):
        await c.open()
    assert c.closed.is_set()  # closed, so the next attempt reopens


async def test_a_handshake_refused_mid_way_is_retried(hub, connect):
    bob = await _room(hub, connect)
    await bob.ws.close()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    live, bob.url = bob.url, f"ws://127.0.0.1:{port}/ws"
    tries: list[str] = []

    def on_retry(attempt: int, exc: BaseException) -> None:
        tries.append(type(exc).__name__)
        bob.url = live

    try:
        res = await bob.send_gift(
            "alice", "rose", key="h", attempts=3, backoff=0.01, on_retry=on_retry
        )
    finally:
        server.close()
    assert res["coins"] == 99 and tries == ["InvalidStatus"]


@pytest.fixture
def own_store(tmp_path):
    s = EmbeddedStore(tmp_path / "own")
    s.start()
    yield s
    s.stop()


async def test_join_while_the_store_is_down_is_unavailable(own_store, start_hub, connect):
    hub = await start_hub(url=own_store.url, store_timeout=1.0)
    c = await connect(hub, "bob")
    own_store.stop()
    with pytest.raises(errors.Unavailable):
        await c.request("join", room="alice")
    assert (await c.request("ping"))["time"] > 0
    own_store.start()

    async def joined() -> bool:  # once the hub has reconnected by itself
        return (await c.request("join", room="alice"))["room"] == "alice"

    await _until(joined, "join after the store came back")
