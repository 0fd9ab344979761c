"""Admin reversal of a transfer: compensating journal entries (never an edit),
idempotent by key, refusing to drive an account negative unless told so, and
checked by the audit."""

import json

import pytest

from tests.conftest import balances, token, topup
from tests.test_cli import cli
from tests.test_http import ADMIN, error_code, request


async def reverse(hub, payload, *, tok=ADMIN):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {tok}"}
    body = json.dumps(payload).encode()
    return await request(hub.port, "POST", "/admin/reverse", body=body, headers=headers)


async def _gift(hub, connect, *, coins=100, gift="cake"):
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    bob = await connect(hub, "bob")
    await topup(hub, "bob", coins)
    await bob.request("join", room="alice")
    res = await bob.request("gift", room="alice", gift=gift, key="g1")
    return creator, bob, res["transfer"]


async def _journal(hub):
    rows = await hub.ledger.r.xrange(hub.ledger.key("journal"))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


async def test_reversing_a_gift_restores_every_balance_with_a_new_entry(hub, connect):
    _, bob, transfer = await _gift(hub, connect)
    before_entries = await _journal(hub)
    assert (await balances(hub))["bob"] == 50
    r = await reverse(hub, {"transfer": transfer, "key": "rev-1", "reason": "chargeback"})
    assert r.status == 200, r.body
    out = r.json()
    assert out["reversed"] == transfer and out["transfer"] > transfer and not out["duplicate"]
    bals = await balances(hub)
    assert bals["bob"] == 100 and bals["alice"] == 0 and bals["~platform"] == 0
    assert sum(bals.values()) == 0
    after = await _journal(hub)
    assert after[: len(before_entries)] == before_entries  # nothing edited or removed
    rev = after[-1]
    assert rev["kind"] == "reverse" and rev["of"] == str(transfer)
    assert rev["reason"] == "chargeback" and rev["forced"] == "0"
    history = (await bob.request("history"))["entries"]
    assert history[0]["kind"] == "reversal" and history[0]["coins"] == 50
    assert (await hub.ledger.audit()).ok


async def test_reversal_is_idempotent_by_key_and_happens_once(hub, connect):
    _, _, transfer = await _gift(hub, connect)
    first = (await reverse(hub, {"transfer": transfer, "key": "k"})).json()
    again = await reverse(hub, {"transfer": transfer, "key": "k"})
    assert again.status == 200 and again.json() == {**first, "duplicate": True}
    # The same key for something else, or a second reversal under a new key: 409.
    other = await reverse(hub, {"transfer": transfer, "key": "k", "allow_negative": True})
    twice = await reverse(hub, {"transfer": transfer, "key": "k2"})
    assert (other.status, error_code(other)) == (409, "conflict")
    assert (twice.status, error_code(twice)) == (409, "conflict")
    assert (await balances(hub))["bob"] == 100


async def test_a_reversal_that_would_drive_the_creator_negative_needs_allow_negative(hub, connect):
    creator, _, transfer = await _gift(hub, connect)
    # alice spends what she earned, so taking it back would leave her negative
    carol = await connect(hub, "carol")
    await carol.request("go_live")
    await creator.request("join", room="carol")
    await creator.request("gift", room="carol", gift="heart", count=5, key="spend")
    before = await balances(hub)
    refused = await reverse(hub, {"transfer": transfer, "key": "r1"})
    assert (refused.status, error_code(refused)) == (409, "insufficient_funds")
    assert "alice" in refused.json()["error"]["message"]
    assert await balances(hub) == before
    forced = await reverse(hub, {"transfer": transfer, "key": "r2", "allow_negative": True})
    assert forced.status == 200, forced.body
    bals = await balances(hub)
    assert bals["alice"] == -25 and sum(bals.values()) == 0
    report = await hub.ledger.audit()
    assert report.ok, report.differences
    assert any("alice" in n for n in report.notes)


async def test_a_top_up_can_be_reversed_and_a_reversal_cannot(hub):
    await topup(hub, "dave", 40)
    transfer = (await hub.ledger.history("dave", None, 1))[0]["transfer"]
    r = await reverse(hub, {"transfer": transfer, "key": "t1"})
    assert r.status == 200
    assert (await balances(hub))["dave"] == 0
    again = await reverse(hub, {"transfer": r.json()["transfer"], "key": "t2"})
    assert (again.status, error_code(again)) == (403, "forbidden")
    assert (await hub.ledger.audit()).ok


@pytest.mark.parametrize(
    "payload, status, code",
    [
        ({"transfer": 999_999, "key": "x"}, 404, "unknown_item"),
        ({"transfer": 0, "key": "x"}, 400, "bad_request"),
        ({"transfer": "1", "key": "x"}, 400, "bad_request"),
        ({"transfer": 1.0, "key": "x"}, 400, "bad_request"),
        ({"transfer": 1}, 400, "bad_request"),
        ({"transfer": 1, "key": "x", "allow_negative": "yes"}, 400, "bad_request"),
        ({"transfer": 1, "key": "x", "reason": "r" * 201}, 400, "bad_request"),
        ([1, 2], 400, "bad_request"),
    ],
)
async def test_bad_reversals_are_refused_and_move_nothing(hub, connect, payload, status, code):
    await _gift(hub, connect)
    before = await balances(hub)
    r = await reverse(hub, payload)
    assert (r.status, error_code(r)) == (status, code)
    assert await balances(hub) == before


async def test_reversal_needs_an_admin_token(hub, connect):
    _, _, transfer = await _gift(hub, connect)
    r = await reverse(hub, {"transfer": transfer, "key": "k"}, tok=token("bob"))
    assert (r.status, error_code(r)) == (403, "forbidden")
    assert (await balances(hub))["bob"] == 50


async def test_cli_reverse_reaches_the_store_and_is_idempotent(hub, connect, store_url, tmp_path):
    _, _, transfer = await _gift(hub, connect)
    args = ("--redis-url", store_url, "--prefix", hub.config.prefix)
    args += ("--data-dir", str(tmp_path))
    first = await cli("reverse", str(transfer), "--key", "c1", *args)
    assert first.rc == 0, first
    assert f"transfer {transfer} reversed by transfer" in first.out
    again = await cli("reverse", str(transfer), "--key", "c1", *args)
    assert again.rc == 0 and "already done" in again.out
    other = await cli("reverse", str(transfer), "--key", "c2", *args)
    assert other.rc == 1 and "conflict" in other.err
    assert (await balances(hub))["bob"] == 100
    audit = await cli("audit", *args)
    assert audit.rc == 0, audit


async def _forge_reversal(hub, of: int, post: dict[str, int]):
    """Write a reversal straight into the store, balances moved to match, as
    tampering (or a broken script) would: only the audit can tell. Returns the
    undo, which leaves the store clean for the teardown audit."""
    r, ledger = hub.ledger.r, hub.ledger
    t = await r.incr(ledger.key("xfer"))
    for acct, delta in post.items():
        await r.hincrby(ledger.bal, acct, delta)
    fields = {"t": t, "kind": "reverse", "ms": 0, "of": of, "forced": 0, "reason": ""}
    fields["post"] = ";".join(f"{a}={d}" for a, d in post.items())
    entry = await r.xadd(ledger.key("journal"), fields)

    async def undo() -> None:
        await r.xdel(ledger.key("journal"), entry)
        for acct, delta in post.items():
            await r.hincrby(ledger.bal, acct, -delta)

    return undo


async def test_audit_catches_a_reversal_that_does_not_mirror_its_transfer(hub, connect):
    _, _, transfer = await _gift(hub, connect)  # bob -50, alice +25, ~platform +25
    undo = await _forge_reversal(hub, transfer, {"bob": 40, "alice": -20, "~platform": -20})
    report = await hub.ledger.audit()
    assert any(f"does not mirror transfer {transfer}" in d for d in report.differences)
    await undo()
    assert (await hub.ledger.audit()).ok


async def test_audit_catches_a_transfer_reversed_twice(hub, connect):
    _, _, transfer = await _gift(hub, connect)
    assert (await reverse(hub, {"transfer": transfer, "key": "once"})).status == 200
    undo = await _forge_reversal(hub, transfer, {"bob": 50, "alice": -25, "~platform": -25})
    report = await hub.ledger.audit()
    assert any(f"transfer {transfer} reversed twice" in d for d in report.differences)
    assert not any("does not mirror" in d for d in report.differences)
    await undo()
    assert (await hub.ledger.audit()).ok
