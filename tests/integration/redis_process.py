"""Start ``redis-server`` on a free 127.0.0.1 port for a test, with bounded waits.

    with RedisProcess(tmp_path) as redis_server:
        client = redis_server.client()
    # left: SIGKILL and reaped; nothing is written outside ``tmp_path``

No persistence by default (``--save '' --appendonly no``; ``persist=True`` turns on an
append-only file with ``appendfsync always`` in the temporary directory, for tests that
restart it). :func:`require_redis_server` skips when the binary is missing, except on CI
(``$CI`` set), where it fails: CI installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

START_TIMEOUT_S = 20.0


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must install it (.ci/run does)")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A ``redis-server`` on 127.0.0.1:``port`` with its files in ``directory``."""

    def __init__(self, directory: Path, *args: str, persist: bool = False) -> None:
        self.binary = require_redis_server()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = list(args)
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            *persistence, "--dir", str(self.directory), "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", str(self.directory / "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        while True:
            try:
                if client.ping():
                    break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"redis-server did not start on {self.port}:\n{log}"
                    ) from None
                time.sleep(0.05)
        client.close()
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0)

    def kill(self) -> None:
        """SIGKILL (no shutdown save of any kind) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20.0)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
