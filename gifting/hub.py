"""The hub: one websockets server, one port; handshake, read loop, dispatch, close codes.

The hub only moves bytes and calls the ledger: decoding and field checks are
pure (``protocol.codec``), coins move only in ``ledger/``, room events leave
only through ``rooms.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import redis.exceptions as rex
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.typing import Subprotocol

from gifting import __version__, cluster
from gifting.auth import verify
from gifting.campaigns import Campaigns
from gifting.config import Config
from gifting.http import Http, HttpConnection
from gifting.ledger import Ledger
from gifting.ledger.partitioned import PartBus, PartitionedLedger, refused_ops
from gifting.logs import event
from gifting.metrics import Gauges, Metrics
from gifting.rooms import CLOSE_DRAIN_TIMEOUT, CREATOR, DEFLATE_BITS, VIEWER, Conn, Rooms
from gifting.shop import Shop
from protocol import codec, errors
from protocol.messages import (
    CLOSE_GOING_AWAY,
    CLOSE_NOT_AUTHENTICATED,
    CLOSE_RATE_LIMITED,
    COMMANDS,
    MAX_COUNT,
    MAX_FRAME,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    Command,
    FieldError,
    opt_int,
    opt_str,
    req_id_str,
    valid_key,
)

__all__ = ["Hub", "running_hub"]

log = logging.getLogger("gifting.hub")

# ASCII digits only (``\d`` takes any script's digits) and each part below
# 2^64, or the store refuses the id and the answer would be ``internal``.
_OFFSET_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_OFFSET_PART = 2**64 - 1
_MAX_TITLE = 80
_MAX_GIFTS_IN_FLIGHT = 256
# Shutdown: extra seconds on top of each bounded step (a command's store
# timeout, a client's close), so the step can end by itself before it is cut.
_SHUTDOWN_SLACK = 0.25
# Close codes counted by their own label in /metrics (others count as 0).
_CLOSE_LABELS = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 4001, 4008, 4009}
)
# Failures that are the server's side, not the client's: logged as warnings.
_SERVER_SIDE = frozenset({"unavailable", "internal"})

Result = dict[str, Any]
Handler = Callable[[Conn, dict[str, Any]], Awaitable[Result]]


class _Bucket:
    """A token bucket: ``rate`` per second, up to ``burst`` at once."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.last = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _limit(args: dict[str, Any], default: int) -> int:
    n = opt_int(args, "limit", default)
    if not 1 <= n <= 500:
        raise FieldError("'limit' must be 1-500")
    return n


def _valid_offset(value: object) -> bool:
    """A feed offset the store takes as an exclusive start: nothing follows the
    largest id, so ``(max-max`` is refused too."""
    m = _OFFSET_RE.fullmatch(value) if type(value) is str else None
    if m is None:
        return False
    ms, seq = int(m[1]), int(m[2])
    top = _MAX_OFFSET_PART
    return ms <= top and seq <= top and (ms, seq) != (top, top)


def _select_subprotocol(_conn: ServerConnection, offered: Any) -> Subprotocol | None:
    if SUBPROTOCOL_JSON in offered:
        return Subprotocol(SUBPROTOCOL_JSON)
    if SUBPROTOCOL_MSGPACK in offered:
        return Subprotocol(SUBPROTOCOL_MSGPACK)
    return None


def _deflate(ws: ServerConnection) -> bool:
    return any(
        isinstance(e, PerMessageDeflate)
        and e.local_no_context_takeover
        and e.local_max_window_bits >= DEFLATE_BITS
        for e in ws.protocol.extensions
    )


def _peer(ws: ServerConnection) -> str | None:
    addr = ws.remote_address
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return None


def _store_unavailable(conn: Conn, id: int, op: str, exc: BaseException) -> errors.Unavailable:
    """Log what the store said (node addresses included); the client is told only
    to retry."""
    event(
        log,
        logging.WARNING,
        "cmd.store_error",
        conn=conn.id,
        req=f"{conn.id}/{id}",
        op=op,
        error=str(exc)[:200],
    )
    return errors.Unavailable("the store cannot be reached; retry")


def _internal_error(conn: Conn, id: int, op: str) -> errors.Internal:
    """Log the exception being handled, with its traceback; the client gets only
    ``internal`` (a traceback can hold anything)."""
    event(
        log,
        logging.ERROR,
        "cmd.internal_error",
        exc_info=True,
        conn=conn.id,
        req=f"{conn.id}/{id}",
        op=op,
    )
    return errors.Internal("internal error")


def _auth_expired(conn: Conn) -> None:
    if conn.claims is None:
        conn.close(CLOSE_NOT_AUTHENTICATED, "not authenticated in time")


class Hub:
    """Everything one hub process serves; built by ``running_hub``, no global state."""

    def __init__(self, config: Config, client: cluster.StoreClient, store_url: str) -> None:
        self.config = config
        self.hub_id = config.hub_id or secrets.token_hex(4)
        self.metrics = Metrics(
            gauges=self._gauges, info={"hub": self.hub_id, "version": __version__}
        )
        self.ledger: Ledger
        if config.partitions > 1:
            if config.ack_replicas:
                raise ValueError("--ack-replicas is not supported with --partitions")
            self.ledger = PartitionedLedger(
                client,
                partitions=config.partitions,
                metrics=self.metrics,
                prefix=config.prefix,
                creator_share_pct=config.creator_share_pct,
                feed_maxlen=config.feed_maxlen,
                idempotency_ttl=config.idempotency_ttl,
                url=store_url,
            )
        else:
            self.ledger = Ledger(
                client,
                metrics=self.metrics,
                prefix=config.prefix,
                creator_share_pct=config.creator_share_pct,
                feed_maxlen=config.feed_maxlen,
                idempotency_ttl=config.idempotency_ttl,
                ack_replicas=config.ack_replicas,
                ack_timeout=config.ack_timeout,
                url=store_url,
            )
        self.rooms = Rooms(
            ledger=self.ledger,
            client=client,
            bus_url=store_url,
            hub_id=self.hub_id,
            metrics=self.metrics,
            tick=config.tick,
            timeout=config.store_timeout,
            batch_window=config.batch_window,
        )
        if isinstance(self.ledger, PartitionedLedger):
            # Each partition publishes on its own slot's shard.
            self.rooms.bus = PartBus(
                store_url,
                self.rooms.on_message,
                self.ledger,
                timeout=config.store_timeout,
                metrics=self.metrics,
            )
        self.http = Http(
            ledger=self.ledger,
            metrics=self.metrics,
            secret=config.secret,
            timeout=config.store_timeout,
            subscribed=self.rooms.bus.connected.is_set,
        )
        self.catalog = [{"id": g.id, "name": g.name, "coins": g.coins} for g in config.catalog]
        self.prices = config.catalog_prices()
        self.conns: set[Conn] = set()
        # Per user (all of a user's connections here): command and gift buckets.
        self._user_buckets: dict[str, tuple[_Bucket, _Bucket]] = {}
        self._ids = itertools.count(1)
        self.server: Server | None = None
        # Shutdown: set by ``going_away``; commands read from then on are refused,
        # and ``_idle`` is set whenever no command already read is still running.
        self.stopping = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.ops: dict[str, Handler] = {
            "auth": self.op_auth,
            "catalog": self.op_catalog,
            "balance": self.op_balance,
            "go_live": self.op_go_live,
            "end_live": self.op_end_live,
            "join": self.op_join,
            "leave": self.op_leave,
            "feed": self.op_feed,
            "history": self.op_history,
            "ping": self.op_ping,
        }
        # The coin economy beyond gifts: its ops live in their own modules.
        self.shop = Shop(self)
        self.campaigns = Campaigns(self)
        self.ops.update(self.shop.ops)
        self.ops.update(self.campaigns.ops)
        if config.partitions > 1:
            # Not partitioned yet (docs/scaling.md, Status): refused as ``forbidden``.
            self.ops.update(refused_ops({*self.shop.ops, *self.campaigns.ops} - {"effects"}))
        # ``gift`` is dispatched by the read loop itself (it runs concurrently).
        assert {*self.ops, "gift"} == COMMANDS, "protocol.messages.COMMANDS is out of date"
        # The op label of a command's metrics: one of ours, or ``unknown``
        # (a client must not be able to mint new time series).
        self._op_labels = {op: op for op in COMMANDS}

    @property
    def port(self) -> int:
        assert self.server is not None
        for sock in self.server.sockets:
            port: int = sock.getsockname()[1]
            return port
        raise RuntimeError("hub is not listening")

    # -- connection lifecycle -----------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        conn = Conn(
            ws=ws,
            id=f"{self.hub_id}.{next(self._ids)}",
            json=ws.subprotocol == SUBPROTOCOL_JSON,
            deflate=_deflate(ws),
            limit=self.config.send_queue,
            metrics=self.metrics,
        )
        self.conns.add(conn)
        self.metrics.connections_total += 1
        opened = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                try:
                    if self.stopping:  # its handshake ended after the hub began to stop
                        conn.close(CLOSE_GOING_AWAY, "server going away")
                    else:
                        await self._handshake_token(conn)
                    event(
                        log,
                        logging.INFO,
                        "conn.open",
                        conn=conn.id,
                        peer=_peer(ws),
                        user=conn.claims.user if conn.claims else None,
                        proto="json" if conn.json else "msgpack",
                        deflate=conn.deflate,
                    )
                    if conn.closing is None:
                        await self._read(conn, tg)
                finally:
                    await conn.done()
        finally:
            self.conns.discard(conn)
            # The code the hub closed with (4009...), whether or not the client
            # answered it; else the client's, or 1006 when no close frame came.
            by = "server" if conn.closing is not None else "client"
            code = conn.closing[0] if conn.closing is not None else ws.close_code or 1006
            # The client picks its close code: unknown ones share one label.
            self.metrics.closes[code if code in _CLOSE_LABELS else 0] += 1
            event(
                log,
                logging.INFO,
                "conn.close",
                conn=conn.id,
                user=conn.claims.user if conn.claims else None,
                code=code,
                by=by,
                reason=conn.closing[1] if conn.closing is not None else ws.close_reason or None,
                secs=round(time.monotonic() - opened, 3),
                frames=conn.frames_in,
                failed=conn.failures,
            )
            changed = self.rooms.remove_conn(conn)
            if conn.claims is not None and conn.user not in self.rooms.users:
                self._user_buckets.pop(conn.user, None)  # the user's last connection here
            for room in changed:
                with contextlib.suppress(Exception):
                    await self.rooms.publish_presence(room)

    async def _handshake_token(self, conn: Conn) -> None:
        """A ``?token=`` in the handshake authenticates; a bad one closes with 4001."""
        assert conn.ws.request is not None
        _, _, query = conn.ws.request.path.partition("?")
        tokens = parse_qs(query).get("token")
        if not tokens:
            return
        try:
            claims = verify(self.config.secret, tokens[0])
            if claims.admin:
                raise errors.Unauthenticated("admin tokens are for the HTTP admin API only")
            self._check_conns(claims.user)
            conn.claims = claims
            await self.rooms.add_user(conn)
        except errors.RateLimited as exc:
            conn.claims = None
            conn.close(CLOSE_RATE_LIMITED, str(exc))
        except errors.GiftingError as exc:
            conn.claims = None
            conn.close(CLOSE_NOT_AUTHENTICATED, f"token rejected: {exc}")
        except TimeoutError:
            conn.close(CLOSE_NOT_AUTHENTICATED, "store unavailable, try again")

    async def _read(self, conn: Conn, tg: asyncio.TaskGroup) -> None:
        # One timer per connection, not a timeout around every read before auth.
        timer = None
        if conn.claims is None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.config.auth_timeout, _auth_expired, conn)
        try:
            await self._read_frames(conn, tg)
        finally:
            if timer is not None:
                timer.cancel()

    async def _read_frames(self, conn: Conn, tg: asyncio.TaskGroup) -> None:
        ws = conn.ws
        commands = _Bucket(self.config.command_rate, self.config.command_burst)
        conn.money = _Bucket(self.config.gift_rate, self.config.gift_burst)
        in_flight = asyncio.Semaphore(_MAX_GIFTS_IN_FLIGHT)
        strikes = 0
        while conn.closing is None:
            try:
                frame = await ws.recv()
            except ConnectionClosed:
                return
            conn.frames_in += 1
            try:
                cmd = codec.decode_command(frame)
            except codec.UndecodableFrame as exc:
                self.metrics.bad_frames += 1
                self._log_failure(conn, None, "frame", "bad_request", str(exc))
                conn.send({"ev": "error", "code": "bad_request", "message": str(exc)})
                continue
            except codec.MalformedCommand as exc:
                self._reply_error(conn, exc.id, "invalid", errors.BadRequest(str(exc)))
                continue
            op = self._op_labels.get(cmd.op, "unknown")
            if self.stopping:
                # Read after shutdown began: answered at once, without the store,
                # so the drain ends; the client retries elsewhere with the same key.
                self._reply_error(conn, cmd.id, op, errors.Unavailable("server going away; retry"))
                continue
            if not commands.take() or not self._user_take(conn, 0):
                strikes += 1
                self._reply_error(conn, cmd.id, op, errors.RateLimited("too many commands"))
                if strikes >= self.config.rate_limit_strikes:
                    conn.close(CLOSE_RATE_LIMITED, "rate limit exceeded repeatedly")
                continue
            strikes = 0
            if cmd.op == "gift" and conn.claims is not None:
                t0 = time.perf_counter()
                try:
                    limited = self.money_limited(conn)
                    call = self._gift_checks(conn, cmd, limited=limited)
                except errors.GiftingError as exc:
                    self._gift_failed(conn, cmd.id, exc, t0)
                    continue
                except FieldError as exc:
                    self._gift_failed(conn, cmd.id, errors.BadRequest(str(exc)), t0)
                    continue
                await in_flight.acquire()
                task = tg.create_task(self._gift(conn, cmd.id, call, in_flight, t0))
                self._begin()
                task.add_done_callback(self._end)
                continue
            self._begin()
            try:
                await self._command(conn, cmd, op)
            finally:
                self._end()

    async def _command(self, conn: Conn, cmd: Command, op: str) -> None:
        handler = self.ops.get(cmd.op)
        try:
            if conn.claims is None and cmd.op != "auth":
                raise errors.Unauthenticated("send 'auth' first")
            if handler is None:
                raise errors.UnknownOp(f"unknown op {cmd.op[:64]!r}")
            async with asyncio.timeout(self.config.store_timeout):
                result = await handler(conn, cmd.args)
        except errors.GiftingError as exc:
            self._reply_error(conn, cmd.id, op, exc)
        except FieldError as exc:
            self._reply_error(conn, cmd.id, op, errors.BadRequest(str(exc)))
        except TimeoutError:
            self._reply_error(
                conn, cmd.id, op, errors.Unavailable("the store did not answer in time")
            )
        except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
            # A store call outside the ledger's mapping (presence, counts): the
            # store is unreachable or not ready, which is ``unavailable``, not ours.
            # (``RedisClusterException``: a cluster client that lost its slot map.)
            self.metrics.store_errors["hub"] += 1
            self._reply_error(conn, cmd.id, op, _store_unavailable(conn, cmd.id, op, exc))
        except Exception:
            self._reply_error(conn, cmd.id, op, _internal_error(conn, cmd.id, op))
        else:
            self.metrics.commands[op, "ok"] += 1
            conn.send({"id": cmd.id, "ok": result})

    def _reply_error(self, conn: Conn, id: int, op: str, exc: errors.GiftingError) -> None:
        code = exc.code.value
        self.metrics.commands[op, code] += 1
        self._log_failure(conn, id, op, code, str(exc))
        conn.send({"id": id, "error": {"code": code, "message": str(exc)}})

    def _log_failure(self, conn: Conn, id: int | None, op: str, code: str, message: str) -> None:
        """One line per failed command, within the connection's log budget (a
        client sending garbage in a loop must not be able to flood the log)."""
        conn.failures += 1
        if not conn.may_log(time.monotonic()):
            return
        event(
            log,
            logging.WARNING if code in _SERVER_SIDE else logging.INFO,
            "cmd.failed",
            conn=conn.id,
            req=f"{conn.id}/{id}" if id is not None else None,
            user=conn.claims.user if conn.claims else None,
            op=op,
            code=code,
            message=message[:200],
        )

    def _gift_failed(self, conn: Conn, id: int, exc: errors.GiftingError, t0: float) -> None:
        self.metrics.gifts[exc.code.value] += 1
        self.metrics.gift_seconds.observe(time.perf_counter() - t0)
        self._reply_error(conn, id, "gift", exc)

    # -- gifts ---------------------------------------------------------------

    def _gift_checks(self, conn: Conn, cmd: Command, *, limited: bool) -> dict[str, Any]:
        """The hub-side checks, in the contract's order; the rest run in the store."""
        args = cmd.args
        room = req_id_str(args, "room")
        gift = args.get("gift")
        if type(gift) is not str or not 0 < len(gift) <= 64:
            raise FieldError("'gift' must be a catalog id")
        key = args.get("key")
        if not valid_key(key):
            # Required: without a key a retry could pay twice.
            raise FieldError("'key' (idempotency key) must be 1-64 printable ASCII characters")
        count = opt_int(args, "count", 1)
        if not 1 <= count <= MAX_COUNT:
            raise errors.InvalidCount(f"count must be 1-{MAX_COUNT}, got {count}")
        if gift not in self.prices:
            raise errors.UnknownGift(f"no such gift: {gift!r}")
        if room == conn.user:
            raise errors.SelfGift("you cannot gift in your own room")
        if room not in conn.rooms:
            raise errors.NotInRoom(f"join {room!r} first")
        claims = conn.claims
        assert claims is not None
        return {
            "sender": claims.user,
            "room": room,
            "gift": gift,
            "count": count,
            "key": key,
            "name": claims.name,
            "avatar": claims.avatar,
            "limited": limited,
            "conn": conn.id,
            "cap": (
                self.config.minor_daily_spend_cap if claims.minor else self.config.daily_spend_cap
            ),
        }

    async def _gift(
        self,
        conn: Conn,
        id: int,
        call: dict[str, Any],
        in_flight: asyncio.Semaphore,
        t0: float,
    ) -> None:
        try:
            if not self.rooms.bus.connected.is_set():
                # The bubble would reach no one on this hub: let the client retry.
                raise errors.Unavailable("reconnecting to the store; retry with the same key")
            async with asyncio.timeout(self.config.store_timeout):
                res = await self.ledger.gift(**call)
        except errors.GiftingError as exc:
            self._gift_failed(conn, id, exc, t0)
        except TimeoutError:
            self._gift_failed(conn, id, errors.Unavailable("the store did not answer in time"), t0)
        except Exception:
            self._gift_failed(conn, id, _internal_error(conn, id, "gift"), t0)
        else:
            m = self.metrics
            m.commands["gift", "ok"] += 1
            m.gifts["duplicate" if res.duplicate else "ok"] += 1
            m.gift_seconds.observe(time.perf_counter() - t0)
            conn.send(
                {
                    "id": id,
                    "ok": {
                        "transfer": res.transfer,
                        "coins": res.coins,
                        "combo": res.combo,
                        "duplicate": res.duplicate,
                    },
                }
            )
        finally:
            in_flight.release()

    # -- commands ------------------------------------------------------------

    async def op_auth(self, conn: Conn, args: dict[str, Any]) -> Result:
        claims = verify(self.config.secret, args.get("token"))
        if claims.admin:
            raise errors.Unauthenticated("admin tokens are for the HTTP admin API only")
        if conn.claims is not None and conn.claims.user != claims.user:
            raise errors.Forbidden("this connection is already authenticated as another user")
        if conn.claims is None:
            self._check_conns(claims.user)
            conn.claims = claims
            try:
                await self.rooms.add_user(conn)
            except BaseException:
                conn.claims = None
                raise
        return {
            "user": claims.user,
            "name": claims.name,
            "coins": await self.ledger.balance(claims.user),
        }

    async def op_catalog(self, conn: Conn, args: dict[str, Any]) -> Result:
        return {"gifts": self.catalog}

    async def op_balance(self, conn: Conn, args: dict[str, Any]) -> Result:
        return {"coins": await self.ledger.balance(conn.user)}

    async def op_ping(self, conn: Conn, args: dict[str, Any]) -> Result:
        return {"time": int(time.time() * 1000)}

    async def op_go_live(self, conn: Conn, args: dict[str, Any]) -> Result:
        title = opt_str(args, "title", _MAX_TITLE)
        room = conn.user
        if room not in conn.rooms:
            await self._join_local(conn, room, CREATOR)
        res = await self.ledger.go_live(room, title)
        event(log, logging.INFO, "room.live", conn=conn.id, room=room, session=res.session)
        return {"room": room, "session": res.session}

    async def op_end_live(self, conn: Conn, args: dict[str, Any]) -> Result:
        room = conn.user
        res = await self.ledger.end_live(room)
        event(
            log,
            logging.INFO,
            "room.ended",
            conn=conn.id,
            room=room,
            session=res.session,
            earned=res.coins,
        )
        return {"room": room, "session": res.session, "coins": res.coins}

    def _check_conns(self, user: str) -> None:
        if len(self.rooms.users.get(user, ())) >= self.config.max_conns_per_user:
            raise errors.RateLimited(
                f"at most {self.config.max_conns_per_user} connections per user"
            )

    def money_limited(self, conn: Conn) -> bool:
        """Take a money move (gift, effect, buy) from the connection's and the
        user's buckets; True when either is empty. The store answers
        ``rate_limited`` at its place in the contract's check order."""
        return not (conn.money.take() and self._user_take(conn, 1))

    def _user_take(self, conn: Conn, which: int) -> bool:
        """Take a token from the user's command (0) or gift (1) bucket."""
        if conn.claims is None:
            return True
        buckets = self._user_buckets.get(conn.claims.user)
        if buckets is None:
            c = self.config
            buckets = self._user_buckets[conn.claims.user] = (
                _Bucket(c.user_command_rate, c.user_command_burst),
                _Bucket(c.user_gift_rate, c.user_gift_burst),
            )
        return buckets[which].take()

    async def _join_local(self, conn: Conn, room: str, role: str) -> None:
        if len(conn.rooms) >= self.config.max_rooms_per_conn:
            raise errors.Forbidden(
                f"a connection may join at most {self.config.max_rooms_per_conn} rooms"
            )
        try:
            await self.rooms.join(conn, room, role)
        except TimeoutError:
            raise errors.Unavailable("the store did not confirm the subscription") from None

    async def op_join(self, conn: Conn, args: dict[str, Any]) -> Result:
        room = req_id_str(args, "room")
        role = CREATOR if room == conn.user else VIEWER
        if room not in conn.rooms:
            await self._join_local(conn, room, role)
        state = await self.ledger.room_state(room)
        top = await self.ledger.top(room, state.session)
        viewers = (await self.rooms.viewers([room]))[room]
        self.rooms.set_session(room, state.session)
        return {
            "room": room,
            "role": role,
            "live": state.live,
            "session": state.session,
            "title": state.title,
            "viewers": viewers,
            "top": top,
            "pinned": await self.shop.pinned(room),
        }

    async def op_leave(self, conn: Conn, args: dict[str, Any]) -> Result:
        room = req_id_str(args, "room")
        if room not in conn.rooms:
            raise errors.NotInRoom(f"not a member of {room!r}")
        await self.rooms.leave(conn, room)
        return {"room": room}

    async def op_feed(self, conn: Conn, args: dict[str, Any]) -> Result:
        room = req_id_str(args, "room")
        after = args.get("after")
        if after is not None and not _valid_offset(after):
            raise FieldError("'after' must be an offset from a previous feed entry")
        limit = _limit(args, 100)
        if room != conn.user:
            raise errors.Forbidden("only the room's creator can read its feed")
        entries = await self.ledger.feed(room, after, limit)
        return {"entries": entries, "next": entries[-1]["offset"] if entries else after}

    async def op_history(self, conn: Conn, args: dict[str, Any]) -> Result:
        before = args.get("before")
        if before is not None and (type(before) is not int or before < 1):
            raise FieldError("'before' must be a transfer id")
        limit = _limit(args, 50)
        return {"entries": await self.ledger.history(conn.user, before, limit)}

    def _gauges(self) -> Gauges:
        """What ``/metrics`` reads from the hub when scraped (nothing keeps it meanwhile)."""
        conns, rooms = self.conns, self.rooms.rooms.values()
        queued = [c.queued for c in conns if c.queue]
        windows = [len(r.window) for r in rooms if r.window is not None]
        return Gauges(
            connections=len(conns),
            authenticated=sum(1 for c in conns if c.claims is not None),
            rooms=len(self.rooms.rooms),
            members=sum(len(r.members) for r in rooms),
            queued_bytes=sum(queued),
            queued_frames=sum(len(c.queue) for c in conns),
            max_queued_bytes=max(queued, default=0),
            backlogged=len(queued),
            batching_rooms=len(windows),
            batched_events=sum(windows),
            bus_connected=self.rooms.bus.connected.is_set(),
        )

    # -- shutdown ------------------------------------------------------------

    def _begin(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _end(self, _task: object = None) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def going_away(self, server: Server) -> None:
        """Stop gracefully, in bounded time whatever the clients and the store do.

        New connections are refused at once. Commands already read get their
        real answers: a gift under way in the store is not cut off, or its
        sender could not tell whether it paid (each runs under the store
        timeout). Commands read from now on are answered ``unavailable``. Then
        every client gets what is queued for it, ``bye`` and close 1001; one
        that does not take them within ``CLOSE_DRAIN_TIMEOUT`` is aborted, as
        is any handler still running after that.
        """
        self.stopping = True
        # The listening socket closes now (``Server.close`` would close it only
        # in a task); an opening handshake still under way is answered 503, one
        # that already ended is closed by ``handler``.
        server.server.close()
        server.close(close_connections=False)
        event(log, logging.INFO, "hub.draining", conns=len(self.conns), in_flight=self._busy)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.store_timeout + _SHUTDOWN_SLACK):
                await self._idle.wait()
        for conn in list(self.conns):
            conn.close(CLOSE_GOING_AWAY, "server going away", flush=True)
        try:
            async with asyncio.timeout(CLOSE_DRAIN_TIMEOUT + _SHUTDOWN_SLACK):
                await server.wait_closed()
        except TimeoutError:
            # Left: clients that never finished their opening handshake, and
            # handlers stuck in a store call (presence) with the store gone.
            event(log, logging.WARNING, "hub.abort_connections", handlers=len(server.handler_tasks))
            for ws in list(server.all_connections):
                ws.transport.abort()
            for task in list(server.handler_tasks):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SHUTDOWN_SLACK):
                    await server.wait_closed()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel background tasks and wait for them, cancelling again any that
    swallowed it: a store client call cut at the wrong moment can (seen with
    the ticker, about once in 30 stops), and one task left running would keep
    the task group, and so the process, alive for ever."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)


@contextlib.asynccontextmanager
async def running_hub(
    config: Config, store_url: str, *, client: cluster.StoreClient | None = None
) -> AsyncIterator[Hub]:
    """Start a hub on ``config.port`` (0 for any) against the store at ``store_url``."""
    own_client = client is None
    if client is None:
        # A single server or a cluster (``redis+cluster://``): see ``gifting.cluster``.
        client = cluster.client(store_url, timeout=config.store_timeout)
    hub = Hub(config, client, store_url)
    try:
        await hub.ledger.load(config.catalog_prices(), {e.id: e.coins for e in config.effects})
        await hub.rooms.heartbeat()
        async with asyncio.TaskGroup() as tg:
            bus = tg.create_task(hub.rooms.bus.run())
            pipeliner = tg.create_task(hub.ledger.run(store_url, timeout=config.store_timeout))
            ticker = tg.create_task(hub.rooms.ticker())
            sweeper = tg.create_task(hub.campaigns.sweeper())
            background = [bus, ticker, pipeliner, sweeper]
            if isinstance(hub.ledger, PartitionedLedger):
                background.append(tg.create_task(hub.ledger.relay_loop()))
            async with asyncio.timeout(config.store_timeout):
                await hub.rooms.bus.connected.wait()
            async with serve(
                hub.handler,
                config.host,
                config.port,
                create_connection=HttpConnection,
                process_request=hub.http.process_request,
                select_subprotocol=_select_subprotocol,
                # Compression per connection would compress every room frame once
                # per member (it cost 2/3 of the hub's CPU in a hot room). With no
                # context takeover a message compresses the same for everyone, so
                # ``Frames`` compresses it once for the room.
                compression=None,
                extensions=[
                    ServerPerMessageDeflateFactory(
                        server_no_context_takeover=True,
                        client_no_context_takeover=True,
                        server_max_window_bits=DEFLATE_BITS,
                    )
                ],
                max_size=MAX_FRAME,
                max_queue=64,
                write_limit=32 * 1024,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=2,
                server_header="gifting",
                reuse_port=config.reuse_port,
            ) as server:
                hub.server = server
                try:
                    yield hub
                finally:
                    await hub.going_away(server)
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1):
                            await hub.rooms.stop()
            await _cancel(background)
    finally:
        if own_client:
            await client.aclose()
