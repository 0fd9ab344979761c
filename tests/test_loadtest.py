"""The load test itself: a small run end to end, and the loopback-only rule.

The smoke run is the real thing shrunk: the script starts its own hub
(``gifting serve --port 0``), spawns two client processes, sends gifts for
three seconds and audits the store; it must take seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import loadtest
from tests.conftest import T

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # The started hub must use its own data dir and secret, not the caller's.
    return {k: v for k, v in os.environ.items() if not k.startswith("GIFTING_")}


@pytest.mark.timeout(120 * T / 5)
def test_smoke_run(tmp_path: Path) -> None:
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    ran = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "loadtest.py"),
            *("--viewers", "40", "--rooms", "2", "--rate", "50", "--duration", "3"),
            *("--procs", "2", "--json-report", str(report), "--plot", str(plot)),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90 * T / 5,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    r = json.loads(report.read_text())
    assert r["ok"] is True and r["failures"] == []
    assert r["setup"]["connected"] == 40
    assert r["gifts"]["acked"] > 0
    assert r["gifts"]["errors"] == {}
    assert r["bubbles"]["received"] > 0
    assert r["bubbles"]["lost"] == 0
    assert r["bubbles"]["duplicated"] == 0
    # Every viewer of a room sees every gift of that room.
    assert r["bubbles"]["received"] == 20 * r["gifts"]["acked"]
    assert r["money"]["double_spends"] == 0 and r["money"]["unchecked"] == 0
    assert r["audit"]["ran"] is True and r["audit"]["ok"] is True
    assert r["ack_latency_ms"]["count"] == r["gifts"]["acked"]
    assert r["series"] and r["series"][0]["sent"] > 0
    assert plot.stat().st_size > 0
    assert "PASS" in ran.stdout


@pytest.mark.parametrize(
    "url",
    [
        "ws://example.com:8765/ws",
        "ws://192.0.2.1:8765/ws",
        "ws://0.0.0.0:8765/ws",
        "ws://127.0.0.1.example.com:8765/ws",
        "ws://[2001:db8::1]:8765/ws",
    ],
)
def test_non_loopback_url_is_refused(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest.main(["--url", url, "--data-dir", "unused", "--no-plot"]) == 2
    assert "only loopback targets" in capsys.readouterr().err


def test_non_loopback_url_is_refused_by_the_script() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", "ws://10.1.2.3:80/ws"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30 * T / 5,
    )
    assert ran.returncode == 2
    assert "only loopback targets" in ran.stderr
