"""Store failures: the hub answers `unavailable`, never guesses, and recovers by itself."""

import asyncio
import contextlib
import subprocess

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex

from protocol import errors
from tests.conftest import T, balances, topup


async def _until(predicate, what: str):
    """Retry a store-touching check until it holds, under the test deadline."""
    async with asyncio.timeout(3 * T):
        while True:
            with contextlib.suppress(errors.Unavailable, errors.Internal):
                if await predicate():
                    return
            await asyncio.sleep(0.05)


async def test_store_down_means_unavailable_then_recovery(own_store, start_hub, connect):
    hub = await start_hub(url=own_store.url, store_timeout=1.0)
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 100)
    await bob.request("join", room="alice")
    await bob.request("gift", room="alice", gift="rose", key="before")

    own_store.stop()
    with pytest.raises(errors.Unavailable):
        await bob.request("gift", room="alice", gift="star", key="during")
    with pytest.raises(errors.Unavailable):
        await bob.request("balance")
    # the connection survives an unavailable store
    assert (await bob.request("ping"))["time"]

    own_store.start()  # same dir: AOF replayed, script cache empty

    async def gift_goes_through() -> bool:
        res = await bob.request("gift", room="alice", gift="star", key="during")
        return res["coins"] == 89

    await _until(gift_goes_through, "gift after restart")
    # the bus re-subscribed by itself: bubbles flow again
    async with asyncio.timeout(T):
        while (await creator.next_event("bubble"))["gift"] != "star":
            pass
    again = await bob.request("gift", room="alice", gift="star", key="during")
    assert again["duplicate"] is True
    bals = await balances(hub)
    assert bals["bob"] == 89 and sum(bals.values()) == 0


async def test_script_cache_flush_reloads(hub, connect, redis_client):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 10)
    await bob.request("join", room="alice")
    await redis_client.script_flush()
    res = await bob.request("gift", room="alice", gift="rose", key="k")
    assert res["coins"] == 9 and res["duplicate"] is False


async def test_data_survives_store_restart(own_store, start_hub, connect):
    hub = await start_hub(url=own_store.url)
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 50)
    await bob.request("join", room="alice")
    res = await bob.request("gift", room="alice", gift="cake", key="k")
    own_store.kill()  # SIGKILL: only what the AOF (fsync always) has survives
    own_store.start()

    async def balance_back() -> bool:
        return (await bob.request("balance"))["coins"] == 0

    await _until(balance_back, "balance after restart")
    entries = (await creator.request("feed", room="alice"))["entries"]
    assert [e["transfer"] for e in entries] == [res["transfer"]]


async def test_client_retries_same_key_through_an_outage(own_store, start_hub, connect):
    hub = await start_hub(url=own_store.url, store_timeout=1.0)
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 100)
    await bob.request("join", room="alice")
    own_store.stop()
    failed = asyncio.Event()
    attempt = asyncio.create_task(
        bob.send_gift(
            "alice",
            "star",
            key="outage",
            attempts=30,
            backoff=0.05,
            on_retry=lambda _n, _e: failed.set(),
        )
    )
    async with asyncio.timeout(T):  # a first attempt failed while the store was down
        await failed.wait()
    own_store.start()
    async with asyncio.timeout(3 * T):
        res = await attempt
    assert res["coins"] == 90
    assert (await balances(hub))["bob"] == 90


async def test_client_retries_after_dropped_connection(hub, connect):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 100)
    await bob.request("join", room="alice")
    first = await bob.request("gift", room="alice", gift="star", key="drop")
    await bob.ws.close()  # the answer was lost with the connection, say
    again = await bob.send_gift("alice", "star", key="drop")
    assert again == {**first, "duplicate": True}
    assert "alice" in bob.rooms and (await balances(hub))["bob"] == 90


@pytest.fixture
def password_store(tmp_path):
    """A store that demands a password (as a managed Redis/Valkey would)."""
    from gifting.store import _free_port, binary_path

    port = _free_port()
    proc = subprocess.Popen(
        [str(binary_path()), "--port", str(port), "--bind", "127.0.0.1"]
        + ["--requirepass", "s3cret pass", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port, proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("userinfo", [":s3cret%20pass", "default:s3cret%20pass"])
async def test_hub_authenticates_to_a_password_store(password_store, start_hub, connect, userinfo):
    port, proc = password_store
    url = f"redis://{userinfo}@127.0.0.1:{port}/0"

    async def ready() -> bool:
        r = aioredis.Redis.from_url(url)
        try:
            return bool(await r.ping())
        except (OSError, rex.ConnectionError):
            return False
        finally:
            await r.aclose()

    await _until(ready, "password store up")
    hub = await start_hub(url=url)
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 10)
    await bob.request("join", room="alice")
    res = await bob.request("gift", room="alice", gift="rose", key="k1")  # the pipeline
    assert res["coins"] == 9
    assert (await bob.request("balance"))["coins"] == 9  # a pipelined read
    assert (await creator.next_event("bubble"))["gift"] == "rose"  # the bus


async def test_a_store_out_of_memory_is_unavailable_not_internal(own_store, start_hub):
    hub = await start_hub(url=own_store.url)
    r = aioredis.Redis.from_url(own_store.url)
    try:
        await r.config_set("maxmemory", 1)
        with pytest.raises(errors.Unavailable):
            await hub.ledger.topup("bob", 5, "oom-1")  # OOM: not a verdict on the call
    finally:
        await r.config_set("maxmemory", 0)
        await r.aclose()
    assert (await hub.ledger.topup("bob", 5, "oom-1")).coins == 5


async def test_an_unreadable_store_answer_fails_one_batch_not_the_hub(hub, connect, monkeypatch):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 100)
    await bob.request("join", room="alice")
    real = hub.ledger._run_batch
    calls = 0

    async def once_broken(pipe, batch):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a reply the parser could not read")  # fault injection
        return await real(pipe, batch)

    monkeypatch.setattr(hub.ledger, "_run_batch", once_broken)
    with pytest.raises(errors.Unavailable):
        await bob.request("gift", room="alice", gift="rose", key="k1")
    # the pipeline worker lives on: the retry with the same key goes through, once
    res = await bob.request("gift", room="alice", gift="rose", key="k1")
    assert res["coins"] == 99
    assert (await bob.request("gift", room="alice", gift="rose", key="k1"))["duplicate"] is True
    assert hub.metrics.store_errors["pipeline"] == 1  # counted, and both workers still run
