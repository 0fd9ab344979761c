"""``scripts/chaos.py`` end to end: faults at random under a steady load, no violation.

The short run (about 8 s of load) is part of every test run; the minute-long
one is marked ``full`` (``scripts/test --full``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.test_cli import clean_env

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"


async def _chaos(out: Path, *args: str, within: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=clean_env(),
    )
    try:
        async with asyncio.timeout(within):
            text, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()  # its hubs and store are left to its own cleanup
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, text.decode(errors="replace")


async def test_chaos_short(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    rc, text = await _chaos(
        out, "--duration", "8", "--seed", "164", "--fault-every", "1.5", within=50
    )
    assert rc == 0, text
    summary = json.loads(out.read_text())
    assert summary["ok"] and not summary["violations"]
    # this seed's schedule: a hub killed, the store killed while clients reconnect,
    # connections dropped
    assert {"hub_kill", "store_kill", "drop_clients"} <= set(summary["faults"]), text
    assert summary["gifts"]["acked"] > 0 and summary["retries"] > 0, text


@pytest.mark.full
@pytest.mark.timeout(300)
async def test_chaos_full(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    rc, text = await _chaos(out, "--duration", "60", within=280)
    assert rc == 0, text
    assert json.loads(out.read_text())["ok"]
