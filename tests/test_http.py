"""Plain HTTP on the hub's port: /healthz, /metrics, the demo pages, /admin/topup.

Requests are written by hand on an asyncio stream, so the tests control every
byte (duplicate headers, oversized bodies, odd paths) and need no HTTP client.
The hub answers with ``Connection: close``: a reply is everything up to EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gifting import auth
from gifting.hub import Hub
from gifting.store import EmbeddedStore
from tests.conftest import SECRET, T, balances, token

ADMIN = auth.mint(SECRET, "admin", admin=True)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


def _parse(raw: bytes) -> Reply:
    assert raw, "the connection closed without an HTTP response"
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    proto, status, _ = lines[0].split(" ", 2)
    assert proto == "HTTP/1.1", lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body), (headers, len(body))
    return Reply(int(status), headers, body)


async def send_raw(port: int, data: bytes) -> Reply:
    """Write ``data`` as is and read the answer up to EOF."""
    async with asyncio.timeout(T):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return _parse(raw)


async def request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return await send_raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))


async def admin_topup(
    hub: Hub, payload: object, *, tok: str | None = ADMIN, raw: bytes | None = None
) -> Reply:
    headers = {"Content-Type": "application/json"}
    if tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    body = raw if raw is not None else json.dumps(payload).encode()
    return await request(hub.port, "POST", "/admin/topup", body=body, headers=headers)


def error_code(reply: Reply) -> str:
    err = reply.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    code: str = err["code"]
    return code


async def healthy(hub: Hub) -> None:
    reply = await request(hub.port, "GET", "/healthz")
    assert reply.status == 200, reply


# -- /healthz ----------------------------------------------------------------


async def test_healthz_is_200_while_the_store_is_up(hub):
    reply = await request(hub.port, "GET", "/healthz")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")


@pytest.fixture
def own_store() -> Iterator[EmbeddedStore]:
    """A private store the test may stop; set up before, so torn down after, the hub.

    A short directory keeps the store on a unix socket, whose URL survives a
    restart (a TCP fallback would pick a new port and strand the hub).
    """
    with tempfile.TemporaryDirectory(prefix="gh") as d:
        s = EmbeddedStore(Path(d))
        s.start()
        yield s
        s.stop()


async def test_healthz_is_503_while_the_store_is_down_and_recovers(own_store, start_hub):
    url = own_store.url
    hub = await start_hub(url=url)
    await healthy(hub)
    try:
        await asyncio.to_thread(own_store.stop)
        reply = await request(hub.port, "GET", "/healthz")
        assert reply.status == 503
        # A top-up while the store is down is `unavailable`: safe to retry by key.
        down = await admin_topup(hub, {"user": "alice", "coins": 30, "key": "k-down"})
        assert down.status == 503 and error_code(down) == "unavailable"
    finally:
        if own_store.proc is None:
            await asyncio.to_thread(own_store.start)
    async with asyncio.timeout(T):
        while (await request(hub.port, "GET", "/healthz")).status != 200:
            pass
    assert own_store.url == url
    again = await admin_topup(hub, {"user": "alice", "coins": 30, "key": "k-down"})
    assert again.status == 200 and again.json()["coins"] == 30
    assert (await balances(hub))["alice"] == 30


# -- /metrics ----------------------------------------------------------------


async def test_metrics_is_prometheus_text_counting_connections(hub, connect):
    await connect(hub, "alice")
    await connect(hub, "bob")
    reply = await request(hub.port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert "# TYPE gifting_connections gauge" in text.splitlines()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(samples["gifting_connections"]) == 2
    for value in samples.values():
        float(value)


# -- demo pages --------------------------------------------------------------

HTML = {"text/html"}
JS = {"text/javascript", "application/javascript"}


@pytest.mark.parametrize(
    ("path", "name", "ctype"),
    [
        ("/", "index.html", HTML),
        ("/index.html", "index.html", HTML),
        ("/viewer.html", "viewer.html", HTML),
        ("/creator.html", "creator.html", HTML),
        ("/app.js", "app.js", JS),
        ("/style.css", "style.css", {"text/css"}),
        ("/app.js?v=2", "app.js", JS),
    ],
)
async def test_demo_pages_are_served_with_their_type(hub, path, name, ctype):
    reply = await request(hub.port, "GET", path)
    assert reply.status == 200
    assert reply.headers["content-type"].split(";")[0].strip() in ctype
    assert reply.body == resources.files("gifting.static").joinpath(name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/nope.html",
        "/../secret",
        "/..",
        "/.hidden",
        "/../hub.py",
        "/../ledger/gift.lua",
        "/..%2fhub.py",
        "/%2e%2e/hub.py",
        "//etc/passwd",
    ],
)
async def test_unknown_paths_and_traversal_are_404(hub, path):
    reply = await request(hub.port, "GET", path)
    assert reply.status == 404
    assert b"import" not in reply.body and b"redis.call" not in reply.body


# -- methods -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/healthz"), ("DELETE", "/"), ("POST", "/healthz"), ("PATCH", "/metrics")],
)
async def test_unknown_method_is_405_and_the_hub_still_serves(hub, connect, method, path):
    reply = await request(hub.port, method, path, body=b"{}")
    assert reply.status == 405
    reply = await request(hub.port, method, path)  # no body, no Content-Length
    assert reply.status == 405
    await healthy(hub)
    c = await connect(hub, "alice")
    assert (await c.request("ping"))["time"] > 0


async def test_get_admin_topup_is_405(hub):
    before = await balances(hub)
    reply = await request(
        hub.port, "GET", "/admin/topup", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert reply.status == 405
    assert await balances(hub) == before


# -- POST /admin/topup -------------------------------------------------------


async def test_admin_topup_credits_replays_and_conflicts(hub):
    reply = await admin_topup(hub, {"user": "alice", "coins": 100, "key": "k1"})
    assert reply.status == 200
    assert reply.json()["coins"] == 100
    after_first = await balances(hub)
    assert after_first["alice"] == 100 and after_first["~issuer"] == -100

    replay = await admin_topup(hub, {"user": "alice", "coins": 100, "key": "k1"})
    assert replay.status == 200 and replay.json()["coins"] == 100
    assert await balances(hub) == after_first

    other = await admin_topup(hub, {"user": "alice", "coins": 7, "key": "k2"})
    assert other.status == 200 and other.json()["coins"] == 107
    # A replay adds nothing and answers the balance as it is now.
    replay = await admin_topup(hub, {"user": "alice", "coins": 100, "key": "k1"})
    assert replay.status == 200 and replay.json()["coins"] == 107
    settled = await balances(hub)
    assert settled["alice"] == 107 and settled["~issuer"] == -107

    for body in (
        {"user": "alice", "coins": 101, "key": "k1"},
        {"user": "bob", "coins": 100, "key": "k1"},
    ):
        conflict = await admin_topup(hub, body)
        assert conflict.status == 409, conflict
        assert error_code(conflict) == "conflict"
    assert await balances(hub) == settled


async def test_admin_topup_sends_balance_event_to_every_connection_of_the_user(hub, connect):
    a1 = await connect(hub, "alice")
    a2 = await connect(hub, "alice", json=True)
    reply = await admin_topup(hub, {"user": "alice", "coins": 40, "key": "ev1"})
    assert reply.status == 200 and reply.json()["coins"] == 40
    async with asyncio.timeout(T):
        assert (await a1.next_event("balance"))["coins"] == 40
        assert (await a2.next_event("balance"))["coins"] == 40
    assert (await a1.request("balance"))["coins"] == 40


@pytest.mark.parametrize(
    ("authorization", "status", "code"),
    [
        (None, 401, "unauthenticated"),
        ("", 401, "unauthenticated"),
        (f"Basic {ADMIN}", 401, "unauthenticated"),
        ("Bearer", 401, "unauthenticated"),
        ("Bearer not-a-jwt", 401, "unauthenticated"),
        (
            "Bearer " + auth.mint(b"another-secret-of-at-least-32-bytes!!", "admin", admin=True),
            401,
            "unauthenticated",
        ),
        ("Bearer " + auth.mint(SECRET, "admin", admin=True, ttl=-60), 401, "unauthenticated"),
        ("Bearer " + token("alice"), 403, "forbidden"),
        ("Bearer " + token("admin"), 403, "forbidden"),
    ],
    ids=[
        "missing",
        "empty",
        "basic",
        "bearer-without-token",
        "garbage",
        "other-secret",
        "expired",
        "user-token",
        "user-named-admin",
    ],
)
async def test_admin_topup_needs_an_admin_token(hub, authorization, status, code):
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = json.dumps({"user": "alice", "coins": 10, "key": "auth1"}).encode()
    before = await balances(hub)
    reply = await request(hub.port, "POST", "/admin/topup", body=body, headers=headers)
    assert reply.status == status
    assert error_code(reply) == code
    assert await balances(hub) == before
    # The rejected attempt did not use up the key.
    ok = await admin_topup(hub, {"user": "alice", "coins": 10, "key": "auth1"})
    assert ok.status == 200 and ok.json()["coins"] == 10
    assert (await balances(hub))["alice"] == 10


GOOD = {"user": "alice", "coins": 10, "key": "bad1"}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"[1, 2]",
        b'"alice"',
        b"null",
        b"10",
        b"\xff{}",
        b"[" * 5000 + b"]" * 5000,
        json.dumps({**GOOD, "coins": "10"}).encode(),
        json.dumps({**GOOD, "coins": 0}).encode(),
        json.dumps({**GOOD, "coins": -5}).encode(),
        json.dumps({**GOOD, "coins": 10.0}).encode(),
        json.dumps({**GOOD, "coins": 1.5}).encode(),
        json.dumps({**GOOD, "coins": True}).encode(),
        json.dumps({**GOOD, "coins": None}).encode(),
        json.dumps({**GOOD, "coins": 10**13}).encode(),
        b'{"user": "alice", "key": "bad1", "coins": NaN}',
        b'{"user": "alice", "key": "bad1", "coins": Infinity}',
        b'{"user": "alice", "key": "bad1", "coins": 1e2}',
        json.dumps({"user": "alice", "key": "bad1"}).encode(),
        json.dumps({**GOOD, "user": "bad id!"}).encode(),
        json.dumps({**GOOD, "user": ""}).encode(),
        json.dumps({**GOOD, "user": "~issuer"}).encode(),
        json.dumps({**GOOD, "user": "a" * 65}).encode(),
        json.dumps({**GOOD, "user": 5}).encode(),
        json.dumps({"coins": 10, "key": "bad1"}).encode(),
        json.dumps({**GOOD, "key": ""}).encode(),
        json.dumps({**GOOD, "key": "k" * 65}).encode(),
        json.dumps({**GOOD, "key": "kéy"}).encode(),
        json.dumps({**GOOD, "key": "a\nb"}).encode(),
        json.dumps({**GOOD, "key": 5}).encode(),
        json.dumps({"user": "alice", "coins": 10}).encode(),
    ],
)
async def test_admin_topup_rejects_bad_bodies_and_moves_nothing(hub, raw):
    before = await balances(hub)
    reply = await admin_topup(hub, None, raw=raw)
    assert reply.status == 400, reply
    assert error_code(reply) == "bad_request"
    assert await balances(hub) == before
    ok = await admin_topup(hub, GOOD)
    assert ok.status == 200 and ok.json()["coins"] == 10
    assert (await balances(hub))["alice"] == 10


async def test_admin_topup_body_limit_is_16_kib(hub):
    body = json.dumps({"user": "alice", "coins": 3, "key": "big"}).encode()
    at_limit = body + b" " * (16 * 1024 - len(body))
    reply = await admin_topup(hub, None, raw=at_limit)
    assert reply.status == 200 and reply.json()["coins"] == 3

    before = await balances(hub)
    over = json.dumps({"user": "alice", "coins": 5, "key": "big2"}).encode()
    over += b" " * (16 * 1024 + 1 - len(over))
    reply = await admin_topup(hub, None, raw=over)
    assert reply.status in (400, 413), reply
    assert await balances(hub) == before

    # Announced far over the limit: refused on the head alone, before any body is sent.
    head = (
        "POST /admin/topup HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ADMIN}\r\nContent-Length: {10**6}\r\n\r\n"
    ).encode()
    reply = await send_raw(hub.port, head)
    assert reply.status in (400, 413), reply
    assert await balances(hub) == before
    await healthy(hub)


async def test_admin_topup_with_conflicting_content_lengths_is_400(hub):
    # RFC 9112 6.3: differing Content-Length values must be answered 400; they
    # must not crash the connection handler (which drops it with no answer).
    before = await balances(hub)
    body = json.dumps({"user": "alice", "coins": 9, "key": "cl"}).encode()
    raw = (
        "POST /admin/topup HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ADMIN}\r\n"
        f"Content-Length: {len(body)}\r\nContent-Length: 2\r\n\r\n"
    ).encode() + body
    reply = await send_raw(hub.port, raw)
    assert reply.status == 400
    assert await balances(hub) == before
    await healthy(hub)


async def test_admin_topup_with_two_authorization_headers_is_rejected_not_500(hub):
    before = await balances(hub)
    body = json.dumps({"user": "alice", "coins": 9, "key": "two-auth"}).encode()
    raw = (
        "POST /admin/topup HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ADMIN}\r\nAuthorization: Bearer {ADMIN}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reply = await send_raw(hub.port, raw)
    assert reply.status in (400, 401), reply
    assert await balances(hub) == before
    await healthy(hub)


async def test_admin_topup_of_a_fresh_user_is_visible_over_the_websocket(hub, connect):
    user = "u" + uuid.uuid4().hex[:8]
    reply = await admin_topup(hub, {"user": user, "coins": 25, "key": "fresh"})
    assert reply.status == 200 and reply.json()["coins"] == 25
    c = await connect(hub, user)
    assert (await c.request("balance"))["coins"] == 25
    hist = (await c.request("history"))["entries"]
    assert [(e["kind"], e["coins"]) for e in hist] == [("topup", 25)]
