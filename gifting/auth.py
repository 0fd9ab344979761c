"""Mint and verify HS256 tokens. The secret is never logged."""

from __future__ import annotations

import base64
import functools
import time
from dataclasses import dataclass

import jwt

from protocol import errors
from protocol.messages import valid_id, valid_text

__all__ = ["MAX_TOKEN", "Claims", "mint", "verify"]

MAX_TOKEN = 4096
MAX_NAME = 64
MAX_AVATAR = 512


@dataclass(frozen=True, slots=True)
class Claims:
    user: str
    name: str
    avatar: str | None
    admin: bool = False
    brand: bool = False
    minor: bool = False  # a minor's account: the lower daily spend cap applies


def mint(
    secret: bytes,
    user: str,
    *,
    name: str | None = None,
    avatar: str | None = None,
    ttl: int = 24 * 3600,
    admin: bool = False,
    brand: bool = False,
    minor: bool = False,
) -> str:
    if not valid_id(user):
        raise ValueError("user ids match [A-Za-z0-9_-]{1,64}")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "name": name or user, "iat": now, "exp": now + ttl}
    if avatar:
        claims["avatar"] = avatar
    if admin:
        claims["admin"] = True
    if brand:
        claims["brand"] = True
    if minor:
        claims["minor"] = True
    return jwt.encode(claims, secret, algorithm="HS256")


@functools.lru_cache(maxsize=8)
def _key(secret: bytes) -> jwt.PyJWK:
    """The secret as a prepared HS256 key: PyJWT checks a raw key's format on
    every decode, which cost more than the signature itself."""
    k = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    return jwt.PyJWK({"kty": "oct", "k": k}, algorithm="HS256")


def verify(secret: bytes, token: object) -> Claims:
    """Check signature (HS256 only), expiry and claims; raise ``Unauthenticated``."""
    if type(token) is not str or not 0 < len(token) <= MAX_TOKEN:
        raise errors.Unauthenticated("token must be a string of at most 4096 characters")
    try:
        claims = jwt.decode(
            token,
            _key(secret),
            algorithms=["HS256"],
            options={"require": ["sub", "exp"]},
            leeway=5,
        )
    except jwt.ExpiredSignatureError:
        raise errors.Unauthenticated("token expired") from None
    except jwt.ImmatureSignatureError:
        raise errors.Unauthenticated("token not yet valid") from None
    except jwt.InvalidTokenError:
        raise errors.Unauthenticated("invalid token") from None
    except Exception:  # any parser failure on hostile input is a rejection
        raise errors.Unauthenticated("invalid token") from None
    sub = claims.get("sub")
    if not valid_id(sub):
        raise errors.Unauthenticated("token subject is not a valid user id")
    assert isinstance(sub, str)
    name = claims.get("name", sub)
    # valid_text: a name or avatar with a lone surrogate would break every
    # frame that carries it (the auth reply, each bubble), not just this one.
    if not valid_text(name) or not 0 < len(name) <= MAX_NAME:
        raise errors.Unauthenticated("token name must be 1-64 characters")
    avatar = claims.get("avatar")
    if avatar is not None and (not valid_text(avatar) or len(avatar) > MAX_AVATAR):
        raise errors.Unauthenticated("token avatar must be a URL of at most 512 characters")
    return Claims(
        user=sub,
        name=name,
        avatar=avatar or None,
        admin=claims.get("admin") is True,
        brand=claims.get("brand") is True,
        minor=claims.get("minor") is True,
    )
