"""A ``Cluster`` per test: its own store under a short directory, no hub yet."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import SECRET, T
from tests.faults.cluster import Cluster

# Starting a process (Python imports, a store) is slower than a reply.
SLOW = 3 * T


@pytest.fixture
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    # A short directory, whatever the test's name: the store listens on a unix
    # socket inside it (paths over ~100 bytes would make it take a TCP port,
    # and a different one after each restart).
    async with Cluster(
        tmp_path_factory.mktemp("f"), secret=SECRET, timeout=T, start_timeout=SLOW
    ) as c:
        assert c.url.startswith("unix://"), c.url
        yield c
