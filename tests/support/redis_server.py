"""A throwaway redis-server for tests: a free loopback port, its own folder, no persistence, always stopped.

The session-wide `redis_server` fixture (conftest.py) starts one with start(); a test that needs its
own server (to stop it mid-test) calls require() and start() itself."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest

from support.processes import track
from support.servers import free_port


@dataclass
class RedisServer:
    """A running redis-server: its URL (database 0) and process."""

    url: str
    port: int
    proc: subprocess.Popen

    def client(self):
        """A redis-py client on database 0."""
        import redis
        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        """Terminate (then kill) the server; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start(folder, port: int | None = None, persist: bool = False) -> RedisServer:
    """Start redis-server in `folder` (on `port`, else a free one); raises if it does not answer
    PING within 20 s. persist: an append-only file synced at every write (survives kill -9)."""
    import redis
    port = port or free_port()
    log = open(folder / "redis.log", "ab")
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    proc = track(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   *durability, "--dir", str(folder)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    log.close()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, proc)
    deadline = time.monotonic() + 20
    while True:
        try:
            if server.client().ping():
                return server
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("redis-server did not start: " + (folder / "redis.log").read_text())
        time.sleep(0.05)


def available() -> str | None:
    """Why Redis tests cannot run here, or None when they can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make test-deps installs it)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install -e '.[test]')"
    return None


def require() -> None:
    """Skip a Redis test where Redis is missing, except in CI (make test-deps installs it): fail there."""
    reason = available()
    if reason and os.environ.get("CI"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
