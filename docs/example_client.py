"""A creator goes live, a viewer joins and sends a gift: ``protocol.client`` at work.

Against a hub started with ``gifting serve`` (its demo viewer has coins), mint
the two tokens from the hub's data directory::

    python docs/example_client.py --data-dir .gifting

or bring your own tokens (the viewer needs coins: ``gifting topup bob 100 --key k1``)::

    python docs/example_client.py --url ws://localhost:8765/ws \\
        --creator-token "$(gifting token alice)" --viewer-token "$(gifting token bob)"

It prints each step. Exit status 0 when every step worked, 1 when the hub
refused one or could not be reached (the reason is printed on stderr), 2 for
bad arguments. See docs/client.md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

from websockets.exceptions import WebSocketException

from protocol import errors
from protocol.client import Client, ConnectionLost, new_key

DEFAULT_URL = "ws://localhost:8765/ws"
DESCRIPTION = "A creator goes live, a viewer joins and sends a gift."


async def run(args: argparse.Namespace, creator_token: str, viewer_token: str) -> None:
    opts = {"json": args.json, "timeout": args.timeout}
    # ``token=`` makes the client send ``auth`` first (and again after a reconnect).
    async with await Client.connect(args.url, token=creator_token, **opts) as creator:
        coins = (await creator.request("balance"))["coins"]
        print(f"creator: authenticated as {creator.user} ({coins} coins)")
        live = await creator.request("go_live", title=args.title)
        room, session = live["room"], live["session"]
        print(f"creator: live in room {room}, session {session}")

        async with await Client.connect(args.url, token=viewer_token, **opts) as viewer:
            coins = (await viewer.request("balance"))["coins"]
            print(f"viewer: authenticated as {viewer.user} ({coins} coins)")
            gifts = (await viewer.request("catalog"))["gifts"]
            print("viewer: catalog: " + ", ".join(f"{g['id']}={g['coins']}" for g in gifts))
            joined = await viewer.request("join", room=room)
            print(f"viewer: joined {room} (live={joined['live']}, viewers={joined['viewers']})")

            # An error reply is an exception of its code's class.
            try:
                await viewer.send_gift(room, args.gift, count=100)
            except errors.InvalidCount as exc:
                print(f"viewer: refused as expected: {exc.code}: {exc}")

            # The key is made before the first attempt; ``send_gift`` retries
            # with it after a timeout or a dropped connection, so the gift is
            # paid at most once. Sending the same key again is a duplicate.
            key = new_key()
            sent = await viewer.send_gift(room, args.gift, count=args.count, key=key)
            print(
                f"viewer: sent {args.count} x {args.gift}: transfer {sent['transfer']}, "
                f"{sent['coins']} coins left, combo {sent['combo']}"
            )
            again = await viewer.send_gift(room, args.gift, count=args.count, key=key)
            print(
                f"viewer: retried with the same key: transfer {again['transfer']}, "
                f"duplicate={again['duplicate']}, {again['coins']} coins left"
            )

            bubble = await viewer.next_event("bubble")
            print(
                f"viewer: bubble #{bubble['seq']}: {bubble['from']['name']} sent "
                f"{bubble['count']} x {bubble['gift']} ({bubble['coins']} coins)"
            )
            gift = await creator.next_event("gift")
            print(
                f"creator: gift from {gift['from']['name']}: {gift['count']} x {gift['gift']}, "
                f"earned {gift['earned']} ({gift['total']} this session)"
            )
            balance = await creator.next_event("balance")
            print(f"creator: balance now {balance['coins']} coins")

        ended = await creator.request("end_live")
        print(f"creator: ended session {ended['session']}, earned {ended['coins']} coins")


def mint(user: str, data_dir: str) -> str:
    """A token from ``gifting token``, signed with the secret of the hub's data dir."""
    cmd = [sys.executable, "-m", "gifting", "token", user, "--data-dir", data_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"example: {' '.join(cmd[1:])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument(
        "--url", default=DEFAULT_URL, help=f"the hub's WebSocket (default {DEFAULT_URL})"
    )
    p.add_argument("--creator-token", help="the creator's token (gifting token USER)")
    p.add_argument("--viewer-token", help="the viewer's token; the viewer needs coins")
    p.add_argument(
        "--data-dir", help="mint missing tokens with `gifting token` from this hub data dir"
    )
    p.add_argument("--creator", default="demo_creator", help="with --data-dir (demo_creator)")
    p.add_argument("--viewer", default="demo_viewer", help="with --data-dir (demo_viewer)")
    p.add_argument("--gift", default="rose", help="a catalog id (default rose)")
    p.add_argument("--count", type=int, default=3, help="1-99 (default 3)")
    p.add_argument("--title", default="Example show")
    p.add_argument("--json", action="store_true", help="JSON frames instead of MessagePack")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per wait (default 10)")
    args = p.parse_args()
    creator_token, viewer_token = args.creator_token, args.viewer_token
    if args.data_dir is not None:
        creator_token = creator_token or mint(args.creator, args.data_dir)
        viewer_token = viewer_token or mint(args.viewer, args.data_dir)
    if not creator_token or not viewer_token:
        p.error("give --creator-token and --viewer-token, or --data-dir")
    try:
        asyncio.run(run(args, creator_token, viewer_token))
    except errors.GiftingError as exc:
        print(f"example: refused: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (ConnectionLost, OSError, TimeoutError, WebSocketException) as exc:
        print(f"example: no answer from {args.url}: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
