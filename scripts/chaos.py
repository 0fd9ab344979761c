#!/usr/bin/env python3
"""Chaos: a steady gift load on hubs sharing one store, with faults at random.

    scripts/chaos.py [--duration 60] [--seed N] [--senders 8] [--hubs 2] [--out PATH]

One store (``appendfsync always``) in a temporary directory and ``--hubs``
``gifting serve --redis-url`` processes on it, all on loopback. Two creators
are live; ``--senders`` senders, spread over the hubs, gift to both rooms at
``--rate`` gifts/s each, every gift with its own key, through
``Client.send_gift`` (which retries with the key after ``unavailable``, a
timeout or a dropped connection, moving to a live hub). ``--viewers`` viewers
follow the rooms, reconnecting and re-joining when dropped.

Every ``--fault-every`` seconds on average (at most ``--max-faults`` in all,
one at a time, each followed by waiting for every hub's ``/healthz`` to be 200
again), one of:

- ``hub_kill``: SIGKILL a live hub, then start a new one;
- ``store_stop`` / ``store_kill``: SIGTERM or SIGKILL the store, start it again
  from the same directory after 0.2-4 s (at times past the hub's 3 s store
  timeout); half of the time some clients' connections are cut in the middle
  of the outage, so they reconnect to a hub that cannot reach its store;
- ``drop_clients``: cut some senders' and viewers' connections (no close
  handshake), as a network failure would.

When ``send_gift`` gives up on a gift (attempts spent, or an error it does not
retry) the driver keeps the key and tries again from a new ``Client``, counting
it under ``gave_up``; after the run, keys still without an answer are sent once
more. Then the checks, each failure a violation: every acked gift in the journal
exactly once; no key paid twice; each sender's balance is its top-up less its
acked costs, each creator's its share of them; no negative balance; every key
answered; ``gifting audit`` exits 0; no hub died unless killed; every viewer got
its bubbles in ``seq`` order and still receives them at the end.

Prints a summary and writes it as JSON to ``--out``; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.clients import Ack, Sender, Viewer, pick_gift  # noqa: E402
from tests.faults.cluster import Cluster, HubProc  # noqa: E402

ROOMS = ("c0", "c1")
TOPUP = 10**9
# Seconds: a client's request, a hub's recovery after a fault, a hub's start.
TIMEOUT = 5.0
RECOVERY = 20.0
START = 30.0
KINDS = {"hub_kill": 3, "store_stop": 1, "store_kill": 1, "drop_clients": 3}


class Chaos:
    """One run: the clients, the fault schedule (from ``--seed``), what was seen."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster) -> None:
        self.args = args
        self.cluster = cluster
        self.rng = random.Random(args.seed)
        self.senders: list[Sender] = []
        self.viewers: list[Viewer] = []
        self.faults: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.t0 = 0.0
        self.stopping = False
        self.recovery_s: list[float] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # -- setup

    async def setup(self) -> None:
        c, a = self.cluster, self.args
        hubs = list(await asyncio.gather(*(c.start_hub() for _ in range(a.hubs))))
        for room in ROOMS:
            await c.go_live(room)
        for i in range(a.senders):
            rng = random.Random(f"{a.seed}-s{i}")
            # ``repoint=False``: between gifts, ``send_gift`` itself reconnects
            # (to the hub it had, which may be dead) and recovers by its retries.
            s = await c.sender(
                f"s{i}",
                hubs[i % len(hubs)],
                list(ROOMS),
                coins=TOPUP,
                attempts=8,
                rng=rng,
                repoint=False,
            )
            self.senders.append(s)
        for i in range(a.viewers):
            v = await c.viewer(f"v{i}", hubs[i % len(hubs)], ROOMS[i % len(ROOMS)])
            v.follow(within=RECOVERY)
            self.viewers.append(v)

    # -- load

    async def send(self, s: Sender, rng: random.Random) -> None:
        interval = 1.0 / self.args.rate
        start = time.monotonic() + rng.uniform(0, interval)
        for k in itertools.count():
            if self.stopping:
                return
            delay = start + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            gift, count = pick_gift(rng)
            await s.gift_until_answered(
                rng.choice(ROOMS), gift, count, within=self.args.gift_within
            )

    # -- faults

    async def inject(self, until: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while len(self.faults) < self.args.max_faults:
            gap = min(self.rng.expovariate(1 / self.args.fault_every), 3 * self.args.fault_every)
            if time.monotonic() + gap >= until:
                return
            await asyncio.sleep(gap)
            kind = self.rng.choices(kinds, weights)[0]
            fault: dict[str, Any] = {"t": self.now(), "kind": kind}
            self.faults.append(fault)
            if kind == "hub_kill":
                await self.hub_kill(fault)
            elif kind in ("store_stop", "store_kill"):
                await self.store_restart(fault, kill=kind == "store_kill")
            else:
                self.drop_clients(fault)
            await self.recover(fault)

    async def hub_kill(self, fault: dict[str, Any]) -> None:
        live = self.cluster.live()
        if not live:
            fault["detail"] = "no live hub"
            return
        hub = self.rng.choice(live)
        fault["detail"] = hub.name
        await hub.kill9(TIMEOUT)
        new = await self.start_hub()
        fault["detail"] += f" -> {new.name if new else 'none'}"

    async def start_hub(self) -> HubProc | None:
        deadline = time.monotonic() + RECOVERY
        while time.monotonic() < deadline:
            try:
                return await self.cluster.start_hub()
            except RuntimeError as exc:  # it could not reach the store yet, say
                print(f"chaos: a new hub failed to start, retrying: {exc}", file=sys.stderr)
        self.violations.append(f"no new hub could be started within {RECOVERY}s")
        return None

    async def store_restart(self, fault: dict[str, Any], *, kill: bool) -> None:
        outage = round(self.rng.uniform(0.2, 4.0), 2)
        fault["detail"] = f"down {outage}s"
        await self.cluster.stop_store(kill=kill)
        if self.rng.random() < 0.5:
            # Faults overlap too: clients that reconnect while the store is down.
            await asyncio.sleep(0.1)
            drop: dict[str, Any] = {}
            self.drop_clients(drop)
            fault["detail"] += f", dropped {drop['detail']} meanwhile"
            await asyncio.sleep(outage - 0.1)
        else:
            await asyncio.sleep(outage)  # the outage itself, not a wait for an event
        await self.cluster.start_store()

    def drop_clients(self, fault: dict[str, Any]) -> None:
        members: list[Sender | Viewer] = [*self.senders, *self.viewers]
        chosen = self.rng.sample(members, self.rng.randint(1, max(1, len(members) // 3)))
        for m in chosen:
            m.drop()
        fault["detail"] = " ".join(m.user for m in chosen)

    async def recover(self, fault: dict[str, Any]) -> None:
        """Every live hub answers ``/healthz`` 200 again, within ``RECOVERY``."""
        t = time.monotonic()
        try:
            async with asyncio.timeout(RECOVERY):
                for hub in self.cluster.live():
                    await self.cluster.until_health(hub, 200)
        except TimeoutError:
            self.violations.append(f"a hub was not healthy {RECOVERY}s after {fault}")
        self.recovery_s.append(time.monotonic() - t)

    # -- the run

    async def run(self) -> None:
        self.t0 = time.monotonic()
        until = self.t0 + self.args.duration
        async with asyncio.TaskGroup() as tg:
            load = [
                tg.create_task(self.send(s, random.Random(f"{self.args.seed}-load{i}")))
                for i, s in enumerate(self.senders)
            ]
            await self.inject(until)
            await asyncio.sleep(max(0.0, until - time.monotonic()))  # the run's length
            self.stopping = True
            async with asyncio.timeout(self.args.gift_within + RECOVERY):
                await asyncio.gather(*load)

    async def resolve(self) -> int:
        """Send each key still without an answer once more, now that faults stopped."""
        n = 0
        for s in self.senders:
            for key, (room, gift, count) in list(s.pending.items()):
                await s.restart()
                await s.gift_until_answered(room, gift, count, key=key, within=RECOVERY)
                n += 1
        return n

    async def viewers_still_follow(self) -> None:
        """One more gift per room: every viewer, reconnected or not, must get it."""
        async with asyncio.timeout(RECOVERY):
            for v in self.viewers:
                while v.reconnecting or v.client.closed.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        s = self.senders[0]
        last = {}
        for room in ROOMS:
            await s.gift_until_answered(room, "rose", 1, within=RECOVERY)
            last[room] = await self.cluster.room_seq(room)
        for v in self.viewers:
            try:
                async with asyncio.timeout(TIMEOUT):
                    await v.wait_seq(last[v.room])
            except TimeoutError:
                self.violations.append(
                    f"viewer {v.user} stopped receiving bubbles of {v.room}: last seq "
                    f"{v.last_seq}, the room's {last[v.room]}"
                )
            if v.reconnect_errors["gave_up"]:
                self.violations.append(f"viewer {v.user} could not reconnect in {RECOVERY}s")
            self.violations += v.order_violations()

    async def check(self) -> dict[str, Any]:
        for hub in self.cluster.hubs:
            if not hub.killed and hub.proc.returncode is not None:
                self.violations.append(
                    f"hub {hub.name} exited by itself ({hub.proc.returncode}): {hub.log_tail()}"
                )
        acks = [a for s in self.senders for a in s.acks]
        pending = sum(len(s.pending) for s in self.senders)
        if pending:
            self.violations.append(f"{pending} gifts never got an answer")
        self.violations += await self.cluster.violations(
            acks, creators=dict.fromkeys(ROOMS, 0), complete=not pending
        )
        rc, out = await self.cluster.audit()
        if rc != 0:
            self.violations.append(f"gifting audit exited {rc}:\n{out}")
        return {"rc": rc, "summary": [ln for ln in out.splitlines() if "DIFFERENCE" not in ln]}

    def summary(self, acks: list[Ack], audit: dict[str, Any], resolved: int) -> dict[str, Any]:
        def total(attr: str) -> dict[str, int]:
            out: Counter[str] = Counter()
            for s in self.senders:
                out.update(getattr(s, attr))
            return dict(out.most_common())

        reconnect_errors: Counter[str] = Counter()
        byes: Counter[int] = Counter()
        for v in self.viewers:
            reconnect_errors.update(v.reconnect_errors)
            byes.update(v.byes)
        return {
            "ok": not self.violations,
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "elapsed_s": self.now(),
            "hubs": {"at_start": self.args.hubs, "started": len(self.cluster.hubs)},
            "senders": len(self.senders),
            "viewers": len(self.viewers),
            "rate_per_sender": self.args.rate,
            "faults": dict(Counter(f["kind"] for f in self.faults)),
            "fault_log": self.faults,
            "recovery_s_max": round(max(self.recovery_s, default=0.0), 3),
            "gifts": {
                "acked": len(acks),
                "acked_duplicate": sum(a.duplicate for a in acks),
                "final_errors": total("final_errors"),
                "resolved_after_run": resolved,
                "unanswered": sum(len(s.pending) for s in self.senders),
            },
            "retries": sum(s.retries for s in self.senders),
            "retry_errors": total("retry_errors"),
            "send_gift_gave_up": total("gave_up"),
            "viewer_reconnects": sum(v.reconnects for v in self.viewers),
            "viewer_reconnect_errors": dict(reconnect_errors.most_common()),
            "viewer_bubbles": sum(len(v.seqs) for v in self.viewers),
            "viewer_byes": {str(k): n for k, n in byes.items()},
            "audit": audit,
            "violations": self.violations,
        }


def _print(s: dict[str, Any], out: Path) -> None:
    g = s["gifts"]
    print(
        f"chaos: seed {s['seed']}, {s['elapsed_s']:.1f}s, {s['senders']} senders at "
        f"{s['rate_per_sender']}/s, {s['viewers']} viewers, hubs {s['hubs']}"
    )
    print(f"  faults injected: {s['faults'] or 'none'} (slowest recovery {s['recovery_s_max']}s)")
    print(
        f"  gifts acked: {g['acked']} ({g['acked_duplicate']} answered duplicate: "
        f"paid on an attempt whose answer was lost), final errors {g['final_errors']}, "
        f"resolved after the run {g['resolved_after_run']}, unanswered {g['unanswered']}"
    )
    print(f"  send_gift retries: {s['retries']} by error {s['retry_errors']}")
    print(f"  send_gift gave up (retried by the driver, same key): {s['send_gift_gave_up']}")
    print(
        f"  viewers: {s['viewer_reconnects']} reconnects, errors "
        f"{s['viewer_reconnect_errors']}, {s['viewer_bubbles']} bubbles, byes {s['viewer_byes']}"
    )
    print(f"  audit: exit {s['audit']['rc']}: {' | '.join(s['audit']['summary'])}")
    if s["violations"]:
        print(f"  VIOLATIONS ({len(s['violations'])}):")
        for v in s["violations"]:
            print(f"    - {v}")
    else:
        print("  no violations")
    print(f"  wrote {out}")


async def _main(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    async with Cluster(
        workdir, secret=secrets.token_hex(32).encode(), timeout=TIMEOUT, start_timeout=START
    ) as cluster:
        if not cluster.url.startswith("unix://"):
            raise SystemExit(f"chaos: the store needs a short directory, got {cluster.url}")
        chaos = Chaos(args, cluster)
        await chaos.setup()
        deadline = args.duration + args.gift_within + 4 * RECOVERY + 60
        try:
            async with asyncio.timeout(deadline):
                await chaos.run()
                resolved = await chaos.resolve()
                await chaos.viewers_still_follow()
                audit = await chaos.check()
        except TimeoutError:
            chaos.violations.append(f"the run did not finish within {deadline:.0f}s")
            resolved, audit = 0, {"rc": None, "summary": []}
        acks = [a for s in chaos.senders for a in s.acks]
        return chaos.summary(acks, audit, resolved)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="faults and gifts (default: random)")
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--viewers", type=int, default=4)
    ap.add_argument("--hubs", type=int, default=2)
    ap.add_argument("--rate", type=float, default=10.0, help="gifts/s per sender (default 10)")
    ap.add_argument("--fault-every", type=float, default=3.0, help="mean seconds between faults")
    ap.add_argument("--max-faults", type=int, default=None, help="default: duration / 2")
    ap.add_argument("--gift-within", type=float, default=30.0, help="seconds per gift, retries in")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts/bench/results/chaos.json")
    ap.add_argument("--keep", action="store_true", help="keep the store and hub logs")
    args = ap.parse_args()
    if not (0 < args.duration <= 3600 and 1 <= args.hubs <= 8 and 1 <= args.senders <= 200):
        ap.error("need 0 < duration <= 3600, 1-8 hubs, 1-200 senders")
    if args.viewers < 0 or args.rate <= 0 or args.fault_every <= 0:
        ap.error("need viewers >= 0, rate > 0, fault-every > 0")
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if args.max_faults is None:
        args.max_faults = max(1, int(args.duration / 2))
    workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    try:
        summary = asyncio.run(_main(args, workdir))
    finally:
        if args.keep:
            print(f"chaos: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    _print(summary, args.out)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    raise SystemExit(130)
