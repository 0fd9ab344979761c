"""The Docker image and compose.yaml, checked without a Docker engine.

What can be run here is run: the image's HEALTHCHECK command against a live hub
(healthy) and one whose store is down (unhealthy), and the compose topology
itself — two ``gifting serve`` processes with the hub service's own command and
environment, on one store — where a gift on one hub shows on the other.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import T
from tests.test_cli import clean_env, cli, client, serving

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
COMPOSE_CLUSTER = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())


def _final_stage() -> list[str]:
    """The Dockerfile's last stage, one instruction per entry (continuations joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last:]


def _instruction(name: str) -> str:
    found = [ln for ln in _final_stage() if ln.split()[0].upper() == name]
    assert found, f"no {name} in the final stage"
    return found[-1][len(name) :].strip()


def _healthcheck_argv(port: int) -> list[str]:
    spec = _instruction("HEALTHCHECK")
    argv: list[str] = json.loads(spec[spec.index("CMD") + 3 :].strip())
    assert argv[0] == "python"
    return [sys.executable, *(a.replace("8765", str(port)) for a in argv[1:])]


def test_image_is_slim_and_runs_as_non_root():
    assert _instruction("FROM").endswith("-slim")
    user = _instruction("USER").split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(_instruction("ENTRYPOINT")) == ["gifting"]
    cmd = json.loads(_instruction("CMD"))
    assert cmd[0] == "serve" and "--data-dir" in cmd
    assert _instruction("EXPOSE") == cmd[cmd.index("--port") + 1]


async def _run(argv: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(3 * T):
        return await proc.wait()


async def test_healthcheck_command_tells_healthy_from_unhealthy(own_store, start_hub):
    hub = await start_hub(url=own_store.url, store_timeout=0.5)
    assert await _run(_healthcheck_argv(hub.port)) == 0
    own_store.stop()
    assert await _run(_healthcheck_argv(hub.port)) != 0
    own_store.start()  # healthy again once the hub is back on its store
    async with asyncio.timeout(3 * T):
        while True:  # the hub reconnects by itself; the check is run as Docker would
            if await _run(_healthcheck_argv(hub.port)) == 0:
                break
            await asyncio.sleep(0.1)


def test_compose_hubs_share_one_store_and_one_secret():
    services = COMPOSE["services"]
    hubs = {name: s for name, s in services.items() if name.startswith("hub")}
    assert len(hubs) == 2
    store = services["valkey"]
    assert "--appendonly" in store["command"] and store["healthcheck"]
    ports = set()
    for s in hubs.values():
        env = s["environment"]
        assert env["GIFTING_REDIS_URL"].startswith("redis://valkey:")
        assert env["GIFTING_SECRET"].startswith("${GIFTING_SECRET:?")  # required, never baked in
        assert s["depends_on"]["valkey"]["condition"] == "service_healthy"
        ports.add(s["ports"][0].split(":")[0])
    assert len(ports) == 2


def _hub_args(service: dict[str, Any], prefix: str) -> list[str]:
    """The compose service's ``serve`` arguments, on loopback, for ``serving``."""
    argv = list(service["command"])
    assert argv[0] == "serve"
    out, it = [], iter(argv[1:])
    for a in it:
        if a in ("--port", "--data-dir"):
            next(it)  # ``serving`` picks its own
        elif a == "--host":
            next(it)
            out += [a, "127.0.0.1"]  # not every interface, in a test
        else:
            out.append(a)
    return [*out, "--prefix", prefix]


async def _two_hubs_serve_one_room(tmp_path: Path, compose: dict[str, Any], url: str) -> None:
    """Run the compose file's hub1 and hub2 (their own command and environment,
    the store at ``url``): one secret, one room across both, audit clean."""
    services = compose["services"]
    prefix = "dc" + secrets.token_hex(4)
    secret = secrets.token_hex(32)

    def env_of(service: dict[str, Any]) -> dict[str, str]:
        env = {k: str(v) for k, v in service["environment"].items()}
        env["GIFTING_REDIS_URL"] = url  # the compose file's store, here
        env["GIFTING_SECRET"] = secret
        return clean_env(**env)

    d1, d2 = tmp_path / "hub1", tmp_path / "hub2"
    h1, h2 = services["hub1"], services["hub2"]
    async with (
        serving(d1, *_hub_args(h1, prefix), env=env_of(h1)) as s1,
        serving(d2, *_hub_args(h2, prefix), env=env_of(h2)) as s2,
    ):
        # tokens from either hub's CLI work on both: one secret
        alice, bob = await asyncio.gather(
            cli("token", "alice", "--data-dir", str(d1), env=env_of(h1)),
            cli("token", "bob", "--data-dir", str(d2), env=env_of(h2)),
        )
        topped = await cli("topup", "bob", "50", "--key", "t1", "--prefix", prefix, env=env_of(h1))
        assert topped.rc == 0 and topped.out == "50\n", topped
        async with (
            client(s1.ws, alice.out.strip()) as creator,
            client(s2.ws, bob.out.strip()) as viewer,
        ):
            await creator.request("go_live")
            await viewer.request("join", room="alice")
            await viewer.request("gift", room="alice", gift="star", key="g1")
            async with asyncio.timeout(T):
                bubble = await creator.next_event("bubble")
                gift = await creator.next_event("gift")
            assert bubble["from"]["user"] == "bob" and gift["earned"] == 5
    # the hubs logged JSON, as the compose file asks
    for d in (d1, d2):
        lines = (d.parent / f"serve-{d.name}.log").read_text().splitlines()
        assert lines and all(json.loads(ln)["event"] for ln in lines)
    audit = await cli("audit", "--prefix", prefix, env=env_of(h1))
    assert audit.rc == 0 and "OK" in audit.out, audit


async def test_the_compose_topology_serves_one_room_from_two_hubs(tmp_path, store_url):
    await _two_hubs_serve_one_room(tmp_path, COMPOSE, store_url)


def test_compose_cluster_is_three_masters_with_two_replicas_each():
    services = COMPOSE_CLUSTER["services"]
    nodes = {n: s for n, s in services.items() if n.startswith("valkey-")}
    assert len(nodes) == 9
    for s in nodes.values():
        assert s["command"][s["command"].index("--cluster-enabled") + 1] == "yes"
        assert "--appendonly" in s["command"]
    init = " ".join(services["cluster-init"]["command"])
    assert "--cluster-replicas 2" in init and "--cluster create" in init
    for hub in ("hub1", "hub2"):
        url = services[hub]["environment"]["GIFTING_REDIS_URL"]
        assert url.startswith("redis+cluster://")
        seeds = {hp.split(":")[0] for hp in url.removeprefix("redis+cluster://").split(",")}
        assert seeds <= set(nodes)
        deps = services[hub]["depends_on"]["cluster-init"]
        assert deps["condition"] == "service_completed_successfully"


async def test_the_compose_cluster_hubs_serve_one_room_on_a_real_cluster(tmp_path, vcluster):
    await _two_hubs_serve_one_room(tmp_path, COMPOSE_CLUSTER, vcluster.url)


def test_no_secret_is_committed():
    for name in ("Dockerfile", "compose.yaml", "compose.cluster.yaml"):
        text = (ROOT / name).read_text()
        assert not re.search(r"GIFTING_SECRET[=:]\s*['\"]?[0-9a-f]{32}", text), name
