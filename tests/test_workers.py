"""``gifting serve --workers N``: N hub processes on one port and one store, supervised.

Each test runs the real console script with its embedded Valkey. Which
worker a connection landed on is read from the log: each worker logs
``hub.ready hub=<id> ... worker=<n>``, and ``conn.open conn=<hub>.<n>
peer=<client address>`` for each connection; plain HTTP requests tell by the
``gifting_hub_info{hub=...}`` in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator

from gifting.config import Config
from protocol.client import Client
from tests.conftest import T
from tests.test_cli import SLOW, _pid_alive, cli
from tests.test_shutdown import (
    EXIT_WITHIN,
    Served,
    _Lines,
    _metrics,
    _store_pid,
    _token,
    _topup,
    served,
)

_HUB_READY = re.compile(r"hub\.ready hub=(\S+) .*worker=(\d+)")
_CONN_OPEN = re.compile(r"conn\.open conn=([^.\s]+)\.\d+ ")


def _text(log: _Lines) -> str:
    return "".join(log.lines)


async def _match(log: _Lines, pattern: str, count: int = 1) -> list[re.Match[str]]:
    """Wait until ``count`` log lines match ``pattern``; return the matches."""
    rx = re.compile(pattern)

    def found() -> list[re.Match[str]]:
        return [m for line in log.lines if (m := rx.search(line))]

    async with asyncio.timeout(SLOW), log._cond:
        await log._cond.wait_for(lambda: log.eof or len(found()) >= count)
    matches = found()
    assert len(matches) >= count, f"{pattern!r} x{count} not logged; log:\n{log.text()}"
    return matches


async def _hubs(log: _Lines, n: int) -> dict[str, int]:
    """hub id -> worker index, once ``n`` workers have logged ``hub.ready``."""
    await log.wait("workers.ready")
    return {m[1]: int(m[2]) for m in await _match(log, _HUB_READY.pattern, n)}


async def _pid(log: _Lines, worker: int) -> int:
    """The pid of worker ``worker``'s latest process."""
    return int((await _match(log, rf"worker\.ready worker={worker} pid=(\d+)"))[-1][1])


async def _hub_of(log: _Lines, c: Client) -> str:
    """The hub a client's connection landed on (its ``conn.open`` line)."""
    assert c.ws is not None
    port = c.ws.local_address[1]
    line = await log.wait(f" peer=127.0.0.1:{port} ")
    m = _CONN_OPEN.search(line)
    assert m, line
    return m[1]


async def _metrics_hub(port: int) -> str:
    m = re.search(r'gifting_hub_info\{hub="([^"]+)"', await _metrics(port))
    assert m
    return m[1]


async def _until_hub(port: int, wanted: set[str]) -> set[str]:
    """Plain HTTP requests (each a new connection) until all of ``wanted`` answered."""
    seen: set[str] = set()
    async with asyncio.timeout(SLOW):
        while not wanted <= seen:
            seen.add(await _metrics_hub(port))
    return seen


@contextlib.asynccontextmanager
async def _clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


async def _connect(s: Served, tok: str, opened: list[Client], **kw: object) -> Client:
    c = await Client.connect(s.ws, token=tok, timeout=T, **kw)
    opened.append(c)
    return c


async def _on(s: Served, tok: str, opened: list[Client], hub: str, *, other: bool) -> Client:
    """A connection on hub ``hub`` (``other``: on any other hub); the kernel
    picks the worker, so connect until one lands where wanted."""
    async with asyncio.timeout(SLOW):
        while True:
            c = await _connect(s, tok, opened)
            if (await _hub_of(s.log, c) == hub) != other:
                return c
            await c.close()


async def _presence(c: Client, n: int, timeout: float = SLOW) -> None:
    async with asyncio.timeout(timeout):
        while (await c.next_event("presence", timeout=timeout))["viewers"] != n:
            pass


async def test_workers_share_the_port_the_store_and_the_rooms(tmp_path):
    data = tmp_path / "data"
    async with served(data, "--workers", "2") as s, _clients() as opened:
        hubs = await _hubs(s.log, 2)
        assert sorted(hubs.values()) == [0, 1]
        assert _text(s.log).count("hub.ready") == 2
        # New connections land on both workers.
        assert await _until_hub(s.port, set(hubs)) == set(hubs)

        alice_tok, bob_tok, carol_tok, _ = await asyncio.gather(
            _token(data, "alice"),
            _token(data, "bob"),
            _token(data, "carol"),
            _topup(data, "bob", 100),
        )
        alice = await _connect(s, alice_tok, opened)
        home = await _hub_of(s.log, alice)
        bob = await _on(s, bob_tok, opened, home, other=True)
        carol = await _on(s, carol_tok, opened, home, other=False)
        await alice.request("go_live")
        # Viewers on both workers: each sees the room-wide count.
        assert (await bob.request("join", room="alice"))["viewers"] == 1
        assert (await carol.request("join", room="alice"))["viewers"] == 2
        await _presence(alice, 2)

        # A gift on one worker reaches the creator and the room on the other.
        sent = await bob.send_gift("alice", "heart", key="g1")
        async with asyncio.timeout(T):
            gift = await alice.next_event("gift")
            bubbles = [await c.next_event("bubble") for c in (alice, bob, carol)]
        assert gift["transfer"] == sent["transfer"] and gift["from"]["user"] == "bob"
        assert all(b["from"]["user"] == "bob" and b["gift"] == "heart" for b in bubbles)

        # SIGTERM drains every worker: bye 1001 on both, exit 0 in time, store gone.
        pids = [await _pid(s.log, i) for i in (0, 1)]
        s.sigterm()
        for c in (alice, bob, carol):
            assert await c.wait_closed(timeout=EXIT_WITHIN) == 1001
            assert [b["code"] for b in c.drain("bye")] == [1001]
        assert await s.exited() < EXIT_WITHIN
        assert _text(s.log).count("hub.stopped") == 2
        assert s.proc.stdout is not None and await s.proc.stdout.read() == b"", "one ready line"
        assert not any(_pid_alive(p) for p in pids)
        assert not _pid_alive(s.store_pid), "serve left its valkey-server running"
        assert not (data / "store.json").exists()


async def test_a_killed_worker_is_restarted_and_its_viewers_stop_counting(tmp_path):
    data = tmp_path / "data"
    async with served(data, "--workers", "2") as s, _clients() as opened:
        hubs = await _hubs(s.log, 2)
        alice_tok, bob_tok, carol_tok = await asyncio.gather(
            _token(data, "alice"), _token(data, "bob"), _token(data, "carol")
        )
        alice = await _connect(s, alice_tok, opened)
        home = await _hub_of(s.log, alice)
        bob = await _on(s, bob_tok, opened, home, other=True)
        victim = hubs[await _hub_of(s.log, bob)]
        carol = await _on(s, carol_tok, opened, home, other=False)
        await alice.request("go_live")
        await bob.request("join", room="alice")
        await carol.request("join", room="alice")
        await _presence(alice, 2)

        pid = await _pid(s.log, victim)
        killed = asyncio.get_running_loop().time()
        os.kill(pid, signal.SIGKILL)
        await s.log.wait(f"worker.exited worker={victim} pid={pid} code=-9")
        assert await bob.wait_closed(timeout=T) == 1006
        # A new process, with a new hub id, takes the worker's place and serves.
        ready = await _match(s.log, _HUB_READY.pattern, 3)
        new = {m[1] for m in ready if int(m[2]) == victim} - set(hubs)
        assert len(new) == 1, [m[0] for m in ready]
        assert new <= await _until_hub(s.port, new)
        bob = await _on(s, bob_tok, opened, new.pop(), other=False)
        assert (await bob.request("ping"))["time"] > 0
        # The dead hub's viewer stops counting once its heartbeat expires (5 ticks).
        await _presence(alice, 1)
        assert asyncio.get_running_loop().time() - killed < 5 * Config().tick + 0.4 * T
        assert (await bob.request("join", room="alice"))["viewers"] == 2
        s.sigterm()
        await s.exited()


async def test_workers_auto_is_one_per_cpu(tmp_path):
    n = min(len(os.sched_getaffinity(0)), 256)
    async with served(tmp_path / "data", "--workers", "auto") as s:
        assert len(await _hubs(s.log, n)) == n
        await s.log.wait(f"workers.ready workers={n}")
        s.sigterm()
        await s.exited()


async def test_one_worker_is_the_plain_hub(tmp_path):
    async with served(tmp_path / "data", "--workers", "1") as s:
        await s.log.wait("hub.ready")
        s.sigterm()
        await s.exited()
    text = _text(s.log)
    assert "workers.starting" not in text and "worker=" not in text, "a supervisor started"


async def test_bad_workers_values_are_refused(tmp_path):
    d = ("--data-dir", str(tmp_path / "data"), "--port", "0")
    runs = await asyncio.gather(
        *(cli("serve", "--workers", bad, *d) for bad in ("0", "-1", "x", "1.5", "", "257"))
    )
    for ran in runs:
        assert ran.rc == 2 and ran.out == "", ran
        assert "--workers" in ran.err
    assert not (tmp_path / "data" / "store.json").exists()


async def test_a_worker_that_cannot_start_fails_the_start(tmp_path):
    data = tmp_path / "data"
    ran = await cli(
        "serve", "--workers", "2", "--port", "0", "--data-dir", str(data),
        "--redis-url", "redis://127.0.0.1:1/0",
    )  # fmt: skip
    assert ran.rc == 1 and ran.out == "", ran
    assert "before it was listening" in ran.err


async def test_sigterm_while_workers_start(tmp_path):
    data = tmp_path / "data"
    async with served(data, "--workers", "2", ready=False) as s:
        await s.log.wait("worker.started worker=1")
        store_pid = _store_pid(data)
        s.sigterm()
        await s.exited()
        assert s.proc.stdout is not None and await s.proc.stdout.read() == b""
        assert not _pid_alive(store_pid)
        assert not (data / "store.json").exists()


async def test_workers_drain_when_their_parent_is_killed(tmp_path):
    data = tmp_path / "data"
    async with served(data, "--workers", "2") as s, _clients() as opened:
        await _hubs(s.log, 2)
        pids = [await _pid(s.log, i) for i in (0, 1)]
        c = await _connect(s, await _token(data, "alice"), opened)
        s.proc.kill()  # no chance to stop its workers
        # Their stdin (a pipe from the parent) ends: each drains and exits.
        assert await c.wait_closed(timeout=EXIT_WITHIN) == 1001
        async with asyncio.timeout(EXIT_WITHIN):
            await asyncio.gather(*map(_exited, pids))


async def _exited(pid: int) -> None:
    """Wait for a process that is not our child to exit (a pidfd reads ready then)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)
