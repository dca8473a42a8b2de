"""Start ``kvpool serve`` in a subprocess on a free 127.0.0.1 port, with bounded waits.

    with ServerProcess(cache_dir, models_dir, "--api-key", "k") as server:
        httpx.get(server.url + "/health")
    # left: SIGTERM, then SIGKILL if it has not exited within the timeout

The port is chosen by the server (``--port 0``) and read from the line it prints once it
listens; every wait (startup, exit) has a timeout and the process is killed on failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

STARTUP_TIMEOUT_S = 180.0  # builds the demo model on first use; 2 shared cores
EXIT_TIMEOUT_S = 60.0
_LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """A ``kvpool serve`` subprocess; ``url`` is its base URL once :meth:`start` returns."""

    def __init__(self, cache_dir: Path, models_dir: Path, *args: str) -> None:
        self.cache_dir = cache_dir
        self.args = [
            sys.executable, "-c", "import sys; from kvpool.cli import main; sys.exit(main())",
            "serve", "--model", "demo", "--port", "0", "--cache-dir", str(cache_dir),
            "--log-level", "warning", *args,
        ]  # fmt: skip
        self.env = {**os.environ, "KVPOOL_CACHE_DIR": str(models_dir), "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []  # stdout and stderr lines, as they arrive
        self._ready = threading.Event()

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("kvpool serve did not start:\n" + self.log())
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = _LISTENING.search(line)
            if match and not self._ready.is_set():
                self.url = match.group(1)
                self._ready.set()

    def log(self) -> str:
        return "".join(self.output[-50:])

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL, then raises, past the timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("kvpool serve did not exit after SIGTERM:\n" + self.log()) from None

    def kill(self) -> None:
        """SIGKILL (no cleanup of any kind) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(EXIT_TIMEOUT_S)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            finally:
                self.kill()


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``predicate()`` until it returns something truthy; raise past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
