"""Daily spend caps, enforced inside the gift script: a minor's account (token
claim ``minor``) and, when configured, every account."""

import pytest

from protocol import errors
from tests.conftest import balances, token, topup


async def _viewer(hub, connect, user, *, minor=False, coins=1000):
    c = await connect(hub)
    await c.request("auth", token=token(user, minor=minor))
    await topup(hub, user, coins)
    await c.request("join", room="alice")
    return c


async def _live(hub, connect):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    return creator


async def test_minor_is_capped_per_day_and_a_refused_gift_moves_nothing(start_hub, connect):
    hub = await start_hub(minor_daily_spend_cap=100)
    await _live(hub, connect)
    kid = await _viewer(hub, connect, "kid", minor=True)
    adult = await _viewer(hub, connect, "adult")
    first = await kid.request("gift", room="alice", gift="cake", key="k1")  # 50
    await kid.request("gift", room="alice", gift="star", count=4, key="k2")  # 90
    before = await balances(hub)
    with pytest.raises(errors.SpendLimit) as exc:
        await kid.request("gift", room="alice", gift="star", count=2, key="k3")  # 110 > 100
    assert "100" in str(exc.value)
    assert await balances(hub) == before
    # Up to the cap exactly is fine; a retry of an earlier gift is still its first answer.
    await kid.request("gift", room="alice", gift="star", key="k4")  # 100
    again = await kid.request("gift", room="alice", gift="cake", key="k1")
    assert again == {**first, "duplicate": True}
    with pytest.raises(errors.SpendLimit):
        await kid.request("gift", room="alice", gift="rose", key="k5")
    # The cap is per user, not per connection: a second connection is capped too.
    kid2 = await _viewer(hub, connect, "kid", minor=True, coins=1)
    with pytest.raises(errors.SpendLimit):
        await kid2.request("gift", room="alice", gift="rose", key="k6")
    # Accounts without the claim are not capped (no general cap configured).
    await adult.request("gift", room="alice", gift="castle", count=1, key="a1")  # 500
    bals = await balances(hub)
    assert bals["kid"] == 1001 - 100 and bals["adult"] == 500
    assert sum(bals.values()) == 0


async def test_a_general_daily_cap_applies_to_everyone(start_hub, connect):
    hub = await start_hub(daily_spend_cap=60, minor_daily_spend_cap=10)
    await _live(hub, connect)
    bob = await _viewer(hub, connect, "bob")
    kid = await _viewer(hub, connect, "kid", minor=True)
    await bob.request("gift", room="alice", gift="cake", key="b1")
    await bob.request("gift", room="alice", gift="star", key="b2")
    with pytest.raises(errors.SpendLimit):
        await bob.request("gift", room="alice", gift="rose", key="b3")
    await kid.request("gift", room="alice", gift="star", key="c1")
    with pytest.raises(errors.SpendLimit):
        await kid.request("gift", room="alice", gift="rose", key="c2")
    assert (await balances(hub))["bob"] == 940


async def test_without_caps_nothing_is_counted(start_hub, connect, redis_client):
    hub = await start_hub(daily_spend_cap=0, minor_daily_spend_cap=0)
    await _live(hub, connect)
    kid = await _viewer(hub, connect, "kid", minor=True, coins=5000)
    for k in range(3):
        await kid.request("gift", room="alice", gift="castle", key=f"k{k}")
    # SCAN, not KEYS: on a cluster KEYS asks one node, SCAN every master.
    keys = [k async for k in redis_client.scan_iter(match=f"{hub.ledger.tag}:spent:*")]
    assert keys == []
