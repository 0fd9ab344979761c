"""Hostile and malformed frames over a real socket: clear errors, nothing moves,
and the connection stays up (except an oversized frame: 1009)."""

import asyncio

import msgpack
import pytest

from tests.conftest import T, balances, topup


@pytest.fixture
async def room(hub, connect):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 100)
    await bob.request("join", room="alice")
    return bob


UNDECODABLE = [
    b"\x00\x01\x02\xff",
    b"\xc1",
    msgpack.packb([1, 2, 3]),
    msgpack.packb("just a string"),
    msgpack.packb({"op": "balance"}),
    msgpack.packb({"op": "balance", "id": "7"}),
    msgpack.packb({"op": "balance", "id": 1.0}),
    msgpack.packb({"op": "balance", "id": None}),
    '{"op": "gift", "id": 1180591620717411303424}',  # 2**70
    b"\x91" * 1000 + b"\x00",  # deep nesting
    "{",
    "[]",
    "null",
    '{"op": "balance", "id": NaN}',
    '{"op": "balance"}',
    "[" * 3000 + "]" * 3000,
    '{"id": ' + "1" * 5000 + "}",
]


@pytest.mark.parametrize("frame", UNDECODABLE, ids=range(len(UNDECODABLE)))
async def test_undecodable_frames_get_error_event(hub, room, frame):
    before = await balances(hub)
    await room.send_raw(frame)
    async with asyncio.timeout(T):
        ev = await room.next_event("error")
    assert ev["code"] == "bad_request" and isinstance(ev["message"], str)
    assert await balances(hub) == before
    assert await room.request("balance") == {"coins": 100}


MALFORMED_WITH_ID = [
    {"id": 5},
    {"id": 5, "op": 7},
    {"id": 5, "op": ["gift"]},
    {"id": 0, "op": "balance"},
    {"id": -1, "op": "balance"},
    {"id": 2**31, "op": "balance"},
    {"id": 5, "op": "gift", "room": {"$ne": 1}, "gift": "rose"},
    {"id": 5, "op": "gift", "room": "alice", "gift": "rose", "count": 1.0},
    {"id": 5, "op": "gift", "room": "alice", "gift": "rose", "count": None, "key": []},
    {"id": 5, "op": "gift", "room": "alice" * 20, "gift": "rose"},
    {"id": 5, "op": "gift", "room": "alice", "gift": "r" * 5000},
    {"id": 5, "op": "gift", "room": "al\u00efce", "gift": "rose"},
    {"id": 5, "op": "join", "room": ""},
    {"id": 5, "op": "join", "room": None},
    {"id": 5, "op": "join", "room": "../etc"},
    {"id": 5, "op": "go_live", "title": "t" * 81},
    {"id": 5, "op": "go_live", "title": 5},
    {"id": 5, "op": "history", "limit": 2**63},
]


@pytest.mark.parametrize("as_json", [False, True], ids=["msgpack", "json"])
@pytest.mark.parametrize("msg", MALFORMED_WITH_ID, ids=range(len(MALFORMED_WITH_ID)))
async def test_malformed_commands_answer_bad_request(hub, room, msg, as_json):
    room.json = as_json  # this frame only: the reply comes in the connection's encoding
    before = await balances(hub)
    try:
        reply = await room.request_raw(msg)
    finally:
        room.json = False
    assert reply["error"]["code"] == "bad_request", reply
    assert await balances(hub) == before
    assert await room.request("balance") == {"coins": 100}


async def test_replies_keep_their_id_whatever_the_frame_type(hub, room):
    assert (await room.request_raw({"op": "nope", "id": 99}))["error"]["code"] == "unknown_op"
    room.json = True  # a text (JSON) frame on a MessagePack connection is read too
    try:
        reply = await room.request_raw({"op": "ping", "id": 98})
    finally:
        room.json = False
    assert reply["id"] == 98 and "time" in reply["ok"]


async def test_out_of_range_id_is_answered_with_it(hub, room):
    for id_ in (2**64 - 1, 2**31, 0, -(2**63)):
        reply = await room.request_raw({"op": "ping", "id": id_})
        assert reply["error"]["code"] == "bad_request"


async def test_huge_count_is_invalid_count(hub, room):
    before = await balances(hub)
    for count in (2**64 - 1, -(2**63), 100):
        reply = await room.request_raw(
            {"op": "gift", "id": 5, "room": "alice", "gift": "rose", "count": count, "key": "k"}
        )
        assert reply["error"]["code"] == "invalid_count"
    assert await balances(hub) == before


async def test_oversized_frame_closes_1009(hub, room):
    before = await balances(hub)
    big = {"op": "gift", "id": 1, "room": "alice", "gift": "rose", "key": "k", "pad": "x" * 17000}
    await room.send_raw(msgpack.packb(big))
    assert await room.wait_closed(T) == 1009
    assert await balances(hub) == before


async def test_frame_just_under_limit_is_fine(hub, room):
    msg = {"op": "ping", "id": 1, "pad": ""}
    msg["pad"] = "x" * (16 * 1024 - len(msgpack.packb(msg)) - 8)
    assert len(msgpack.packb(msg)) <= 16 * 1024
    reply = await room.request_raw(msg)
    assert "time" in reply["ok"]


async def test_unicode_names_pass_through(hub, connect):
    creator = await connect(hub, "alice", name="Ålïcé 🎁 <b>")
    await creator.request("go_live")
    bob = await connect(hub, "bob", name="Bøb \u202e\u0000")
    await topup(hub, "bob", 5)
    await bob.request("join", room="alice")
    await bob.request("gift", room="alice", gift="rose", key="k")
    async with asyncio.timeout(T):
        b = await creator.next_event("bubble")
    assert b["from"]["name"] == "Bøb \u202e\u0000"


async def test_many_bad_frames_then_still_serving(hub, room):
    for i in range(200):
        await room.send_raw(bytes([i % 256]) * (i % 7 + 1))
    async with asyncio.timeout(T):
        for _ in range(200):
            await room.next_event("error")
    assert await room.request("balance") == {"coins": 100}
