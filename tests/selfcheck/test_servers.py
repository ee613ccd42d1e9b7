"""support/servers.py's Daemon: started once, stopped on exit. A stand-in HTTP server answers /readyz in
place of `edgechat serve`, so no model loads."""
from __future__ import annotations

import sys

import pytest

from support.servers import Daemon


def stand_in(tmp_path) -> Daemon:
    """A Daemon whose command is Python's http.server, serving a folder with a `readyz` file."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "readyz").write_text("ready")
    d = Daemon(tmp_path, "unused-cache")
    d.cmd = [sys.executable, "-m", "http.server", str(d.port), "--bind", "127.0.0.1", "--directory", str(www)]
    return d


def test_a_second_start_raises_and_the_first_server_is_the_one_stopped(tmp_path):
    d = stand_in(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="started already"):
            with d.start(timeout=60):  # start(), then `with` starts again: raises, nothing more starts
                pass
        first = d.proc
        assert first.poll() is None
        with pytest.raises(RuntimeError, match="started already"):
            d.start()
        assert d.proc is first
    finally:
        d.stop()
    assert first.poll() is not None


def test_with_starts_once_and_stops_at_the_end(tmp_path):
    with stand_in(tmp_path) as d:
        proc = d.proc
        assert proc.poll() is None
    assert proc.poll() is not None and d.stop() == proc.returncode  # a second stop changes nothing
