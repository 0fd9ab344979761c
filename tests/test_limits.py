"""Abuse limits, all configurable: command and gift rates per connection and per
user, connections per user, rooms per connection. A refused call moves no coin."""

import pytest

from protocol import errors
from tests.conftest import T, balances, token, topup
from tests.test_faults import _until

SLOW = 0.001  # refill per second: nothing comes back during a test


async def test_command_rate_answers_rate_limited_then_closes_4008(start_hub, connect):
    hub = await start_hub(command_rate=SLOW, command_burst=5, rate_limit_strikes=3)
    c = await connect(hub, "alice")  # the auth used one token
    for _ in range(4):
        await c.request("ping")
    for _ in range(2):
        with pytest.raises(errors.RateLimited):
            await c.request("ping")
    with pytest.raises((errors.RateLimited, ConnectionError)):
        await c.request("ping")  # the third strike
    assert await c.wait_closed(T) == 4008
    other = await connect(hub, "bob")  # other users are not affected
    assert (await other.request("ping"))["time"] > 0


async def _room(hub, connect):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    await topup(hub, "bob", 100)


async def test_gift_rate_per_connection_refuses_without_moving_coins(start_hub, connect):
    hub = await start_hub(gift_rate=SLOW, gift_burst=2)
    await _room(hub, connect)
    bob = await connect(hub, "bob")
    await bob.request("join", room="alice")
    await bob.request("gift", room="alice", gift="rose", key="1")
    await bob.request("gift", room="alice", gift="rose", key="2")
    before = await balances(hub)
    with pytest.raises(errors.RateLimited):
        await bob.request("gift", room="alice", gift="rose", key="3")
    # The contract checks the rate before the key: a retry now is refused too.
    with pytest.raises(errors.RateLimited):
        await bob.request("gift", room="alice", gift="rose", key="2")
    assert await balances(hub) == before


async def test_gift_rate_per_user_spans_connections(start_hub, connect):
    hub = await start_hub(user_gift_rate=SLOW, user_gift_burst=3)
    await _room(hub, connect)
    a, b = await connect(hub, "bob"), await connect(hub, "bob")
    for c in (a, b):
        await c.request("join", room="alice")
    await a.request("gift", room="alice", gift="rose", key="1")
    await b.request("gift", room="alice", gift="rose", key="2")
    await a.request("gift", room="alice", gift="rose", key="3")
    with pytest.raises(errors.RateLimited):
        await b.request("gift", room="alice", gift="rose", key="4")
    assert (await balances(hub))["bob"] == 97


async def test_command_rate_per_user_spans_connections(start_hub, connect):
    hub = await start_hub(user_command_rate=SLOW, user_command_burst=4)
    a = await connect(hub, "bob")
    b = await connect(hub, "bob")  # an auth is counted per connection only
    for c in (a, b, a, b):
        await c.request("ping")
    with pytest.raises(errors.RateLimited):
        await a.request("ping")
    carol = await connect(hub, "carol")
    assert (await carol.request("ping"))["time"] > 0


async def test_connections_per_user_are_limited(start_hub, connect):
    hub = await start_hub(max_conns_per_user=2)
    await connect(hub, "bob")
    await connect(hub, "bob")
    third = await connect(hub)
    with pytest.raises(errors.RateLimited):
        await third.request("auth", token=token("bob"))
    # Still open and unauthenticated: another user may use it.
    assert (await third.request("auth", token=token("carol")))["user"] == "carol"
    by_query = await connect(hub, "bob", token_in_query=True)
    assert await by_query.wait_closed(T) == 4008
    assert (await by_query.next_event("bye"))["code"] == 4008


async def test_a_closed_connection_frees_its_place(start_hub, connect):
    hub = await start_hub(max_conns_per_user=1)
    first = await connect(hub, "bob")
    await first.close()
    second = await connect(hub)

    async def authed() -> bool:  # the hub may still be tearing the first one down
        try:
            return (await second.request("auth", token=token("bob")))["user"] == "bob"
        except errors.RateLimited:
            return False

    await _until(authed, "auth after the first connection closed")


async def test_rooms_per_connection_are_limited(start_hub, connect):
    hub = await start_hub(max_rooms_per_conn=2)
    c = await connect(hub, "bob")
    await c.request("join", room="r1")
    await c.request("join", room="r2")
    with pytest.raises(errors.Forbidden):
        await c.request("join", room="r3")
    await c.request("leave", room="r1")
    await c.request("join", room="r3")
