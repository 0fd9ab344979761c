"""The hub's own pub/sub reader, with the C (hiredis) and the pure-Python reply parser.

Both must hand every message to the handler whole and in order, whatever the
payload holds (protocol bytes such as CRLF, large bodies split over many reads).
"""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest
import redis.asyncio as aioredis

from gifting import resp
from gifting.bus import Bus
from tests.conftest import T


def test_hiredis_is_installed_for_the_tests() -> None:
    # Otherwise the C parser path below would silently test the Python one twice.
    assert resp._HIREDIS is not None


@pytest.mark.parametrize("use_hiredis", [True, False], ids=["hiredis", "python"])
async def test_messages_arrive_whole_and_in_order(
    store_url: str, redis_client: aioredis.Redis, use_hiredis: bool
) -> None:
    got: list[tuple[bytes, bytes]] = []
    want_n = 0
    done = asyncio.Event()

    def on_message(channel: bytes, data: bytes) -> None:
        got.append((channel, data))
        if len(got) >= want_n:
            done.set()

    # A tagged channel and the key of its slot: on a cluster the bus
    # subscribes on the master that serves it.
    tag = "{test" + secrets.token_hex(4) + "}"
    b = Bus(store_url, on_message, timeout=T, use_hiredis=use_hiredis, slot_key=tag)
    runner = asyncio.create_task(b.run())
    try:
        ch = f"{tag}:bus"
        await b.subscribe(ch)
        payloads = [
            b"",
            b"plain",
            b"\r\n*3\r\n$7\r\nmessage\r\n",  # RESP inside a payload
            bytes(range(256)),
            os.urandom(200_000),  # many reads
            *(b"n%d" % i for i in range(500)),
        ]
        want_n = len(payloads)
        async with redis_client.pipeline(transaction=False) as p:
            for data in payloads:
                p.spublish(ch, data)
            assert all(n == 1 for n in await p.execute())
        async with asyncio.timeout(T):
            await done.wait()
        assert got == [(ch.encode(), data) for data in payloads]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
