"""Child processes (Debian's Prometheus, Alertmanager, VictoriaMetrics, a daemon) started, awaited and stopped."""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request


def binary(*names: str) -> str | None:
    """The first of these executables found on PATH or in /usr/bin (Debian's packages)."""
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if found:
            return found
    return None


_HELD: dict[int, socket.socket] = {}


def free_port() -> int:
    """A loopback TCP port, held (bound, not listening) until the process given it starts: Proc.start
    releases it, so no other bind(0) on the machine can take it in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    _HELD[port] = sock
    return port


def release(*ports: int) -> None:
    """Let go of held ports (their process is about to bind them)."""
    for port in ports:
        sock = _HELD.pop(port, None)
        if sock is not None:
            sock.close()


class Proc:
    """A child process in its own session (Ctrl-C reaches only us), logging to a file, stopped by us."""

    def __init__(self, name: str, cmd: list[str], log_path: str, env: dict | None = None,
                 ports: tuple[int, ...] = ()):
        """ports: ports from free_port() the process binds, released when it starts."""
        self.name, self.cmd, self.log_path, self.env, self.ports = name, cmd, log_path, env, ports
        self.popen: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "Proc":
        """Start the process (output to log_path)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        release(*self.ports)
        self.popen = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=self.env, start_new_session=True)
        return self

    def alive(self) -> bool:
        """Started and not exited."""
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the process printed."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:  # never started
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL its process group; returns the exit code."""
        if self.popen is None:
            release(*self.ports)  # never started: let its ports go
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, not a shutdown)."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def wait_http(self, url: str, timeout: float = 120.0, ca_file: str | None = None,
                  auth: tuple[str, str] | None = None) -> None:
        """Poll url until it answers 200; raise with the log's tail if the process dies or time runs out."""
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        request = urllib.request.Request(url)
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen and self.popen.returncode}) before "
                                   f"{url} answered:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        return
            except OSError:  # not listening yet, or 503 while starting
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name}: {url} did not answer 200 within {timeout:g}s:\n{self.log_tail()}")
