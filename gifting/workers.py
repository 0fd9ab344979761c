"""``gifting serve --workers N``: N hub processes on one port and one store, supervised.

Each worker is a whole ``gifting serve`` process (its own hub, hub id, event
loop and store connections) listening with ``SO_REUSEPORT`` on the same port,
so the kernel spreads new connections over them and one busy hub cannot hold
up the others. Hubs on one store already share rooms (pub/sub, presence per
hub with an expiry), so a room's members may sit on any worker.

The parent only supervises: it reserves the port, starts the workers, passes
on the first worker's ready line once every worker listens, restarts a worker
that exits (with backoff), and on ``stop`` sends every worker SIGTERM, which
drains each one exactly as a single ``serve`` drains (``Hub.going_away``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gifting.logs import event

__all__ = ["READY_PREFIX", "WorkerFailed", "cpu_count", "reserve_port", "supervise"]

log = logging.getLogger("gifting.workers")

# What a worker prints on stdout once it listens (``cli._run``).
READY_PREFIX = "gifting: serving "
# Restart delays: doubling from the first to the last; a worker that served
# this long before it exited starts the doubling over. A worker that keeps
# dying at start-up (its port taken, its store gone) thus costs a start every
# few seconds, not a busy loop of Python start-ups.
_BACKOFF_FIRST = 0.1
_BACKOFF_LAST = 5.0
_STABLE = 10.0
# Seconds the workers have to drain after SIGTERM before they are killed. A
# hub's own drain is bounded by about 6 s (store timeout, then the clients'
# close); this leaves the parent time to stop the store within the contract's
# 10 s from SIGTERM to exit.
DRAIN_TIMEOUT = 8.0


class WorkerFailed(Exception):
    """A worker exited before it listened, while the workers were starting."""


def cpu_count() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound with ``SO_REUSEPORT`` to ``host:port``, never listening.

    With port 0 it picks the free port that every worker then binds. Only
    listening sockets take connections, so it takes none; but while the parent
    holds it no other program can take the port, even in the moment when every
    worker is being restarted. A port already used without ``SO_REUSEPORT``
    fails here, before any worker starts.
    """
    family, type_, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


# (worker index, first start of that worker) -> its command line
Command = Callable[[int, bool], Sequence[str]]


class _Workers:
    def __init__(self, n: int, command: Command, env: Mapping[str, str]) -> None:
        self.n = n
        self.command = command
        self.env = dict(env)
        loop = asyncio.get_running_loop()
        # Each worker's first ready line (or WorkerFailed), for ``started``.
        self.first: list[asyncio.Future[str]] = [loop.create_future() for _ in range(n)]
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def slot(self, index: int) -> None:
        """Run worker ``index`` until ``stopping``, restarting it when it exits."""
        first = self.first[index]
        loop = asyncio.get_running_loop()
        starts = 0
        delay = _BACKOFF_FIRST
        while not self.stopping.is_set():
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.command(index, starts == 0),
                    # Never written to: a worker whose stdin ends (this process
                    # died, even by SIGKILL) drains and exits, not orphaned.
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=self.env,
                )
            except OSError as exc:
                event(log, logging.ERROR, "worker.spawn_failed", worker=index, error=str(exc))
                if not first.done():
                    first.set_exception(WorkerFailed(f"worker {index} could not start: {exc}"))
                    return
            else:
                starts += 1
                began = loop.time()
                rc = await self._run_one(index, proc, starts)
                if self.stopping.is_set():
                    event(log, logging.INFO, "worker.stopped", worker=index, pid=proc.pid, code=rc)
                    return
                if not first.done():
                    first.set_exception(
                        WorkerFailed(f"worker {index} exited with {rc} before it was listening")
                    )
                    return
                event(log, logging.WARNING, "worker.exited", worker=index, pid=proc.pid, code=rc)
                if loop.time() - began >= _STABLE:
                    delay = _BACKOFF_FIRST
            event(log, logging.INFO, "worker.restarting", worker=index, delay=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()
            delay = min(delay * 2, _BACKOFF_LAST)

    async def _run_one(self, index: int, proc: asyncio.subprocess.Process, starts: int) -> int:
        """One worker process, from its start to its exit code (-N: killed by signal N)."""
        self.procs[index] = proc
        try:
            event(log, logging.INFO, "worker.started", worker=index, pid=proc.pid, start=starts)
            if self.stopping.is_set():  # started while the others were being signalled
                proc.send_signal(signal.SIGTERM)
            assert proc.stdout is not None
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                if line.startswith(READY_PREFIX):
                    event(log, logging.INFO, "worker.ready", worker=index, pid=proc.pid)
                    if not self.first[index].done():
                        self.first[index].set_result(line.rstrip("\n"))
                    break
            await proc.stdout.read()  # nothing more is printed; EOF comes with the exit
            return await proc.wait()
        finally:
            del self.procs[index]

    async def started(self, stop: asyncio.Event) -> str | None:
        """Worker 0's ready line once every worker listens; None if ``stop`` came first."""
        ready = asyncio.gather(*self.first)
        stopped = asyncio.ensure_future(stop.wait())
        waiters: list[asyncio.Future[Any]] = [ready, stopped]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not ready.done():
                ready.cancel()
        if ready.done() and not ready.cancelled():
            return ready.result()[0]  # raises WorkerFailed
        return None

    async def shutdown(self, slots: Sequence[asyncio.Task[None]], timeout: float) -> None:
        """SIGTERM every worker and wait for all; kill those still there after ``timeout``."""
        self.stopping.set()
        event(log, logging.INFO, "workers.stopping", workers=len(self.procs))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait(slots)
        except TimeoutError:
            for index, proc in self.procs.items():
                event(log, logging.WARNING, "worker.killed", worker=index, pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.wait(slots)


async def supervise(
    n: int,
    command: Command,
    *,
    env: Mapping[str, str],
    stop: asyncio.Event,
    ready: Callable[[str], None],
    drain_timeout: float = DRAIN_TIMEOUT,
) -> None:
    """Run ``n`` workers until ``stop`` is set, then drain them all.

    ``ready`` gets worker 0's ready line once every worker listens. A worker
    that exits is started again; one that exits before it ever listened makes
    the whole start fail: the others are stopped and ``WorkerFailed`` raised.
    """
    workers = _Workers(n, command, env)
    failure: WorkerFailed | None = None
    event(log, logging.INFO, "workers.starting", workers=n)
    async with asyncio.TaskGroup() as tg:
        slots = [tg.create_task(workers.slot(i)) for i in range(n)]
        try:
            line = await workers.started(stop)
            if line is not None:
                event(log, logging.INFO, "workers.ready", workers=n)
                ready(line)
                await stop.wait()
        except WorkerFailed as exc:
            failure = exc
        finally:
            await workers.shutdown(slots, drain_timeout)
    event(log, logging.INFO, "workers.stopped")
    if failure is not None:
        raise failure
