"""Graceful shutdown of a real ``gifting serve`` with its embedded store.

On SIGTERM the hub stops listening at once, lets the commands it already read
finish (a gift under way in the store gets its real answer), then sends every
client ``bye`` 1001 and closes with 1001, stops its store, and exits 0 within
10 s even when a client stopped reading.

To hold a gift "under way in the store" the tests pause the embedded
valkey-server with SIGSTOP, and resume it (SIGCONT) once the hub has logged
that it is draining: the gifts' answers can then only come after the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from tests.conftest import T
from tests.test_cli import (
    GIFTING,
    READY,
    SLOW,
    _pid_alive,
    _stop,
    _store_info,
    clean_env,
    cli,
)
from tests.test_slow_consumer import _read_frames, _send_frame, _stalled_socket

# The contract's bound, not scaled: SIGTERM to exit, whatever the clients do.
EXIT_WITHIN = 10.0


class _Lines:
    """Lines of a stream as they come; ``wait`` awaits one that matches."""

    def __init__(self, copy: Path) -> None:
        self.lines: list[str] = []
        self.eof = False
        self.copy = copy
        self._cond = asyncio.Condition()

    async def pump(self, stream: asyncio.StreamReader) -> None:
        with self.copy.open("a") as out:
            while line := (await stream.readline()).decode(errors="replace"):
                out.write(line)
                out.flush()
                async with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        async with self._cond:
            self.eof = True
            self._cond.notify_all()

    async def wait(self, needle: str, timeout: float = SLOW) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if needle in line), None)

        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: self.eof or found() is not None)
        line = found()
        assert line is not None, f"{needle!r} not logged; log:\n{''.join(self.lines)[-3000:]}"
        return line

    def text(self) -> str:
        return "".join(self.lines)[-3000:]


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    log: _Lines
    port: int = 0
    store_pid: int = 0
    signalled: float = 0.0  # loop time of the SIGTERM

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def sigterm(self) -> None:
        self.signalled = asyncio.get_running_loop().time()
        self.proc.send_signal(signal.SIGTERM)

    async def exited(self) -> float:
        """Await the exit (rc 0) within the bound; return seconds since the SIGTERM."""
        left = self.signalled + EXIT_WITHIN - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(left, 0)):
                rc = await self.proc.wait()
        except TimeoutError:
            raise AssertionError(
                f"serve still running {EXIT_WITHIN} s after SIGTERM; log:\n{self.log.text()}"
            ) from None
        elapsed = asyncio.get_running_loop().time() - self.signalled
        assert rc == 0, f"exit {rc}; log:\n{self.log.text()}"
        return elapsed


@contextlib.asynccontextmanager
async def served(data: Path, *args: str, ready: bool = True) -> AsyncIterator[Served]:
    """``gifting serve --port 0 --no-demo`` on ``data``, its stderr readable line by line.

    On the way out: the process is gone (else SIGTERM, then SIGKILL), and so is
    its valkey-server, which is never left paused.
    """
    proc = await asyncio.create_subprocess_exec(
        *GIFTING,
        "serve",
        "--data-dir",
        str(data),
        "--port",
        "0",
        "--no-demo",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=data.parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    s = Served(proc, _Lines(data.parent / f"serve-{data.name}.log"))
    pump = asyncio.create_task(s.log.pump(proc.stderr))
    try:
        if ready:
            async with asyncio.timeout(SLOW):
                line = (await proc.stdout.readline()).decode()
            m = READY.fullmatch(line)
            assert m, f"not a ready line: {line!r}; log:\n{s.log.text()}"
            s.port = int(m.group(2))
            s.store_pid = int(str(_store_info(data)["pid"]))
        yield s
    finally:
        pid = s.store_pid or _store_pid(data)
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
        await _stop(proc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(T):
                await pump
        pump.cancel()
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _store_pid(data: Path) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(str(_store_info(data)["pid"]))
    return 0


@dataclass
class Raw:
    """A JSON connection that keeps every frame it receives, in order.

    No retries and no reconnects (unlike ``protocol.client``): a lost answer
    stays lost, so the test sees exactly what the hub sent before closing.
    """

    ws: ClientConnection
    frames: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ids: int = 0
    _reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str, token: str) -> AsyncIterator[Raw]:
        async with asyncio.timeout(T):
            ws = await connect(
                f"{url}?token={token}",
                subprotocols=[Subprotocol("gifting.v1.json")],
                open_timeout=T,
            )
        raw = cls(ws)
        raw._reader = asyncio.create_task(raw._read())
        try:
            yield raw
        finally:
            await ws.close()
            raw._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await raw._reader

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                msg = json.loads(frame)
                batch = msg["events"] if msg.get("ev") == "batch" else [msg]
                async with self._cond:
                    self.frames.extend(batch)
                    self._cond.notify_all()
        except ConnectionClosed:
            pass
        finally:
            async with self._cond:
                self.closed = True
                self._cond.notify_all()

    async def send(self, op: str, **args: Any) -> int:
        self._ids += 1
        await self.ws.send(json.dumps({"op": op, "id": self._ids, **args}))
        return self._ids

    async def until(self, done: Callable[[], bool], timeout: float = T) -> None:
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(done)

    def reply(self, id: int) -> dict[str, Any] | None:
        return next((f for f in self.frames if f.get("id") == id), None)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        id = await self.send(op, **args)
        await self.until(lambda: self.reply(id) is not None or self.closed)
        reply = self.reply(id)
        assert reply is not None and "ok" in reply, (op, reply)
        result: dict[str, Any] = reply["ok"]
        return result

    def events(self, ev: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("ev") == ev]


async def _token(data: Path, user: str, *extra: str) -> str:
    ran = await cli("token", user, "--data-dir", str(data), *extra)
    assert ran.rc == 0, ran
    return ran.out.strip()


async def _topup(data: Path, user: str, coins: int) -> None:
    ran = await cli("topup", user, str(coins), "--key", f"seed-{user}", "--data-dir", str(data))
    assert ran.rc == 0, ran


@contextlib.contextmanager
def _paused(pid: int) -> Iterator[None]:
    """The store stops answering (its process is stopped) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_sigterm_answers_gifts_in_flight_then_says_bye(tmp_path):
    data = tmp_path / "data"
    n = 20
    async with served(data) as s:
        alice_tok, bob_tok, _ = await asyncio.gather(
            _token(data, "alice"), _token(data, "bob"), _topup(data, "bob", 1000)
        )
        async with Raw.open(s.ws, alice_tok) as alice, Raw.open(s.ws, bob_tok) as bob:
            await alice.request("go_live")
            await bob.request("join", room="alice")
            before = await bob.request("gift", room="alice", gift="rose", key="before")
            assert before["coins"] == 999
            with _paused(s.store_pid):
                ids = [
                    await bob.send("gift", room="alice", gift="heart", key=f"g{i}")
                    for i in range(n)
                ]
                # Answered in order of reading: once the ping is answered the hub
                # has read every gift, and they all wait on the paused store.
                await bob.request("ping")
                assert all(bob.reply(i) is None for i in ids)
                s.sigterm()
                await s.log.wait("hub.draining")
            # Every gift sent before the signal is answered, then bye, then 1001.
            await bob.until(lambda: bob.closed, timeout=EXIT_WITHIN)
            replies = [bob.reply(i) for i in ids]
            assert all(r is not None for r in replies), f"unanswered gifts: {replies}"
            # The store was back well within its timeout: each answer is the real one.
            assert [sorted(r) for r in replies if r] == [["id", "ok"]] * n, replies
            byes = bob.events("bye")
            assert [b["code"] for b in byes] == [1001], byes
            last_reply = max(bob.frames.index(r) for r in replies if r)
            assert bob.frames.index(byes[0]) > last_reply, "bye came before an answer"
            assert bob.ws.close_code == 1001
            await alice.until(lambda: alice.closed, timeout=EXIT_WITHIN)
            assert [b["code"] for b in alice.events("bye")] == [1001]
            assert alice.ws.close_code == 1001
            await s.exited()
        assert not _pid_alive(s.store_pid), "serve left its valkey-server running"
        assert not (data / "store.json").exists()

    acked = {before["transfer"]} | {r["ok"]["transfer"] for r in replies if r}
    async with served(data) as s:
        audit = await cli("audit", "--data-dir", str(data))
        assert audit.rc == 0 and "audit: OK" in audit.out, audit
        async with Raw.open(s.ws, bob_tok) as bob, Raw.open(s.ws, alice_tok) as alice:
            assert (await bob.request("balance"))["coins"] == 1000 - 1 - 5 * n
            sent = await bob.request("history", limit=500)
            assert {e["transfer"] for e in sent["entries"] if e.get("transfer")} >= acked
            got = await alice.request("history", limit=500)
            assert {e["transfer"] for e in got["entries"] if e.get("transfer")} >= acked
        s.sigterm()
        await s.exited()


async def test_a_client_that_stopped_reading_does_not_hold_the_exit(tmp_path):
    data = tmp_path / "data"
    avatar = "https://example.com/" + "a" * 480
    async with served(data, "--batch-window", "0") as s:
        alice_tok, bob_tok, dave_tok, _ = await asyncio.gather(
            _token(data, "alice"),
            _token(data, "bob", "--name", "B" * 64, "--avatar", avatar),
            _token(data, "dave"),
            _topup(data, "bob", 100_000),
        )
        async with Raw.open(s.ws, alice_tok) as alice, Raw.open(s.ws, bob_tok) as bob:
            await alice.request("go_live")
            await bob.request("join", room="alice")
            stalled = await asyncio.to_thread(_stalled_socket, s.port, dave_tok)
            try:
                _send_frame(stalled, '{"op":"join","id":1,"room":"alice"}')
                # its last read: the join's answer; from here on it reads nothing
                _, texts = await asyncio.to_thread(_read_frames, stalled, 1)
                assert '"role":"viewer"' in texts[0]
                # ~200 KB of bubbles for dave: far more than its socket buffers and
                # the transport's 32 KiB hold, less than its 256 KiB queue.
                sent = 0
                while sent < 300:
                    await asyncio.gather(
                        *(
                            bob.request("gift", room="alice", gift="rose", key=f"k{sent + i}")
                            for i in range(20)
                        )
                    )
                    sent += 20
                # bob sees his own bubbles: once he has the last, so has dave's queue
                await bob.until(lambda: len(bob.events("bubble")) == sent)
                metrics = await _metrics(s.port)
                assert "gifting_slow_consumer_evictions_total 0.0" in metrics, metrics
                s.sigterm()
                await bob.until(lambda: bob.closed, timeout=EXIT_WITHIN)
                assert [b["code"] for b in bob.events("bye")] == [1001]
                elapsed = await s.exited()
                assert elapsed < EXIT_WITHIN
            finally:
                stalled.close()


async def test_a_slow_reader_gets_its_queued_answers_before_bye(tmp_path):
    data = tmp_path / "data"
    avatar = "https://example.com/" + "a" * 480
    async with served(data, "--batch-window", "0") as s:
        alice_tok, bob_tok, dave_tok, *_ = await asyncio.gather(
            _token(data, "alice"),
            _token(data, "bob", "--name", "B" * 64, "--avatar", avatar),
            _token(data, "dave"),
            _topup(data, "bob", 100_000),
            _topup(data, "dave", 100),
        )
        async with Raw.open(s.ws, alice_tok) as alice, Raw.open(s.ws, bob_tok) as bob:
            await alice.request("go_live")
            await bob.request("join", room="alice")
            slow = await asyncio.to_thread(_stalled_socket, s.port, dave_tok)
            try:
                _send_frame(slow, '{"op":"join","id":1,"room":"alice"}')
                _, texts = await asyncio.to_thread(_read_frames, slow, 1)
                assert '"role":"viewer"' in texts[0]
                # dave stops reading; ~250 KB of bubbles back up in front of him
                for k in range(0, 350, 20):
                    await asyncio.gather(
                        *(
                            bob.request("gift", room="alice", gift="rose", key=f"k{k + i}")
                            for i in range(20)
                        )
                    )
                n = 5
                for i in range(n):
                    gift = {"op": "gift", "id": 100 + i, "room": "alice", "gift": "rose"}
                    _send_frame(slow, json.dumps({**gift, "key": f"d{i}"}))
                # dave's gifts are done once bob has their bubbles: their answers
                # wait in dave's queue, behind the backlog
                await bob.until(
                    lambda: (
                        len([b for b in bob.events("bubble") if b["from"]["user"] == "dave"]) == n
                    )
                )
                metrics = await _metrics(s.port)
                assert "gifting_slow_consumer_evictions_total 0.0" in metrics, metrics
                s.sigterm()
                # dave reads again: everything queued, then bye, then close 1001
                code, texts = await asyncio.to_thread(_read_frames, slow, None)
                msgs = [json.loads(t) for t in texts]
                answers = [m for m in msgs if m.get("id") in range(100, 100 + n)]
                assert sorted(m["id"] for m in answers if "ok" in m) == list(range(100, 100 + n))
                assert msgs[-1]["ev"] == "bye" and msgs[-1]["code"] == 1001, msgs[-1]
                assert code == 1001
                await s.exited()
            finally:
                slow.close()


async def test_new_connections_are_refused_after_sigterm(tmp_path):
    data = tmp_path / "data"
    async with served(data) as s:
        alice_tok, bob_tok, carol_tok, _ = await asyncio.gather(
            _token(data, "alice"),
            _token(data, "bob"),
            _token(data, "carol"),
            _topup(data, "bob", 10),
        )
        async with Raw.open(s.ws, alice_tok) as alice, Raw.open(s.ws, bob_tok) as bob:
            await alice.request("go_live")
            await bob.request("join", room="alice")
            with _paused(s.store_pid):
                # A gift held in the paused store keeps the hub draining, not exited.
                gift = await bob.send("gift", room="alice", gift="rose", key="held")
                await bob.request("ping")
                s.sigterm()
                await s.log.wait("hub.draining")
                outcome = await _try_to_connect(s, carol_tok)
                # Turned away while the hub was still draining (the held gift not
                # answered yet), not served, nor closed with everyone at the end.
                assert bob.reply(gift) is None and not bob.events("bye"), outcome
                assert s.proc.returncode is None, "the hub exited before the check"
            assert outcome in ("refused", "503", "closed 1001 unanswered"), outcome
            await bob.until(lambda: bob.closed, timeout=EXIT_WITHIN)
            reply = bob.reply(gift)
            assert reply is not None and "ok" in reply, reply
            assert bob.ws.close_code == 1001
            await s.exited()


async def _try_to_connect(s: Served, tok: str) -> str:
    """What a new client gets from a stopping hub (it must not be served)."""
    try:
        async with Raw.open(s.ws, tok) as carol:
            id = await carol.send("ping")
            await carol.until(lambda: carol.closed or carol.reply(id) is not None)
            if carol.reply(id) is not None:
                return f"served: {carol.reply(id)}"
            return f"closed {carol.ws.close_code} unanswered"
    except OSError:  # ConnectionRefusedError: the listening socket is closed
        return "refused"
    except InvalidStatus as exc:
        return str(exc.response.status_code)


async def _metrics(port: int) -> str:
    async with asyncio.timeout(T):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            body = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return body.decode()


async def test_sigterm_during_startup_still_stops_the_store(tmp_path):
    data = tmp_path / "data"
    async with served(data, ready=False) as s:
        # The store is up, the event loop has not taken the signals over yet.
        await s.log.wait("store.started")
        store_pid = _store_pid(data)
        assert store_pid and _pid_alive(store_pid)
        s.sigterm()
        await s.exited()
        assert not _pid_alive(store_pid), "a SIGTERM at start-up left valkey-server running"
        assert not (data / "store.json").exists()
