"""docs/example_client.py, run as a program against a real hub, so the
documented example cannot rot."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import SECRET, T, balances, token, topup, ws_url

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example_client.py"


async def run_example(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the example; its exit status, stdout and stderr. Bounded: a hung
    example is killed and fails the test."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        "--timeout",
        str(T),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=EXAMPLE.parent.parent,
        env={**os.environ, **(env or {})},
    )
    try:
        # Interpreter starts (the example's, and `gifting token`'s with --data-dir)
        # come on top of the example's own waits, each bounded by T.
        async with asyncio.timeout(3 * T):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("json", [False, True], ids=["msgpack", "json"])
async def test_example_runs_the_gift_path(hub, json):
    await topup(hub, "bob", 100)
    rc, out, err = await run_example(
        "--url",
        ws_url(hub),
        "--creator-token",
        token("alice", "Alice"),
        "--viewer-token",
        token("bob", "Bob"),
        "--gift",
        "star",
        "--count",
        "2",
        *(["--json"] if json else []),
    )
    assert (rc, err) == (0, ""), out
    lines = out.splitlines()
    expected = [
        "creator: authenticated as alice (0 coins)",
        "creator: live in room alice, session ",
        "viewer: authenticated as bob (100 coins)",
        "viewer: catalog: rose=1, heart=5, star=10",
        "viewer: joined alice (live=True, viewers=1)",
        "viewer: refused as expected: invalid_count: count must be 1-99, got 100",
        "viewer: sent 2 x star: transfer ",
        "viewer: retried with the same key: transfer ",
        "viewer: bubble #1: Bob sent 2 x star (20 coins)",
        "creator: gift from Bob: 2 x star, earned 10 (10 this session)",
        "creator: balance now 10 coins",
        "creator: ended session ",
    ]
    assert len(lines) == len(expected), out
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    sent, again = lines[6], lines[7]
    transfer = sent.split("transfer ")[1].split(",")[0]
    assert "80 coins left" in sent
    assert again.endswith(f"transfer {transfer}, duplicate=True, 80 coins left")
    assert lines[-1].endswith("earned 10 coins")
    # The retry moved nothing: the gift was paid once.
    bals = await balances(hub)
    assert (bals["bob"], bals["alice"], bals["~platform"]) == (80, 10, 10)


async def test_example_mints_tokens_from_a_data_dir(hub, tmp_path):
    """``--data-dir`` mints the tokens with ``gifting token`` (the hub's secret
    comes from GIFTING_SECRET, as for a hub started with it)."""
    await topup(hub, "demo_viewer", 10)
    rc, out, err = await run_example(
        "--url",
        ws_url(hub),
        "--data-dir",
        str(tmp_path),
        env={"GIFTING_SECRET": SECRET.decode()},
    )
    assert (rc, err) == (0, ""), out
    assert "creator: authenticated as demo_creator (0 coins)" in out
    assert "viewer: sent 3 x rose: transfer " in out
    assert (await balances(hub))["demo_viewer"] == 7


async def test_example_reports_a_refusal(hub):
    """A viewer without coins: the hub's error is printed and the exit status is 1."""
    before = await balances(hub)
    rc, out, err = await run_example(
        "--url",
        ws_url(hub),
        "--creator-token",
        token("alice"),
        "--viewer-token",
        token("bob"),
    )
    assert rc == 1, (out, err)
    assert "viewer: refused as expected: invalid_count" in out
    assert err.startswith("example: refused: insufficient_funds: need 3 coins, have 0")
    assert await balances(hub) == before


async def test_example_needs_tokens():
    rc, _, err = await run_example("--url", "ws://127.0.0.1:9/ws")
    assert rc == 2 and "--creator-token" in err
