"""The store as a single server or a Valkey Cluster: URLs, clients, connections.

A cluster is named by ``redis+cluster://[user:password@]host:port[,host:port...]``
(``valkey+cluster://`` too), or by a plain ``redis://host:port`` with
``--cluster``: the hosts are seeds, any one of them reachable is enough to find
the rest. Every key and channel of one ledger carries one hash tag, so
everything the hub does with the store lives in one slot; the cluster shares
slots, not a ledger, over its masters.

Three kinds of connections reach the store, and each finds the cluster its own way:

- redis-py's client (scripts via ``EVALSHA``, reads, presence) is
  ``RedisCluster``: it learns the slot map from the seeds, follows ``MOVED``
  and re-learns the map when a node dies, so the seed named in the URL may go.
- The bus and the gift pipeline are bare connections (``resp``): a
  ``Connector`` opens each one on the master that serves the ledger's slot,
  asking ``CLUSTER SLOTS`` of any node it knows (the seeds, then every node a
  seed named). Each reconnect asks again, so after a failover they land on the
  new master; a ``MOVED``, ``TRYAGAIN`` or ``CLUSTERDOWN`` reply drops the
  connection, the calls in flight answer ``unavailable`` and the clients retry
  with their keys.

On a single server the same code runs: ``Connector`` opens the URL as it is,
and the client is a plain ``Redis`` on a blocking pool.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from gifting.resp import ReplyError, command, open_node, open_stream, replies

__all__ = [
    "CLUSTER_SCHEMES",
    "Connector",
    "Seeds",
    "StoreClient",
    "as_cluster_url",
    "client",
    "is_cluster",
    "parse",
]

# Everything the hub calls on redis-py's client exists on both.
StoreClient: TypeAlias = aioredis.Redis | RedisCluster

CLUSTER_SCHEMES = frozenset({"redis+cluster", "valkey+cluster"})
# TLS: the bare connections (``resp``) speak plain TCP only, here as for one server.
_TLS_SCHEMES = frozenset({"rediss+cluster", "valkeys+cluster"})


@dataclass(frozen=True, slots=True)
class Seeds:
    """A cluster URL: its seed nodes and the credentials every node takes."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def is_cluster(url: str) -> bool:
    return _scheme(url) in CLUSTER_SCHEMES


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def parse(url: str) -> Seeds:
    """The seeds of a cluster URL (``ValueError`` if it is not one)."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() in _TLS_SCHEMES:
        raise ValueError("TLS to a cluster is not supported")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL (redis+cluster://host:port,...): {scheme}://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    auth, _, hosts = netloc.rpartition("@")
    username = password = None
    if auth:
        user, colon, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # ``redis+cluster://secret@host``: a password alone
            username, password = None, unquote(user)
    nodes = tuple(_host_port(h) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError("a cluster URL names at least one host:port")
    return Seeds(nodes, username, password)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:7000
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return host or "127.0.0.1", int(port or 6379)
    except ValueError:
        raise ValueError(f"bad host:port in a cluster URL: {text!r}") from None


def as_cluster_url(url: str) -> str:
    """``--cluster``: a ``redis://`` or ``valkey://`` URL names one seed of a cluster."""
    if is_cluster(url):
        return url
    u = urlsplit(url)
    if u.scheme not in ("redis", "valkey") or not u.hostname:
        raise ValueError("--cluster needs a redis://host:port URL (a cluster speaks TCP)")
    auth = u.netloc.rpartition("@")[0]
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"redis+cluster://{auth + '@' if auth else ''}{host}:{u.port or 6379}"


def client(url: str, *, timeout: float, max_connections: int = 256) -> StoreClient:
    """redis-py's client for ``url``, for the hub and the CLI alike.

    On a cluster ``max_connections`` is per node and a call past it fails
    (``unavailable``) instead of waiting: redis-py's cluster client has no
    blocking pool."""
    if is_cluster(url):
        seeds = parse(url)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds.nodes],
            username=seeds.username,
            password=seeds.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
        )
    # A burst of calls waits for a free connection (up to the timeout, then
    # ``unavailable``) instead of failing at once.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=max_connections,
        timeout=timeout,
    )
    return aioredis.Redis.from_pool(pool)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Connector:
    """Opens the bare connections of the bus and the gift pipeline.

    ``url`` as it is for a single server; on a cluster, the master serving the
    slot of ``key`` (a key with the ledger's hash tag), looked up anew on every
    ``open``: a connection is opened only at start and after a failure, and
    after a failure the master may have changed.
    """

    def __init__(self, url: str, key: str = "", *, timeout: float = 3.0) -> None:
        self.url = url
        self.timeout = timeout
        self.cluster = is_cluster(url)
        self.seeds = parse(url) if self.cluster else Seeds(())
        if self.cluster and not key:
            raise ValueError("on a cluster a connection needs the key whose slot it serves")
        self.slot = key_slot(key.encode())
        # Nodes to ask, in order; a node asked goes last, and first again once
        # it answers, so a dead or hung node is asked last next time.
        self._nodes: list[tuple[str, int]] = list(self.seeds.nodes)
        # The master the last connection went to (on a cluster).
        self.node: tuple[str, int] | None = None

    async def open(self) -> Stream:
        if not self.cluster:
            return await open_stream(self.url)
        host, port = await self.master()
        self.node = (host, port)
        return await open_node(host, port, self.seeds.username, self.seeds.password)

    async def master(self) -> tuple[str, int]:
        """The master of ``slot`` as the first node that answers names it."""
        failures = []
        for node in list(self._nodes):
            self._nodes.remove(node)
            self._nodes.append(node)
            try:
                async with asyncio.timeout(self.timeout):
                    rows = await self._slots(*node)
            except (OSError, ConnectionError, TimeoutError, EOFError) as exc:
                failures.append(f"{node[0]}:{node[1]}: {exc or type(exc).__name__}")
                continue
            self._nodes.remove(node)
            self._nodes.insert(0, node)
            found = None
            for lo, hi, servers in rows:
                for a in servers:
                    if a not in self._nodes:
                        self._nodes.append(a)
                if servers and lo <= self.slot <= hi:
                    found = servers[0]
            if found is not None:
                return found
            failures.append(f"{node[0]}:{node[1]}: slot {self.slot} not served")
        raise ConnectionError(
            f"no cluster node named the master of slot {self.slot}: " + "; ".join(failures)
        )

    async def _slots(self, host: str, port: int) -> list[tuple[int, int, list[tuple[str, int]]]]:
        """``CLUSTER SLOTS`` of one node: (first slot, last slot, [master, replicas...])."""
        reader, writer = await open_node(host, port, self.seeds.username, self.seeds.password)
        try:
            writer.write(command(b"CLUSTER", b"SLOTS"))
            reply = await anext(replies(reader))
        finally:
            writer.close()
        if isinstance(reply, ReplyError):
            raise reply
        rows = []
        for row in reply if isinstance(reply, list) else [None]:
            if not (isinstance(row, list) and isinstance(row[0], int) and isinstance(row[1], int)):
                raise ConnectionError(f"unexpected CLUSTER SLOTS reply: {reply!r:.60}")
            rows.append((row[0], row[1], [_address(s, host) for s in row[2:]]))
        return rows


def _address(server: object, asked: str) -> tuple[str, int]:
    """A ``CLUSTER SLOTS`` server entry: ``[host, port, id, ...]``. An empty or
    ``?`` host means "the address you reached me at"."""
    if not isinstance(server, list) or len(server) < 2 or not isinstance(server[1], int):
        raise ConnectionError(f"unexpected CLUSTER SLOTS entry: {server!r:.40}")
    host = server[0].decode() if isinstance(server[0], bytes) else str(server[0])
    return (asked if host in ("", "?") else host), server[1]
