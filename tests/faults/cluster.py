"""A store and the hubs on it, started, killed and restarted for fault runs.

A ``Cluster`` is one store (an ``EmbeddedStore`` with ``appendfsync always``,
started here) and any number of ``gifting serve --redis-url`` processes on it,
all under one key prefix. Hubs can be killed with SIGKILL and new ones
started; the store can be stopped (or killed) and started again from the same
directory, at the same address. Afterwards ``Cluster.violations`` compares
what the senders were told with what the store holds (``checks``), and
``Cluster.audit`` runs ``gifting audit`` on the prefix.

Shared by ``tests/faults/`` and ``scripts/chaos.py``: imports only ``gifting``,
``protocol`` and the other fault modules, never pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from gifting import auth
from gifting.ledger import Ledger
from gifting.store import EmbeddedStore
from protocol.client import new_key
from tests.faults.checks import StoreState, money_violations
from tests.faults.clients import Ack, Sender, Viewer

__all__ = ["GIFTING", "Cluster", "HubProc"]

_SCRIPT = Path(sys.executable).with_name("gifting")
GIFTING = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gifting"]
READY = re.compile(r"gifting: serving http://127\.0\.0\.1:(\d+)/\S*\n")


def _env(secret: bytes) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTING_")}
    env["GIFTING_SECRET"] = secret.decode()
    return env


@dataclass(eq=False)
class HubProc:
    """One ``gifting serve`` process."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    killed: bool = False  # set before the SIGKILL, so no one picks it meanwhile

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.returncode is None

    async def kill9(self, timeout: float) -> int:
        """SIGKILL: no shutdown, no goodbye; what the clients see is a dropped connection."""
        self.killed = True
        if self.proc.returncode is None:
            self.proc.kill()
        return await self._reap(timeout)

    async def stop(self, timeout: float) -> int:
        """SIGTERM (graceful), SIGKILL if it is not gone within ``timeout``."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
        return await self._reap(timeout)

    async def _reap(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            rc = await self.proc.wait()
            if self.proc.stdout is not None:
                await self.proc.stdout.read()  # to EOF, or its pipe transport lingers
        return rc

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class Cluster:
    """A store, the hubs on it, one key prefix; ``async with Cluster(dir, secret=...)``."""

    def __init__(
        self,
        workdir: Path,
        *,
        secret: bytes,
        timeout: float = 5.0,
        prefix: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = workdir
        self.secret = secret
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.prefix = prefix or "f" + uuid.uuid4().hex[:10]
        self.store = EmbeddedStore(workdir / "s", fsync="always")
        self.url = ""
        self.hubs: list[HubProc] = []
        self.topups: dict[str, int] = {}
        self.senders: list[Sender] = []
        self.viewers: list[Viewer] = []
        self._names = itertools.count(1)

    async def __aenter__(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.start_store()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- store

    async def start_store(self) -> None:
        url = await asyncio.to_thread(self.store.start)
        if self.url and url != self.url:
            # Hubs hold the old address: the socket path was too long for a
            # unix socket and a new TCP port was taken. Use a shorter workdir.
            raise RuntimeError(f"the store came back at {url}, not {self.url}")
        self.url = url

    async def stop_store(self, *, kill: bool = False) -> None:
        """SIGTERM (the store flushes and exits) or SIGKILL (only fsynced writes stay)."""
        await asyncio.to_thread(self.store.kill if kill else self.store.stop)

    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        # A client per use: the store may have restarted since the last one.
        r = aioredis.Redis.from_url(self.url, socket_timeout=self.timeout)
        try:
            yield r
        finally:
            await r.aclose()

    async def topup(self, user: str, coins: int) -> int:
        async with self._redis() as r:
            res = await Ledger(r, prefix=self.prefix).topup(user, coins, "fault:" + new_key())
        self.topups[user] = self.topups.get(user, 0) + coins
        return res.coins

    async def go_live(self, room: str) -> int:
        async with self._redis() as r:
            return (await Ledger(r, prefix=self.prefix).go_live(room, "fault test")).session

    async def room_seq(self, room: str) -> int:
        async with self._redis() as r:
            seq: Any = await r.hget(f"{{{self.prefix}}}:room:{room}", "seq")
        return int(seq or 0)

    async def read_state(self) -> StoreState:
        journal: list[dict[str, str]] = []
        key = f"{{{self.prefix}}}:journal"
        async with self._redis() as r:
            start = "-"
            while True:
                rows: Any = await r.xrange(key, start, "+", count=1000)
                for _id, fields in rows:
                    journal.append({k.decode(): v.decode() for k, v in fields.items()})
                if len(rows) < 1000:
                    break
                start = "(" + rows[-1][0].decode()
            raw: Any = await r.hgetall(f"{{{self.prefix}}}:bal")
        return StoreState(journal, {k.decode(): int(v) for k, v in raw.items()})

    async def violations(
        self, acks: list[Ack], *, creators: dict[str, int] | None = None, complete: bool = True
    ) -> list[str]:
        state = await self.read_state()
        return money_violations(
            state, topups=self.topups, acks=acks, creators=creators, complete=complete
        )

    async def audit(self) -> tuple[int, str]:
        """``gifting audit --redis-url URL --prefix P``: (exit status, output)."""
        proc = await asyncio.create_subprocess_exec(
            *GIFTING,
            "audit",
            "--redis-url",
            self.url,
            "--prefix",
            self.prefix,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=_env(self.secret),
            cwd=self.workdir,
        )
        try:
            async with asyncio.timeout(self.start_timeout):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    # -- hubs

    async def start_hub(self, *extra: str) -> HubProc:
        name = f"h{next(self._names)}"
        data = self.workdir / name
        data.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *GIFTING,
                "serve",
                "--port",
                "0",
                "--no-demo",
                "--redis-url",
                self.url,
                "--prefix",
                self.prefix,
                "--data-dir",
                str(data),
                "--log-level",
                "WARNING",
                *extra,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=_env(self.secret),
                cwd=self.workdir,
            )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self.start_timeout):
                line = (await proc.stdout.readline()).decode()
        except TimeoutError:
            line = ""
        m = READY.fullmatch(line)
        hub = HubProc(name, proc, int(m.group(1)) if m else 0, log)
        if m is None:
            await hub.kill9(self.timeout)
            raise RuntimeError(f"hub {name} did not start: {line!r}\n{hub.log_tail()}")
        self.hubs.append(hub)
        return hub

    def live(self) -> list[HubProc]:
        return [h for h in self.hubs if h.alive]

    def pick_url(self, rng: random.Random | None = None) -> str:
        """A live hub's URL (any hub's if none is live: the connect fails, and is retried)."""
        pool = self.live() or self.hubs
        if not pool:
            raise RuntimeError("no hub started")
        return (rng or random).choice(pool).url

    async def healthz(self, hub: HubProc) -> int | None:
        """``GET /healthz``'s status, None if the hub did not answer."""
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
                try:
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    await writer.drain()
                    status = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            return int(status.split()[1])
        except (OSError, IndexError, ValueError):
            return None

    async def until_health(self, hub: HubProc, status: int) -> None:
        """Poll ``/healthz`` until it answers ``status`` (under the caller's deadline):
        another process's state has no event to await."""
        while await self.healthz(hub) != status:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    # -- users

    def token(self, user: str) -> str:
        return auth.mint(self.secret, user, name=user.title())

    async def sender(
        self, user: str, hub: HubProc, rooms: list[str], *, coins: int = 0, **kw: Any
    ) -> Sender:
        """A sender topped up with ``coins``, connected to ``hub``, joined to ``rooms``."""
        if coins:
            await self.topup(user, coins)
        s = Sender(self, user, **kw)
        self.senders.append(s)
        await s.open(hub.url, rooms)
        return s

    async def viewer(self, user: str, hub: HubProc, room: str) -> Viewer:
        v = Viewer(self, user, room)
        self.viewers.append(v)
        await v.open(hub.url)
        return v

    async def close(self) -> None:
        for member in [*self.senders, *self.viewers]:
            await member.close()
        for hub in self.hubs:
            with contextlib.suppress(Exception):
                await hub.stop(self.timeout)
        with contextlib.suppress(Exception):
            await self.stop_store()
