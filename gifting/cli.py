"""`gifting serve|token|topup|reverse|audit`: the one entry point; builds the one Config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gifting import auth, logs, workers
from gifting.cluster import as_cluster_url, is_cluster
from gifting.cluster import client as store_client
from gifting.cluster import parse as parse_cluster_url
from gifting.config import DEFAULT_EFFECTS, CatalogGift, Config
from gifting.hub import running_hub
from gifting.ledger import Ledger
from gifting.ledger.ledger import MAX_BALANCE
from gifting.ledger.partitioned import PartitionedLedger
from gifting.store import EmbeddedStore, load_secret, running_store_url, store_for
from protocol import errors
from protocol.messages import valid_id, valid_key

__all__ = ["main"]

log = logging.getLogger("gifting")

DEMO_CREATOR = ("demo_creator", "Demo Creator")
DEMO_VIEWER = ("demo_viewer", "Demo Viewer")


def _secret(data_dir: Path) -> bytes:
    env = os.environ.get("GIFTING_SECRET")
    if env is None:
        return load_secret(data_dir)
    if len(env.encode()) < 32:
        raise SystemExit("gifting: GIFTING_SECRET must be at least 32 bytes (HS256 key)")
    return env.encode()


def _redis_url(flag: str | None, cluster: bool = False) -> str | None:
    """The store's URL; with ``--cluster`` a ``redis://`` one names a cluster's seed."""
    url = flag or os.environ.get("GIFTING_REDIS_URL") or None
    if cluster and url is None:
        raise SystemExit("gifting: --cluster needs --redis-url (or GIFTING_REDIS_URL)")
    try:
        if url is not None and (cluster or is_cluster(url)):
            url = as_cluster_url(url)
            parse_cluster_url(url)
    except ValueError as exc:
        raise SystemExit(f"gifting: {exc}") from None
    return url


_CLUSTER_HELP = "the store is a Valkey/Redis Cluster; --redis-url names a seed node"


def _user(value: str) -> str:
    if not valid_id(value):
        raise argparse.ArgumentTypeError("user ids match [A-Za-z0-9_-]{1,64}")
    return value


def _workers(text: str) -> int:
    """``--workers``: a count of 1-256, or ``auto`` (the CPUs this process may use)."""
    if text == "auto":
        return max(1, min(workers.cpu_count(), _MAX_WORKERS))
    if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= _MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 1-{_MAX_WORKERS} or auto")
    return int(text)


# More hub processes than this is a typo, not a deployment.
_MAX_WORKERS = 256
# ``--ack-replicas``: more replicas per master than this is a typo. And the
# ``WAIT`` must end well inside the 3 s a store call may take.
_MAX_ACK_REPLICAS = 5
_MAX_PARTITIONS = 1024
_MAX_ACK_TIMEOUT = 2000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gifting", description="Live-stream gifting server.")
    sub = p.add_subparsers(dest="command", required=True)

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--data-dir", type=Path, default=Path(".gifting"), help="default ./.gifting"
        )

    s = sub.add_parser("serve", help="run a hub")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument(
        "--redis-url",
        help="use this Redis >= 7 / Valkey instead of the embedded one "
        "(redis+cluster://host:port[,host:port...] for a cluster)",
    )
    s.add_argument("--cluster", action="store_true", help=_CLUSTER_HELP)
    data_dir(s)
    s.add_argument("--prefix", default="g", help="store key prefix (default g)")
    s.add_argument("--creator-share", type=int, default=50, help="percent of a gift (default 50)")
    s.add_argument(
        "--seller-share", type=int, default=90, help="percent of a shop sale (default 90)"
    )
    s.add_argument(
        "--effects",
        type=_effects,
        default=None,
        metavar="ID:NAME:COINS,...",
        help="the effects catalog (default confetti:Confetti:20,fireworks:Fireworks:200,"
        "crown:Crown:1000)",
    )
    s.add_argument(
        "--fsync",
        choices=["always", "everysec"],
        default="always",
        help="embedded store appendfsync (default always)",
    )
    s.add_argument(
        "--batch-window",
        type=float,
        default=0.1,
        help="seconds a busy room's events are gathered into one batch frame, 0-0.1 "
        "(0: a frame per event; default 0.1)",
    )
    s.add_argument(
        "--daily-cap", type=int, default=0, help="coins a user may gift per UTC day (0: no cap)"
    )
    s.add_argument(
        "--minor-daily-cap",
        type=int,
        default=1000,
        help="the same for tokens with the minor claim (default 1000)",
    )
    s.add_argument(
        "--ack-replicas",
        type=int,
        default=0,
        metavar="K",
        help="ack a coin move only once K replicas of the store hold it, 0-5 "
        "(default 0: once the master has it)",
    )
    s.add_argument(
        "--ack-timeout",
        type=int,
        default=1000,
        metavar="MS",
        help="how long a move waits for its replicas before the answer is unavailable, "
        "1-2000 ms (default 1000)",
    )
    s.add_argument("--no-demo", action="store_true", help="no demo tokens or demo top-up")
    s.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING, ERROR")
    s.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=None,
        help="text (default; or env GIFTING_LOG_FORMAT) or json: one object per line",
    )
    s.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop: uvloop when installed (auto), or force one",
    )
    s.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="hub processes sharing the port and the store, restarted when one dies "
        "(default 1; auto: one per CPU)",
    )
    s.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="ledger partitions by user (default 1: one ledger slot); 2 or more "
        "spreads gifts over slots (docs/scaling.md); effects, shop, campaigns and "
        "reversals need 1",
    )
    # Set by ``--workers N`` on the processes it starts: the worker's index.
    s.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)

    t = sub.add_parser("token", help="print a token")
    t.add_argument("user", nargs="?", type=_user)
    t.add_argument("--name")
    t.add_argument("--avatar")
    t.add_argument("--ttl", type=int, default=24 * 3600)
    t.add_argument("--admin", action="store_true")
    t.add_argument("--brand", action="store_true")
    t.add_argument("--minor", action="store_true", help="a minor's account (lower spend cap)")
    data_dir(t)

    u = sub.add_parser("topup", help="add coins to a user (idempotent by key)")
    u.add_argument("user", type=_user)
    u.add_argument("coins", type=int)
    u.add_argument("--key", required=True)
    u.add_argument("--redis-url")
    u.add_argument("--cluster", action="store_true", help=_CLUSTER_HELP)
    u.add_argument("--prefix", default="g")
    u.add_argument("--partitions", type=int, default=1, help="as serve's")
    data_dir(u)

    r = sub.add_parser(
        "reverse", help="undo a transfer with a compensating one (idempotent by key)"
    )
    r.add_argument("transfer", type=int)
    r.add_argument("--key", required=True)
    r.add_argument(
        "--allow-negative",
        action="store_true",
        help="take the coins back even if an account goes negative",
    )
    r.add_argument("--reason", default="")
    r.add_argument("--redis-url")
    r.add_argument("--cluster", action="store_true", help=_CLUSTER_HELP)
    r.add_argument("--prefix", default="g")
    r.add_argument("--partitions", type=int, default=1, help="as serve's")
    data_dir(r)

    a = sub.add_parser("audit", help="replay the journal and check every balance")
    a.add_argument("--redis-url")
    a.add_argument("--cluster", action="store_true", help=_CLUSTER_HELP)
    a.add_argument("--prefix", default="g")
    a.add_argument("--partitions", type=int, default=1, help="as serve's")
    data_dir(a)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv)
    if args.command == "token":
        return _token(args)
    if args.command == "topup":
        return asyncio.run(_topup(args))
    if args.command == "reverse":
        return asyncio.run(_reverse(args))
    return asyncio.run(_audit(args))


def _token(args: argparse.Namespace) -> int:
    user = args.user or ("admin" if args.admin else None)
    if user is None:
        print("gifting token: USER is required (or --admin)", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("gifting token: --ttl must be positive", file=sys.stderr)
        return 2
    token = auth.mint(
        _secret(args.data_dir),
        user,
        name=args.name,
        avatar=args.avatar,
        ttl=args.ttl,
        admin=args.admin,
        brand=args.brand,
        minor=args.minor,
    )
    print(token)
    return 0


@contextlib.asynccontextmanager
async def _ledger(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    with store_for(args.data_dir, _redis_url(args.redis_url, args.cluster)) as url:
        client = store_client(url, timeout=10)
        try:
            if args.partitions > 1:
                yield PartitionedLedger(client, partitions=args.partitions, prefix=args.prefix)
            else:
                yield Ledger(client, prefix=args.prefix)
        finally:
            await client.aclose()


async def _keyed(args: argparse.Namespace, call: Callable[[Ledger], Awaitable[str]]) -> int:
    """A keyed money command (topup, reverse): check the key, run, print its line."""
    if not valid_key(args.key):
        print(
            f"gifting {args.command}: --key must be 1-64 printable ASCII characters",
            file=sys.stderr,
        )
        return 2
    async with _ledger(args) as ledger:
        try:
            await ledger.load({})
            line = await call(ledger)
        except errors.GiftingError as exc:
            print(f"gifting {args.command}: {exc.code.value}: {exc}", file=sys.stderr)
            return 1
    print(line)
    return 0


async def _topup(args: argparse.Namespace) -> int:
    async def call(ledger: Ledger) -> str:
        return str((await ledger.topup(args.user, args.coins, args.key)).coins)

    return await _keyed(args, call)


async def _reverse(args: argparse.Namespace) -> int:
    async def call(ledger: Ledger) -> str:
        res = await ledger.reverse(
            args.transfer, args.key, allow_negative=args.allow_negative, reason=args.reason
        )
        note = " (already done with this key)" if res.duplicate else ""
        return f"transfer {res.reversed} reversed by transfer {res.transfer}{note}"

    return await _keyed(args, call)


async def _audit(args: argparse.Namespace) -> int:
    async with _ledger(args) as ledger:
        report = await ledger.audit()
    print(
        f"audit: {report.entries} journal entries, {report.accounts} accounts, "
        f"balances sum to {report.total}"
    )
    for line in report.notes:
        print(f"audit: NOTE {line}")
    if report.ok:
        print("audit: OK")
        return 0
    for line in report.differences:
        print(f"audit: DIFFERENCE {line}")
    print(f"audit: FAILED with {len(report.differences)} differences")
    return 1


def _effects(text: str) -> tuple[CatalogGift, ...]:
    """``id:Name:coins,...`` -> the effects catalog (argparse type: errors exit 2)."""
    out: dict[str, CatalogGift] = {}
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"{item!r} is not ID:NAME:COINS")
        eid, name, coins = parts
        if not valid_id(eid) or eid in out:
            raise argparse.ArgumentTypeError(
                f"effect id {eid!r} is not a new [A-Za-z0-9_-]{{1,64}}"
            )
        if not 1 <= len(name) <= 40:
            raise argparse.ArgumentTypeError(f"effect name {name!r} must be 1-40 characters")
        if not re.fullmatch(r"[0-9]{1,10}", coins) or not 1 <= int(coins) <= 10**9:
            raise argparse.ArgumentTypeError(f"effect price {coins!r} must be 1-1000000000")
        out[eid] = CatalogGift(eid, name, int(coins))
    return tuple(out.values())


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    fmt = args.log_format or os.environ.get("GIFTING_LOG_FORMAT") or "text"
    if fmt not in logs.FORMATS:
        print(f"gifting serve: log format must be one of {logs.FORMATS}", file=sys.stderr)
        return 2
    try:
        logs.setup(fmt, args.log_level)
    except ValueError as exc:
        print(f"gifting serve: --log-level: {exc}", file=sys.stderr)
        return 2
    if not (0 <= args.creator_share <= 100 and 0 <= args.seller_share <= 100):
        print("gifting serve: --creator-share and --seller-share must be 0-100", file=sys.stderr)
        return 2
    if not (0 <= args.daily_cap <= MAX_BALANCE and 0 <= args.minor_daily_cap <= MAX_BALANCE):
        print(
            "gifting serve: daily caps must be 0 (none) or a positive coin count", file=sys.stderr
        )
        return 2
    if not 0 <= args.batch_window <= 0.1:
        print("gifting serve: --batch-window must be 0-0.1 seconds", file=sys.stderr)
        return 2
    if not 0 <= args.ack_replicas <= _MAX_ACK_REPLICAS:
        print(f"gifting serve: --ack-replicas must be 0-{_MAX_ACK_REPLICAS}", file=sys.stderr)
        return 2
    if not 1 <= args.ack_timeout <= _MAX_ACK_TIMEOUT:
        print(f"gifting serve: --ack-timeout must be 1-{_MAX_ACK_TIMEOUT} ms", file=sys.stderr)
        return 2
    if not 1 <= args.partitions <= _MAX_PARTITIONS or (args.partitions > 1 and args.ack_replicas):
        print(
            f"gifting serve: --partitions must be 1-{_MAX_PARTITIONS} (and 1 with --ack-replicas)",
            file=sys.stderr,
        )
        return 2
    data_dir: Path = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    config = Config(
        host=args.host,
        port=args.port,
        redis_url=_redis_url(args.redis_url, args.cluster),
        data_dir=data_dir,
        secret=_secret(data_dir),
        prefix=args.prefix,
        creator_share_pct=args.creator_share,
        seller_share_pct=args.seller_share,
        effects=args.effects or DEFAULT_EFFECTS,
        batch_window=args.batch_window,
        ack_replicas=args.ack_replicas,
        ack_timeout=args.ack_timeout,
        daily_spend_cap=args.daily_cap,
        minor_daily_spend_cap=args.minor_daily_cap,
        demo=not args.no_demo,
        reuse_port=args.worker is not None,
        partitions=args.partitions,
    )
    if args.worker is not None and config.redis_url is None:
        print("gifting serve: a --worker needs the store's URL", file=sys.stderr)
        return 2
    store: EmbeddedStore | None = None
    # Until ``_run`` hands the signals to the event loop, a SIGTERM is noted
    # and acted on there: killed mid-start, the process would leave the store
    # started here running (it has its own session). A flag, not an exception
    # raised wherever the signal lands, which a ``__del__`` could swallow.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: early.append(signum))
    try:
        url = config.redis_url or running_store_url(data_dir)
        if url is None:
            store = EmbeddedStore(data_dir, fsync=args.fsync)
            url = store.start()
            logs.event(
                log,
                logging.INFO,
                "store.started",
                url=logs.redact_url(url),
                dir=str(data_dir / "store"),
            )
        if args.workers > 1:
            return _serve_workers(args, argv, replace(config, redis_url=url), early)
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            runner.run(_run(replace(config, redis_url=url), url, early, worker=args.worker))
    except KeyboardInterrupt:
        pass
    finally:
        if store is not None:
            store.stop()
            logs.event(log, logging.INFO, "store.stopped")
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (the ``fast`` extra) when asked for, or when installed and ``auto``."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("gifting: --loop uvloop needs `pip install gifting[fast]`") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _serve_workers(
    args: argparse.Namespace, argv: Sequence[str], config: Config, early: Sequence[int]
) -> int:
    """``serve --workers N``: this process supervises, N ``serve --worker`` processes serve."""
    assert config.redis_url is not None
    try:
        reserved = workers.reserve_port(config.host, config.port)
    except OSError as exc:
        print(
            f"gifting serve: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr
        )
        return 1
    port: int = reserved.getsockname()[1]

    def command(index: int, first: bool) -> list[str]:
        # The same flags, so each worker builds the same Config; later flags win.
        # Only worker 0's first start tops up the demo viewer and prints the line.
        cmd = [sys.executable, "-m", "gifting", *argv, "--port", str(port)]
        cmd += ["--workers", "1", "--worker", str(index)]
        return cmd + ([] if index == 0 and first else ["--no-demo"])

    # The store's URL travels in the environment: a password stays off `ps`.
    env = {**os.environ, "GIFTING_REDIS_URL": config.redis_url}

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if early:
            stop.set()
        await workers.supervise(
            args.workers,
            command,
            env=env,
            stop=stop,
            ready=lambda line: print(line, flush=True),
        )

    try:
        with reserved, asyncio.Runner() as runner:
            runner.run(run())
    except workers.WorkerFailed as exc:
        print(f"gifting serve: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run(
    config: Config, url: str, early: Sequence[int] = (), *, worker: int | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if early:  # signalled before the loop took over: start, then stop at once
        stop.set()
    if worker is not None:
        _stop_with_parent(loop, stop)
    async with running_hub(config, url) as hub:
        # What is alive now (modules, config, scripts) lives as long as the
        # process: keep it out of every collection, and collect young objects
        # less often (each connection allocates a few hundred).
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        base = f"http://{host}:{hub.port}/"
        if config.demo:
            await _demo_topup(hub.ledger)
            creator = auth.mint(config.secret, DEMO_CREATOR[0], name=DEMO_CREATOR[1])
            viewer = auth.mint(config.secret, DEMO_VIEWER[0], name=DEMO_VIEWER[1])
            line = f"{base}?room={DEMO_CREATOR[0]}&creator={quote(creator)}&viewer={quote(viewer)}"
        else:
            line = base
        # A worker names itself; a single process has no worker field.
        named: dict[str, Any] = {} if worker is None else {"worker": worker}
        logs.event(
            log,
            logging.INFO,
            "hub.ready",
            hub=hub.hub_id,
            port=hub.port,
            store=logs.redact_url(url),
            **named,
        )
        print(f"gifting: serving {line}", flush=True)
        await stop.wait()
        # Leaving the block stops the hub gracefully (``Hub.going_away``).
        logs.event(log, logging.INFO, "hub.stopping")
    logs.event(log, logging.INFO, "hub.stopped")


def _stop_with_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """A worker's stdin is a pipe from its parent, never written: when it ends
    the parent is gone (even by SIGKILL), and the worker drains and exits
    rather than serve on unsupervised."""
    if not stat.S_ISFIFO(os.fstat(0).st_mode):
        return

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            stop.set()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)


async def _demo_topup(ledger: Ledger) -> None:
    """Give the demo viewer coins to play with, once per store (idempotent key)."""
    try:
        await ledger.topup(DEMO_VIEWER[0], 10_000, "demo:welcome")
    except errors.GiftingError as exc:
        logs.event(log, logging.WARNING, "demo.topup_failed", error=str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
