"""Logs: one line per connection open and close and per failed command, with
request ids; readable by default, JSON on demand; never a token or a secret."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gifting import auth
from gifting.logs import JsonFormatter, TextFormatter, event, redact_url, scrub
from protocol import errors
from protocol.client import Client
from tests.conftest import SECRET, T, token, topup, ws_url
from tests.test_cli import clean_env, client, serving
from tests.test_http import request


def _record(level: int = logging.INFO, exc: bool = False, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("gifting.hub", level, __file__, 1, "conn.open", None, None)
    rec.gifting_fields = fields  # type: ignore[attr-defined]
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            rec.exc_info = sys.exc_info()
    return rec


def test_text_lines_are_key_value_and_quote_what_needs_it():
    line = TextFormatter().format(
        _record(conn="ab.1", user=None, secs=1.5, reason='bye "now"', peer="1.2.3.4:5")
    )
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO conn\.open conn=ab\.1 user=- secs=1\.5 "
        r'reason="bye \\"now\\"" peer=1\.2\.3\.4:5',
        line,
    ), line
    # a value cannot forge another field or another line
    forged = TextFormatter().format(_record(user="x code=ok\nINFO conn.close"))
    assert forged.count("\n") == 0 and 'user="x code=ok\\nINFO conn.close"' in forged


def test_json_lines_are_one_object_each():
    out = json.loads(JsonFormatter().format(_record(logging.WARNING, conn="c", n=3, exc=True)))
    assert out["event"] == "conn.open" and out["level"] == "WARNING"
    assert out["conn"] == "c" and out["n"] == 3
    assert "ValueError: boom" in out["traceback"]
    # a field cannot overwrite the event's own keys
    out = json.loads(JsonFormatter().format(_record(event="forged", time="x")))
    assert out["event"] == "conn.open" and out["time"] != "x"


def test_event_is_skipped_below_the_level(caplog):
    log = logging.getLogger("gifting.test")
    with caplog.at_level(logging.WARNING, logger="gifting.test"):
        event(log, logging.INFO, "quiet", a=1)
        event(log, logging.WARNING, "loud", a=1)
    assert [r.getMessage() for r in caplog.records] == ["loud"]


def test_redact_url():
    assert redact_url("redis://u:s3cret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("redis://:s3cret@h:6379") == "redis://:***@h:6379"
    assert redact_url("redis://h:6379") == "redis://h:6379"
    assert "s3cret" not in redact_url("rediss://default:s3cret@[::1]:6380")
    # a cluster URL may carry a password alone; a query may carry one too
    assert redact_url("redis+cluster://s3cret@h1:7000,h2:7001") == (
        "redis+cluster://:***@h1:7000,h2:7001"
    )
    assert "s3cret" not in redact_url("redis://h:6379/0?password=s3cret&db=1")


def _events(caplog, name: str) -> list[dict[str, object]]:
    return [dict(r.gifting_fields) for r in caplog.records if r.getMessage() == name]  # type: ignore[attr-defined]


async def _next_event(caplog, name: str, conn: object) -> dict[str, object]:
    """The first ``name`` line of ``conn``, once the hub has logged it."""
    async with asyncio.timeout(T):
        while True:
            for e in _events(caplog, name):
                if e["conn"] == conn:
                    return e
            await asyncio.sleep(0.01)


def _formatted(caplog) -> str:
    text, js = TextFormatter(), JsonFormatter()
    return "\n".join(text.format(r) + "\n" + js.format(r) for r in caplog.records)


async def test_open_close_and_failed_commands_with_request_ids(hub, connect, caplog):
    caplog.set_level(logging.INFO, logger="gifting")
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", 3)
    await bob.request("join", room="alice")
    with pytest.raises(errors.InsufficientFunds):
        await bob.request("gift", room="alice", gift="star", key="k1")
    with pytest.raises(errors.UnknownOp):
        await bob.request("dance")
    await bob.send_raw(b"\xc1")
    await bob.next_event("error")
    await bob.close()
    opened = {e["conn"]: e for e in _events(caplog, "conn.open")}
    # these clients authenticate with ``auth``, after the open line
    assert [e["user"] for e in opened.values()] == [None, None]
    assert {e["proto"] for e in opened.values()} == {"msgpack"}
    assert all(str(e["peer"]).startswith("127.0.0.1:") for e in opened.values())
    failed = _events(caplog, "cmd.failed")
    gift = next(e for e in failed if e["op"] == "gift")
    assert gift["user"] == "bob" and gift["code"] == "insufficient_funds"
    conn = gift["conn"]
    assert conn in opened
    assert re.fullmatch(re.escape(str(conn)) + r"/\d+", str(gift["req"]))
    unknown = next(e for e in failed if e["code"] == "unknown_op")
    assert unknown["op"] == "unknown" and unknown["conn"] == conn
    frame = next(e for e in failed if e["op"] == "frame")
    assert frame["req"] is None and frame["code"] == "bad_request"
    closed = await _next_event(caplog, "conn.close", conn)
    assert closed["user"] == "bob" and closed["code"] == 1000 and closed["by"] == "client"
    assert closed["failed"] == 3 and closed["frames"] == 5


async def test_a_client_sending_garbage_cannot_flood_the_log(hub, connect, caplog):
    caplog.set_level(logging.INFO, logger="gifting")
    bob = await connect(hub, "bob")
    for _ in range(200):
        await bob.send_raw(b'{"op": 1}')
    for _ in range(200):
        await bob.next_event("error")
    lines = [e for e in _events(caplog, "cmd.failed") if e["user"] == "bob"]
    assert 20 <= len(lines) < 40, len(lines)  # a burst of 20, then about one a second
    await bob.close()
    closed = await _next_event(caplog, "conn.close", lines[0]["conn"])
    assert closed["failed"] == 200  # every failure is still counted


async def test_no_token_or_secret_reaches_the_log(hub, caplog):
    caplog.set_level(logging.DEBUG)
    good = token("alice")
    forged = auth.mint(b"another-secret-0123456789-0123456789", "alice")
    admin = auth.mint(SECRET, "ops", admin=True)
    # tokens in the handshake, good and bad, and in auth commands
    async with await Client.connect(ws_url(hub), token=good, token_in_query=True, timeout=T) as c:
        await c.request("ping")
        with pytest.raises(errors.Unauthenticated):
            await c.request("auth", token=forged)
    async with connect(ws_url(hub) + "?token=" + forged, open_timeout=T) as ws:
        async with asyncio.timeout(T):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
        assert ws.close_code == 4001
    async with await Client.connect(ws_url(hub), timeout=T) as c:
        with pytest.raises(errors.Unauthenticated):
            await c.request("auth", token=forged)
        with pytest.raises(errors.Unauthenticated):
            await c.request("auth", token=admin)
        await c.request("auth", token=good)
    for bearer in (admin, forged):
        await request(
            hub.port,
            "POST",
            "/admin/topup",
            body=b'{"user": "alice", "coins": 1, "key": "t1"}',
            headers={"Authorization": f"Bearer {bearer}"},
        )
    await request(hub.port, "GET", "/ws?token=" + good)
    out = _formatted(caplog)
    # a token in the handshake names its user in the open line
    assert any(e["user"] == "alice" for e in _events(caplog, "conn.open"))
    assert "conn.open" in out and "admin.ok" in out and "cmd.failed" in out
    for secret in (good, forged, admin, SECRET.decode()):
        for part in secret.split("."):  # not even one part of a JWT
            assert part not in out, part


async def test_serve_logs_json_on_demand(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    env = clean_env(GIFTING_LOG_FORMAT="json")
    async with serving(data, "--no-demo", env=env) as s:
        tok = (await _token(data)).strip()
        async with client(s.ws, tok) as c:
            await c.request("ping")
            with pytest.raises(errors.UnknownOp):
                await c.request("nope")
    lines = (data.parent / f"serve-{data.name}.log").read_text().splitlines()
    objs = [json.loads(line) for line in lines]  # every line is one JSON object
    names = [o["event"] for o in objs]
    for name in ("store.started", "hub.ready", "conn.open", "cmd.failed", "conn.close"):
        assert name in names, names
    assert tok.split(".")[2] not in "\n".join(lines)


async def _token(data) -> str:
    from tests.test_cli import cli

    ran = await cli("token", "carol", "--data-dir", str(data))
    assert ran.rc == 0
    return ran.out


def test_scrub_masks_tokens_anywhere():
    jwt = token("alice")
    line = f"< GET /ws?room=a&token={jwt} HTTP/1.1 Authorization: Bearer abc.def {jwt}"
    out = scrub(line)
    assert jwt not in out and "abc.def" not in out
    assert "?room=a&token=*** " in out and "Bearer ***" in out and "<token>" in out


async def test_an_internal_error_is_logged_with_its_traceback_not_sent(hub, connect, caplog):
    caplog.set_level(logging.INFO, logger="gifting")

    async def broken(conn, args):
        raise RuntimeError("secret detail of a bug")

    hub.ops["ping"] = broken  # fault injection: a handler with a bug
    bob = await connect(hub, "bob")
    with pytest.raises(errors.Internal) as err:
        await bob.request("ping")
    assert "secret detail" not in str(err.value)
    [rec] = [r for r in caplog.records if r.getMessage() == "cmd.internal_error"]
    assert rec.exc_info and "secret detail of a bug" in TextFormatter().format(rec)
    fields = rec.gifting_fields  # type: ignore[attr-defined]
    assert fields["op"] == "ping" and str(fields["req"]).startswith(str(fields["conn"]) + "/")
