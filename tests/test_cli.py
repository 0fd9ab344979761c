"""The console script, run as a real process: serve, token, topup, audit.

``serve`` runs with ``--port 0`` and its own embedded Valkey under a temporary
data dir; the tests wait for its one ready line on stdout, talk to it over real
sockets, then stop it with SIGTERM and check that it took its store down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis

from gifting import auth
from gifting.cluster import client as store_client
from protocol import errors
from protocol.client import Client
from tests.conftest import SECRET, T, ws_url

# Starting a process (Python imports, a Valkey server) is slower than a reply.
SLOW = 3 * T

_SCRIPT = Path(sys.executable).with_name("gifting")
GIFTING = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gifting"]

READY = re.compile(r"gifting: serving (http://127\.0\.0\.1:(\d+)/\S*)\n")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any GIFTING_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTING_")}
    env.update(extra)
    return env


@dataclass
class Ran:
    rc: int
    out: str
    err: str


async def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        *GIFTING,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(),
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(SLOW):
            out, err = await proc.communicate()
    finally:
        await _stop(proc)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """End a process that outlived its test: SIGTERM (a serve then stops its store), else kill."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(SLOW):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _store_info(data: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads((data / "store.json").read_text())
    return info


@dataclass
class Serving:
    port: int
    url: str  # the demo page URL from the ready line
    store_pid: int | None
    proc: asyncio.subprocess.Process

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@contextlib.asynccontextmanager
async def serving(
    data: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Serving]:
    """Run ``gifting serve --port 0 --data-dir data``; stop it with SIGTERM after.

    On the way out it checks the contract of a clean stop: exit 0, nothing more
    on stdout, and the embedded valkey-server gone with its ``store.json``.
    """
    log = (data.parent / f"serve-{data.name}.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        *GIFTING,
        "serve",
        "--data-dir",
        str(data),
        "--port",
        "0",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env=env or clean_env(),
        cwd=data.parent,
    )
    log.close()
    assert proc.stdout is not None
    store_pid: int | None = None
    try:
        async with asyncio.timeout(SLOW):
            line = (await proc.stdout.readline()).decode()
        m = READY.fullmatch(line)
        assert m, f"not a ready line: {line!r}; log: {_log(data)}"
        if (data / "store.json").exists():
            store_pid = int(str(_store_info(data)["pid"]))
            assert _pid_alive(store_pid)
        yield Serving(int(m.group(2)), m.group(1), store_pid, proc)
        if proc.returncode is None:  # else the test stopped it itself
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(SLOW):
            rc = await proc.wait()
            rest = await proc.stdout.read()
        assert rc == 0, _log(data)
        assert rest == b"", "serve prints one line only"
        assert not (data / "store.json").exists()
        if store_pid is not None:
            assert not _pid_alive(store_pid), "serve left its valkey-server running"
    finally:
        await _stop(proc)
        if store_pid is not None and _pid_alive(store_pid):
            os.kill(store_pid, signal.SIGKILL)


def _log(data: Path) -> str:
    path = data.parent / f"serve-{data.name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@contextlib.asynccontextmanager
async def client(url: str, tok: str | None = None, **kw: Any) -> AsyncIterator[Client]:
    c = Client(url, token=tok, timeout=T, **kw)
    try:
        await c.open()
        yield c
    finally:
        await c.close()


async def http_status(port: int, path: str) -> int:
    async with asyncio.timeout(T):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return int(status_line.split()[1])


async def test_serve_prints_ready_line_and_stops_cleanly(tmp_path):
    data = tmp_path / "data"
    async with serving(data, "--no-demo") as s:
        assert s.port > 0
        assert s.url == f"http://127.0.0.1:{s.port}/"
        assert s.store_pid is not None, "serve without --redis-url starts its own store"
        assert await http_status(s.port, "/healthz") == 200
        tok = (await cli("token", "alice", "--data-dir", str(data))).out.strip()
        async with client(s.ws, tok) as c:
            assert (await c.request("ping"))["time"] > 0
            s.proc.send_signal(signal.SIGTERM)
            # A client still connected at shutdown is told why, then closed with 1001.
            assert await c.wait_closed(timeout=SLOW) == 1001
            assert [e["code"] for e in c.drain("bye")] == [1001]
            async with asyncio.timeout(SLOW):
                await s.proc.wait()
    assert any("appendonly" in p.name for p in data.rglob("*")), "append-only files under DIR"


async def test_token_topup_and_audit_reach_the_running_serve(tmp_path):
    data = tmp_path / "data"
    d = ("--data-dir", str(data))
    async with serving(data, "--no-demo") as s:
        tok, first = await asyncio.gather(
            cli("token", "alice", "--name", "Alice", *d),
            cli("topup", "alice", "100", "--key", "k1", *d),
        )
        assert tok.rc == 0 and tok.err == ""
        assert first.rc == 0 and first.out == "100\n", first
        async with client(s.ws, tok.out.strip()) as c:
            me = await c.request("auth", token=tok.out.strip())
            assert (me["user"], me["name"], me["coins"]) == ("alice", "Alice", 100)

            replay = await cli("topup", "alice", "100", "--key", "k1", *d)
            assert replay.rc == 0 and replay.out == "100\n", replay
            conflict = await cli("topup", "alice", "50", "--key", "k1", *d)
            assert conflict.rc != 0 and conflict.out == ""
            assert "conflict" in conflict.err

            bad = await asyncio.gather(
                cli("topup", "alice", "0", "--key", "z1", *d),
                cli("topup", "alice", "-5", "--key", "z2", *d),
                cli("topup", "alice", str(10**13), "--key", "z3", *d),
                cli("topup", "alice", "5", "--key", "", *d),
                cli("topup", "bad id!", "5", "--key", "z4", *d),
                cli("topup", "alice", "1.5", "--key", "z5", *d),
            )
            for ran in bad:
                assert ran.rc != 0 and ran.out == "", ran
            assert (await c.request("balance"))["coins"] == 100

            audit = await cli("audit", *d)
            assert audit.rc == 0, audit
            assert "OK" in audit.out


async def test_demo_line_tokens_authenticate_and_the_viewer_has_coins(tmp_path):
    data = tmp_path / "data"
    async with serving(data) as s:
        parts = urlsplit(s.url)
        assert parts.path == "/"
        q = parse_qs(parts.query)
        assert q["room"] == ["demo_creator"]
        creator_tok, viewer_tok = q["creator"][0], q["viewer"][0]
        assert await http_status(s.port, "/" + "?" + parts.query) == 200
        async with (
            client(s.ws, creator_tok) as creator,
            client(s.ws, viewer_tok, token_in_query=True) as viewer,
        ):
            assert creator.user == "demo_creator"
            me = await viewer.request("auth", token=viewer_tok)
            assert me["user"] == "demo_viewer" and me["coins"] > 0
            await creator.request("go_live")
            joined = await viewer.request("join", room="demo_creator")
            assert joined["live"] is True
            res = await viewer.send_gift("demo_creator", "rose")
            assert res["coins"] == me["coins"] - 1


async def test_restart_keeps_balances_and_the_feed(tmp_path):
    data = tmp_path / "data"
    d = ("--data-dir", str(data))
    # With no serve running, topup starts the store of DIR itself, and stops it.
    seeded = await cli("topup", "bob", "100", "--key", "seed", *d)
    assert seeded.rc == 0 and seeded.out == "100\n", seeded
    assert not (data / "store.json").exists()

    async with serving(data, "--no-demo") as s:
        alice_tok, bob_tok = (
            r.out.strip()
            for r in await asyncio.gather(
                cli("token", "alice", *d), cli("token", "bob", "--name", "Bob", *d)
            )
        )
        async with client(s.ws, alice_tok) as alice, client(s.ws, bob_tok) as bob:
            await alice.request("go_live", title="before")
            await bob.request("join", room="alice")
            sent = await bob.send_gift("alice", "heart", count=2, key="g1")
            assert sent["coins"] == 90 and sent["duplicate"] is False
            async with asyncio.timeout(T):
                event = await alice.next_event("gift")
            assert event["transfer"] == sent["transfer"]

    async with serving(data, "--no-demo") as s:
        async with client(s.ws, alice_tok) as alice, client(s.ws, bob_tok) as bob:
            assert (await alice.request("balance"))["coins"] == 5
            assert (await bob.request("balance"))["coins"] == 90
            feed = await alice.request("feed", room="alice")
            assert [
                (e["transfer"], e["offset"], e["gift"], e["count"], e["from"]["user"])
                for e in feed["entries"]
            ] == [(sent["transfer"], event["offset"], "heart", 2, "bob")]
            # The gift's key is still known after the restart: a retry moves no coin.
            await alice.request("go_live", title="after")
            await bob.request("join", room="alice")
            again = await bob.send_gift("alice", "heart", count=2, key="g1")
            assert again["duplicate"] is True
            assert (again["transfer"], again["coins"]) == (sent["transfer"], sent["coins"])
            assert (await bob.request("balance"))["coins"] == 90
        audit = await cli("audit", *d)
        assert audit.rc == 0 and "OK" in audit.out, audit


async def test_audit_detects_a_tampered_balance_with_and_without_serve(tmp_path):
    data = tmp_path / "data"
    d = ("--data-dir", str(data))
    async with serving(data, "--no-demo"):
        topped = await cli("topup", "alice", "100", "--key", "t1", *d)
        assert topped.rc == 0, topped
        r = aioredis.Redis.from_url(str(_store_info(data)["url"]))
        try:
            assert await r.hincrby("{g}:bal", "alice", 7) == 107
        finally:
            await r.aclose()
        audit = await cli("audit", *d)
        assert audit.rc == 1, audit
        assert "alice" in audit.out and "OK" not in audit.out
    audit = await cli("audit", *d)
    assert audit.rc == 1, audit
    differences = [line for line in audit.out.splitlines() if "alice" in line]
    assert differences and "7" in differences[0]
    assert not (data / "store.json").exists(), "audit stopped the store it started"


async def test_token_rejects_an_invalid_user_id(tmp_path):
    d = ("--data-dir", str(tmp_path / "data"))
    runs = await asyncio.gather(
        *(cli("token", user, *d) for user in ("bad id!", "a" * 65, "~issuer", "")),
        cli("token", *d),  # neither USER nor --admin
    )
    for ran in runs:
        assert ran.rc == 2 and ran.out == "", ran
        assert ran.err


async def test_admin_token_is_refused_by_the_websocket(hub, tmp_path):
    env = clean_env(GIFTING_SECRET=SECRET.decode())
    ran = await cli("token", "--admin", "--data-dir", str(tmp_path / "data"), env=env)
    assert ran.rc == 0, ran
    admin = ran.out.strip()
    assert auth.verify(SECRET, admin).admin is True
    async with client(ws_url(hub)) as c:
        try:
            await c.request("auth", token=admin)
        except errors.Unauthenticated:
            pass
        else:
            raise AssertionError("an admin token authenticated a WebSocket")
        # The connection stays open for another try.
        me = await c.request("auth", token=auth.mint(SECRET, "alice"))
        assert me["user"] == "alice"
    async with client(ws_url(hub), admin, token_in_query=True) as c:
        assert await c.wait_closed() == 4001


async def test_gifting_secret_env_is_used_by_serve_and_token(tmp_path):
    data = tmp_path / "data"
    d = ("--data-dir", str(data))
    secret = "s" * 40
    env = clean_env(GIFTING_SECRET=secret)
    async with serving(data, "--no-demo", env=env) as s:
        with_env, without_env = await asyncio.gather(
            cli("token", "alice", "--data-dir", str(tmp_path / "elsewhere"), env=env),
            cli("token", "alice", *d),
        )
        assert with_env.rc == 0 and without_env.rc == 0
        assert auth.verify(secret.encode(), with_env.out.strip()).user == "alice"
        async with client(s.ws, with_env.out.strip()) as c:
            assert c.user == "alice"
        async with client(s.ws) as c:
            try:
                await c.request("auth", token=without_env.out.strip())
            except errors.Unauthenticated:
                pass
            else:
                raise AssertionError("serve accepted a token not signed with GIFTING_SECRET")


async def test_short_gifting_secret_is_refused(tmp_path):
    data = tmp_path / "data"
    env = clean_env(GIFTING_SECRET="too-short-secret")
    serve, tok = await asyncio.gather(
        cli("serve", "--data-dir", str(data), "--port", "0", "--no-demo", env=env),
        cli("token", "alice", "--data-dir", str(data), env=env),
    )
    for ran in (serve, tok):
        assert ran.rc != 0 and ran.out == "", ran
        assert "GIFTING_SECRET" in ran.err and "32" in ran.err
        assert "Traceback" not in ran.err
    assert not (data / "store.json").exists()


async def test_serve_uses_an_external_store_and_leaves_it_running(tmp_path, store_url):
    data = tmp_path / "data"
    prefix = "cli" + os.urandom(4).hex()
    ext = ("--redis-url", store_url, "--prefix", prefix, "--data-dir", str(data))
    env = clean_env(GIFTING_REDIS_URL=store_url)
    async with serving(data, "--no-demo", "--prefix", prefix, env=env) as s:
        assert s.store_pid is None and not (data / "store.json").exists()
        topped, tok = await asyncio.gather(
            cli("topup", "alice", "12", "--key", "x1", *ext),
            cli("token", "alice", "--data-dir", str(data)),
        )
        assert topped.rc == 0 and topped.out == "12\n", topped
        async with client(s.ws, tok.out.strip()) as c:
            assert (await c.request("balance"))["coins"] == 12
    r = store_client(store_url, timeout=T)
    try:
        assert await r.hget("{" + prefix + "}:bal", "alice") == b"12"
    finally:
        await r.aclose()
    audit = await cli("audit", *ext)
    assert audit.rc == 0 and "OK" in audit.out, audit


async def test_serve_refuses_bad_numeric_options(tmp_path):
    d = ("--data-dir", str(tmp_path / "data"))
    runs = await asyncio.gather(
        cli("serve", "--port", "0", "--batch-window", "0.5", *d),
        cli("serve", "--port", "0", "--batch-window", "-0.01", *d),
        cli("serve", "--port", "0", "--creator-share", "101", *d),
    )
    for ran in runs:
        assert ran.rc == 2, ran
        assert "must be" in ran.err
    assert not (tmp_path / "data" / "store.json").exists(), "a refused serve started a store"


async def test_serve_takes_an_effects_catalog_and_a_seller_share(tmp_path):
    data = tmp_path / "data"
    async with serving(
        data, "--no-demo", "--effects", "zap:Zap!:7,glow:Glow:1", "--seller-share", "80"
    ) as s:
        tokens = await asyncio.gather(
            cli("token", "alice", "--data-dir", str(data)),
            cli("token", "bob", "--data-dir", str(data)),
        )
        await cli("topup", "bob", "100", "--key", "t1", "--data-dir", str(data))
        async with client(s.ws, tokens[0].out.strip()) as alice:
            async with client(s.ws, tokens[1].out.strip()) as bob:
                assert (await bob.request("effects"))["effects"] == [
                    {"id": "zap", "name": "Zap!", "coins": 7},
                    {"id": "glow", "name": "Glow", "coins": 1},
                ]
                await alice.request("go_live")
                await alice.request("product_put", product="p", name="P", coins=10, stock=1)
                await bob.request("join", room="alice")
                assert (await bob.request("effect", room="alice", effect="zap", key="e"))[
                    "coins"
                ] == 93
                await bob.request("buy", shop="alice", product="p", coins=10, key="b")
                assert (await alice.request("balance"))["coins"] == 8  # 80 % of 10


async def test_serve_refuses_a_bad_effects_catalog(tmp_path):
    d = ("--data-dir", str(tmp_path / "data"), "--port", "0")
    runs = await asyncio.gather(
        cli("serve", "--effects", "zap:Zap", *d),
        cli("serve", "--effects", "zap:Zap:0", *d),
        cli("serve", "--effects", "z/p:Zap:5", *d),
        cli("serve", "--effects", "zap:Zap:5,zap:Again:6", *d),
        cli("serve", "--effects", "zap:Zap:²", *d),
        cli("serve", "--seller-share", "101", *d),
    )
    for ran in runs:
        assert ran.rc == 2, ran
    assert not (tmp_path / "data" / "store.json").exists()
