"""Pure tests of token checks: every hostile token is rejected."""

import base64
import json
import time

import jwt
import pytest

from gifting import auth
from protocol import errors

SECRET = b"s" * 64


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_mint_and_verify():
    tok = auth.mint(SECRET, "alice", name="Alice", avatar="https://x/a.png")
    c = auth.verify(SECRET, tok)
    assert (c.user, c.name, c.avatar, c.admin, c.brand) == (
        "alice",
        "Alice",
        "https://x/a.png",
        False,
        False,
    )
    assert auth.verify(SECRET, auth.mint(SECRET, "adm", admin=True)).admin


def _signed(claims: dict, alg: str = "HS256", key: bytes = SECRET) -> str:
    return jwt.encode(claims, key, algorithm=alg)


now = int(time.time())


@pytest.mark.parametrize(
    "tok",
    [
        _signed({"sub": "alice", "exp": now - 3600}),  # expired
        _signed({"sub": "alice", "exp": now + 3600, "nbf": now + 3600}),  # not yet valid
        _signed({"sub": "alice", "exp": now + 3600}, key=b"x" * 64),  # wrong signature
        _signed({"sub": "alice", "exp": now + 3600}, alg="HS512"),  # other algorithm
        _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "alice", "exp": now + 99}) + ".",
        _signed({"exp": now + 3600}),  # no sub
        _signed({"sub": "alice"}),  # no exp
        _signed({"sub": "a b", "exp": now + 3600}),  # bad user id
        _signed({"sub": 5, "exp": now + 3600}),
        _signed({"sub": "alice", "exp": now + 3600, "name": ""}),
        _signed({"sub": "alice", "exp": now + 3600, "name": "n" * 65}),
        _signed({"sub": "alice", "exp": now + 3600, "name": 7}),
        _signed({"sub": "alice", "exp": now + 3600, "avatar": 7}),
        _signed({"sub": "alice", "exp": "tomorrow"}),
        _signed({"sub": "~issuer", "exp": now + 3600}),  # a system account
        _signed({"sub": "~platform", "exp": now + 3600}),
        # alg confusion: an RS256 header over an HMAC signature made with the secret
        _b64({"alg": "RS256", "typ": "JWT"})
        + "."
        + _b64({"sub": "alice", "exp": now + 99})
        + "."
        + _signed({"sub": "alice", "exp": now + 99}).rsplit(".", 1)[1],
        _b64({"alg": "HS256"}) + "." + _b64({"sub": "alice", "exp": now + 99}),  # unsigned
        "a" * 5000,  # huge
        "not.a.token",
        "",
        None,
        7,
        ["x"],
    ],
)
def test_rejected(tok):
    with pytest.raises(errors.Unauthenticated):
        auth.verify(SECRET, tok)


def test_mint_rejects_bad_user():
    with pytest.raises(ValueError):
        auth.mint(SECRET, "not ok")


async def test_the_secret_is_never_logged(start_hub, connect, caplog):
    import logging

    from tests.conftest import SECRET as HUB_SECRET
    from tests.conftest import token

    caplog.set_level(logging.DEBUG)
    hub = await start_hub()
    c = await connect(hub)
    for bad in ("x.y.z", token("alice")[:-4] + "AAAA", "a" * 5000):
        with pytest.raises(errors.Unauthenticated):
            await c.request("auth", token=bad)
    await c.request("auth", token=token("alice"))
    text = caplog.text + repr(hub.config)
    assert HUB_SECRET.decode() not in text and repr(HUB_SECRET) not in text


async def test_a_token_spends_only_its_own_users_coins(start_hub, connect):
    from tests.conftest import balances, topup

    hub = await start_hub()
    creator = await connect(hub, "alice")
    await creator.request("go_live")
    await topup(hub, "bob", 100)
    await topup(hub, "mallory", 10)
    m = await connect(hub, "mallory")
    await m.request("join", room="alice")
    # Fields naming another sender are not the contract's and change nothing.
    await m.request(
        "gift", room="alice", gift="heart", key="k", sender="bob", user="bob", **{"from": "bob"}
    )
    with pytest.raises(errors.InsufficientFunds):
        await m.request("gift", room="alice", gift="star", key="k2", sender="bob")
    bals = await balances(hub)
    assert bals["bob"] == 100 and bals["mallory"] == 5
    # And a second auth on the connection cannot switch to bob.
    from tests.conftest import token

    with pytest.raises(errors.Forbidden):
        await m.request("auth", token=token("bob"))
