import asyncio

from tests.conftest import T, balances, topup


async def test_gift_end_to_end(hub, connect):
    creator = await connect(hub, "alice")
    viewer = await connect(hub, "bob")
    other = await connect(hub, "carol")
    await topup(hub, "bob", 100)
    live = await creator.request("go_live", title="hello")
    assert live["room"] == "alice"
    j = await viewer.request("join", room="alice")
    assert j["live"] is True and j["role"] == "viewer"
    await other.request("join", room="alice")
    res = await viewer.send_gift("alice", "heart", count=2)
    assert res["coins"] == 90 and res["duplicate"] is False and res["combo"] == 1
    async with asyncio.timeout(T):
        b1 = await other.next_event("bubble")
        b2 = await viewer.next_event("bubble")
        g = await creator.next_event("gift")
    assert b1 == b2
    assert b1["from"] == {"user": "bob", "name": "Bob", "avatar": None}
    assert g["earned"] == 5 and g["coins"] == 10
    assert (await balances(hub))["alice"] == 5
