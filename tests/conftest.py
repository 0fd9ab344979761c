"""Fixtures: one real Valkey per test session, a real hub per test on a free port.

Each hub gets its own key prefix, so tests share the store without sharing data,
and every hub fixture ends with an audit of its prefix: no test may leave a coin
created or lost.

The store comes in two kinds, a parameter of the session's ``store``: every
test that reaches the store runs on a single ``standalone`` server and on a
``cluster`` (3 masters with 2 replicas each, ``tests/valkey_cluster.py``). The
cluster runs are long, so they are marked ``full`` (``scripts/test --full``);
``tests/test_cluster.py`` keeps a cluster smoke test in the default run. Tests
that stop and start a store of their own (``own_store``), or are marked
``standalone``, run on the standalone kind only.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gifting import auth, cluster
from gifting.config import Config
from gifting.hub import Hub, running_hub
from gifting.store import EmbeddedStore
from protocol.client import Client
from tests.valkey_cluster import ValkeyCluster

# Every wait in the tests is bounded by T seconds, scaled for slow machines.
T = 5.0 * float(os.environ.get("GIFTING_TEST_TIMEOUT_FACTOR", "1"))
SECRET = b"test-secret-not-for-production-0123456789"


STORE_KINDS = ["standalone", pytest.param("cluster", marks=pytest.mark.full)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "standalone: needs a single store server; skipped for the cluster kind"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests that stop and start a store of their own on one kind only:
    on the cluster kind they would repeat the standalone run word for word."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cluster = callspec is not None and callspec.params.get("store") == "cluster"
        fixtures = getattr(item, "fixturenames", ())
        if on_cluster and ("own_store" in fixtures or item.get_closest_marker("standalone")):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", params=STORE_KINDS)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStore | ValkeyCluster]:
    """The session's store, of each kind in turn; its ``url`` is what hubs get."""
    if request.param == "cluster":
        with ValkeyCluster(tmp_path_factory.mktemp("cluster")) as c:
            yield c
        return
    s = EmbeddedStore(tmp_path_factory.mktemp("valkey"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    """A store of the test's own, to stop and start."""
    s = EmbeddedStore(tmp_path / "own")
    s.start()
    yield s
    with contextlib.suppress(Exception):
        s.stop()


@pytest.fixture(scope="module")
def vcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A real Valkey Cluster (3 masters × 2 replicas) of the test module's own,
    to kill nodes in."""
    with ValkeyCluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="session")
def store_url(store: EmbeddedStore | ValkeyCluster) -> str:
    return store.url


def base_config(**overrides: Any) -> Config:
    cfg = Config(
        host="127.0.0.1",
        port=0,
        secret=SECRET,
        prefix="t" + uuid.uuid4().hex[:12],
        tick=0.2,
        demo=False,
    )
    return replace(cfg, **overrides)


HubFactory = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def start_hub(store_url: str) -> AsyncIterator[HubFactory]:
    """Start hubs (``await start_hub(prefix=..., **config)``); audited and stopped after."""
    async with AsyncExitStack() as stack:
        hubs: list[Hub] = []

        async def start(url: str | None = None, **overrides: Any) -> Hub:
            cfg = base_config(**overrides)
            hub = await stack.enter_async_context(running_hub(cfg, url or store_url))
            hubs.append(hub)
            return hub

        yield start
        seen: set[str] = set()
        for hub in hubs:
            if hub.config.prefix in seen or hub.ledger is None:
                continue
            seen.add(hub.config.prefix)
            report = await hub.ledger.audit()
            assert report.ok, report.differences
        try:
            async with asyncio.timeout(10 * T):
                await stack.aclose()
        except TimeoutError:
            buf = io.StringIO()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.print_stack(file=buf)
            pytest.fail("a hub did not stop; tasks:\n" + buf.getvalue())


@pytest.fixture
async def hub(start_hub: HubFactory) -> Hub:
    return await start_hub()


def token(user: str, name: str | None = None, **kw: Any) -> str:
    return auth.mint(SECRET, user, name=name or user.title(), **kw)


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[ClientFactory]:
    """``await connect(hub, "alice")``: an authenticated client, closed after the test."""
    clients: list[Client] = []

    async def make(
        hub: Hub, user: str | None = None, *, name: str | None = None, **kw: Any
    ) -> Client:
        tok = token(user, name) if user else None
        c = await Client.connect(ws_url(hub), token=tok, timeout=T, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


def ws_url(hub: Hub) -> str:
    return f"ws://127.0.0.1:{hub.port}/ws"


async def topup(hub: Hub, user: str, coins: int) -> int:
    res = await hub.ledger.topup(user, coins, "test:" + uuid.uuid4().hex)
    return res.coins


async def balances(hub: Hub) -> dict[str, int]:
    raw: Any = await hub.ledger.r.hgetall(hub.ledger.bal)
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
async def redis_client(store_url: str) -> AsyncIterator[cluster.StoreClient]:
    """redis-py's client for the store, of whichever kind (a ``RedisCluster`` on a cluster)."""
    r = cluster.client(store_url, timeout=T)
    yield r
    await r.aclose()


def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d
