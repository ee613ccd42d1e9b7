"""Start real processes for tests (gunicorn via `edgechat serve`), on free loopback ports."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests

from support.processes import track


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None,
              status: int = 200) -> None:
    """Poll url until it answers `status`; fail early if proc died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == status:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s")


class Daemon:
    """`edgechat serve` on builtin:tiny (or another model) as a real gunicorn, stopped on exit."""

    def __init__(self, tmp_path, cache_dir: str, *args: str, env: dict | None = None,
                 start_timeout: float = 180.0, metrics_dir: str | None = "metrics",
                 command: list[str] | None = None):
        """metrics_dir: a folder under tmp_path, or None for the daemon's own default. command: what runs
        `edgechat` instead of this interpreter's `-m daemon` (this checkout); a command given runs in
        tmp_path, so it imports the daemon it was installed with, not the checkout."""
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = str(tmp_path / metrics_dir) if metrics_dir else None
        self.log_path = tmp_path / "daemon.log"
        self.state_dir = str(tmp_path / "state")
        self.cmd = [*(command or [sys.executable, "-m", "daemon"]), "serve", "--port", str(self.port),
                    "--cache-dir", cache_dir, "--state-dir", self.state_dir,
                    *(["--metrics-dir", self.metrics_dir] if self.metrics_dir else []),
                    "--threads", "1", "--metrics-refresh-s", "1", *args]
        if "--model" not in args:
            self.cmd += ["--model", "builtin:tiny"]
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("EDGECHAT_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env.update(env or {})
        self.start_timeout = start_timeout
        self.command = command
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float | None = None) -> "Daemon":
        """Start and wait until /readyz says ready (timeout: start_timeout unless given).

        A Daemon starts once: a second start (`with d.start():` is one, `with` starts too) raises
        instead of starting a second server that cannot bind the port while the first one, no
        longer referenced, is never stopped."""
        if self.proc is not None:
            raise RuntimeError(f"this Daemon was started already (pid {self.proc.pid}); "
                               "use either start()/stop() or `with Daemon(...)`, not both")
        self._log = open(self.log_path, "wb")
        self.proc = track(subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=None if self.command is None else self.tmp_path))
        try:
            wait_http(self.url + "/readyz", self.start_timeout if timeout is None else timeout, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def log(self) -> str:
        """What the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the master, wait, kill the group if it hangs; returns the exit code. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll predicate() every 0.1 s until it is truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
