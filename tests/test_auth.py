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
