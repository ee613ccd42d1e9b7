"""Two daemons on one host (two models, or staging beside production) keep their own metrics."""
from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
import requests

from support.servers import Daemon

pytestmark = pytest.mark.e2e


def _pids(text: str, metric: str) -> set[str]:
    return set(re.findall(rf'^{metric}{{[^}}]*pid="(\d+)"', text, re.M))


def test_two_daemons_side_by_side_each_report_their_own_worker(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    env = {"XDG_RUNTIME_DIR": str(run)}  # both default their metrics folder under the same runtime dir
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    daemons = [Daemon(tmp_path / name, cache_dir, env=env, metrics_dir=None) for name in ("a", "b")]
    errors: list[BaseException] = []

    def start(d: Daemon) -> None:
        try:
            d.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(d,)) for d in daemons]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        workers = [requests.get(d.url + "/readyz", timeout=10).json()["pid"] for d in daemons]
        for d, mine, theirs in zip(daemons, workers, reversed(workers)):
            text = requests.get(d.url + "/metrics", timeout=10).text
            seen = _pids(text, "edgechat_process_resident_memory_bytes")
            assert seen == {str(mine)}, (d.url, seen, workers)
            assert str(theirs) not in _pids(text, "edgechat_process_cpu_seconds_total")
        folders = sorted(p.name for p in (run / "edgechat").iterdir())
        assert len(folders) == 2 and all(f.startswith("metrics-") for f in folders), folders

        # a third daemon pointed at the first one's folder refuses to start, naming both
        held = next(p for p in (run / "edgechat").iterdir()
                    if daemons[0].state_dir in (p / ".edgechat.owner").read_text())
        third = tmp_path / "c"
        third.mkdir()
        out = subprocess.run([sys.executable, "-m", "daemon", "serve", "--model", "builtin:tiny",
                              "--cache-dir", cache_dir, "--state-dir", str(third / "state"),
                              "--metrics-dir", str(held), "--port", "1"],
                             capture_output=True, text=True, timeout=120,
                             env={**daemons[0].env, "XDG_RUNTIME_DIR": str(run)})
        assert out.returncode == 2, out.stderr
        assert "is held by a running edgechat daemon" in out.stderr, out.stderr
        assert daemons[0].state_dir in out.stderr and str(third / "state") in out.stderr
        text = requests.get(daemons[0].url + "/metrics", timeout=10).text  # its files are intact
        assert _pids(text, "edgechat_process_resident_memory_bytes") == {str(workers[0])}
    finally:
        for d in daemons:
            d.stop()
