"""Plain HTTP on the hub's port: /healthz, /metrics, /admin/* and the demo pages.

websockets parses only bodiless requests, so ``HttpConnection`` reads the
request head itself: a ``GET`` goes on to websockets untouched (a WebSocket
handshake or a page), anything else is read here, body included, and handed to
``process_request`` as a ``Request`` with a ``body``. Either way the answer
leaves through websockets' own response path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib import resources
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gifting.auth import verify
from gifting.ledger import Ledger
from gifting.logs import event
from gifting.metrics import CONTENT_TYPE, Metrics
from protocol import errors
from protocol.messages import valid_id, valid_key

__all__ = ["Http", "HttpConnection"]

log = logging.getLogger("gifting.http")

MAX_HEAD = 8192
MAX_BODY = 16 * 1024

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

_STATUS = {
    errors.BadRequest: HTTPStatus.BAD_REQUEST,
    errors.Unauthenticated: HTTPStatus.UNAUTHORIZED,
    errors.Forbidden: HTTPStatus.FORBIDDEN,
    errors.Conflict: HTTPStatus.CONFLICT,
    errors.UnknownItem: HTTPStatus.NOT_FOUND,
    errors.InsufficientFunds: HTTPStatus.CONFLICT,
    errors.Unavailable: HTTPStatus.SERVICE_UNAVAILABLE,
}


class BodyRequest(Request):
    """A non-GET request read by ``HttpConnection``, with its body."""

    body: bytes = b""


class HttpConnection(ServerConnection):
    """A websockets connection that also reads requests with a body."""

    _head = b""
    _mode = ""  # "" undecided, "ws" handed to websockets, "plain" read here, "done"

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            super().data_received(data)
            return
        if self._mode == "done":
            return
        self._head += data
        if not self._mode:
            if len(self._head) < 4 and b"GET "[: len(self._head)] == self._head:
                return
            if self._head[:4] == b"GET ":
                self._mode = "ws"
                buffered, self._head = self._head, b""
                super().data_received(buffered)
                return
            self._mode = "plain"
        self._take_plain()

    def _take_plain(self) -> None:
        """Read a non-GET request (head and body) and hand it to the handshake."""
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._finish(None)
            return
        try:
            head = self._head[:end].decode("ascii")
            lines = head.split("\r\n")
            method, path, _proto = lines[0].split(" ", 2)
            headers = Headers()
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip()] = value.strip()
            lengths = headers.get_all("Content-Length")
            if len(lengths) > 1:
                raise ValueError("more than one Content-Length")
            length = int(lengths[0]) if lengths else 0
        except (ValueError, UnicodeDecodeError):
            self._finish(None)
            return
        if not 0 <= length <= MAX_BODY:
            self._finish(None)
            return
        body = self._head[end + 4 :]
        if len(body) < length:
            return  # wait for the rest
        req = BodyRequest(path, headers)
        req.method = method
        req.body = body[:length]
        self._finish(req)

    def _finish(self, request: BodyRequest | None) -> None:
        self._mode = "done"
        self._head = b""
        if request is None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()
            return
        self.request = request
        if not self.request_rcvd.done():
            self.request_rcvd.set_result(None)


def _response(
    status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    for k, v in (extra or {}).items():
        headers[k] = v
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _json(status: int, value: Any, extra: dict[str, str] | None = None) -> Response:
    return _response(status, json.dumps(value).encode(), "application/json", extra)


# A caller's X-Request-Id is kept when it is this tame; otherwise one is made.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Http:
    """Answers every plain HTTP request; ``/ws`` goes on to the WebSocket handshake."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        metrics: Metrics,
        secret: bytes,
        timeout: float,
        subscribed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.ledger = ledger
        self.subscribed = subscribed
        self.metrics = metrics
        self.secret = secret
        self.timeout = timeout
        self._static: dict[str, bytes] = {}

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, _, _query = request.path.partition("?")
        method = getattr(request, "method", "GET")
        if path == "/ws" and method == "GET":
            return None
        if path in ("/admin/topup", "/admin/reverse"):
            if method != "POST":
                return _json(405, {"error": {"code": "bad_request", "message": "use POST"}})
            return await self._admin(
                path, request, self._topup if path == "/admin/topup" else self._reverse
            )
        if method != "GET":
            return _json(405, {"error": {"code": "bad_request", "message": "method not allowed"}})
        if path == "/healthz":
            ok = False
            try:
                async with asyncio.timeout(self.timeout):
                    ok = await self.ledger.ping()
            except TimeoutError:
                ok = False
            if ok and self.subscribed():
                return _response(200, b"ok\n", "text/plain; charset=utf-8")
            return _response(503, b"store unreachable\n", "text/plain; charset=utf-8")
        if path == "/metrics":
            return _response(200, self.metrics.render(), CONTENT_TYPE)
        return self._page(path)

    def _page(self, path: str) -> Response:
        name = "index.html" if path == "/" else path.lstrip("/")
        if "/" in name or name.startswith(".") or "." not in name:
            return _response(404, b"not found\n", "text/plain; charset=utf-8")
        body = self._static.get(name)
        if body is None:
            try:
                body = resources.files("gifting.static").joinpath(name).read_bytes()
            except (FileNotFoundError, IsADirectoryError, OSError):
                return _response(404, b"not found\n", "text/plain; charset=utf-8")
            self._static[name] = body
        ext = name[name.rfind(".") :]
        return _response(
            200,
            body,
            _TYPES.get(ext, "application/octet-stream"),
            {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    def _admin_body(self, request: Request) -> dict[str, Any]:
        """An admin request's JSON object, once its bearer token is an admin's."""
        auths = request.headers.get_all("Authorization")
        if len(auths) > 1:
            raise errors.BadRequest("more than one Authorization header")
        scheme, _, token = (auths[0] if auths else "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("Authorization: Bearer <admin token> required")
        claims = verify(self.secret, token.strip())
        if not claims.admin:
            raise errors.Forbidden("an admin token is required")
        try:
            body = json.loads(getattr(request, "body", b"") or b"null")
        except (ValueError, RecursionError):
            raise errors.BadRequest("body must be a JSON object") from None
        if not isinstance(body, dict):
            raise errors.BadRequest("body must be a JSON object")
        key = body.get("key")
        if not valid_key(key):
            raise errors.BadRequest("'key' must be 1-64 printable ASCII characters")
        return body

    async def _admin(
        self,
        path: str,
        request: Request,
        run: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> Response:
        """Run an admin call: its answer as JSON, or its error with a fitting status.

        Each request is one log line (``admin.ok`` or ``admin.failed``) with a
        request id, the caller's ``X-Request-Id`` if it sent a tame one, echoed
        in the answer so that an operator can find the line.
        """
        given = request.headers.get("X-Request-Id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else "adm-" + secrets.token_hex(6)
        headers = {"X-Request-Id": rid}
        try:
            body = self._admin_body(request)
            async with asyncio.timeout(self.timeout):
                result = await run(body)
        except TimeoutError:
            err: errors.GiftingError = errors.Unavailable("the store did not answer in time")
        except errors.GiftingError as exc:
            err = exc
        else:
            self.metrics.admin_requests[path, "ok"] += 1
            # What was asked and what it did; the bearer token never.
            asked = {k: body[k] for k in ("user", "coins", "transfer", "key") if k in body}
            event(log, logging.INFO, "admin.ok", req=rid, path=path, **asked, result=result)
            return _json(200, result, headers)
        code = err.code.value
        self.metrics.admin_requests[path, code] += 1
        event(
            log,
            logging.WARNING if code in ("unavailable", "internal") else logging.INFO,
            "admin.failed",
            req=rid,
            path=path,
            code=code,
            message=str(err)[:200],
        )
        status = _STATUS.get(type(err), HTTPStatus.INTERNAL_SERVER_ERROR)
        return _json(status, {"error": {"code": code, "message": str(err)}}, headers)

    async def _topup(self, body: dict[str, Any]) -> dict[str, Any]:
        user, coins, key = body.get("user"), body.get("coins"), body["key"]
        if not valid_id(user):
            raise errors.BadRequest("'user' must match [A-Za-z0-9_-]{1,64}")
        if type(coins) is not int:
            raise errors.BadRequest("'coins' must be an integer")
        assert isinstance(user, str)
        res = await self.ledger.topup(user, coins, key)
        return {"coins": res.coins, "duplicate": res.duplicate}

    async def _reverse(self, body: dict[str, Any]) -> dict[str, Any]:
        transfer, force, reason = body.get("transfer"), body.get("allow_negative", False), ""
        if type(transfer) is not int or transfer < 1:
            raise errors.BadRequest("'transfer' must be a positive integer")
        if type(force) is not bool:
            raise errors.BadRequest("'allow_negative' must be true or false")
        reason = body.get("reason", "")
        if type(reason) is not str or len(reason) > 200:
            raise errors.BadRequest("'reason' must be a string of at most 200 characters")
        res = await self.ledger.reverse(transfer, body["key"], allow_negative=force, reason=reason)
        return {"transfer": res.transfer, "reversed": res.reversed, "duplicate": res.duplicate}
