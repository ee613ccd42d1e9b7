"""`edgechat fleet`: starts a small simulated fleet, says where everything is, stops it cleanly."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from daemon.cli.fleet import missing_binaries

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(missing_binaries()), reason="needs the fleet's Debian packages")]


def test_fleet_command_runs_and_cleans_up():
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run([sys.executable, "-m", "daemon", "fleet", "--real", "0", "--sims", "4",
                             "--duration", "3"], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    for what in ("central store   https://127.0.0.1:", "alertmanagers   https://127.0.0.1:", "vmalert", "credentials"):
        assert what in err, err
    stations = re.findall(r"^(sim-\S+)\s+prometheus http://127.0.0.1:\d+", err, flags=re.M)
    assert sorted(stations) == ["sim-north-1.3.2", "sim-north-1.4.0", "sim-south-1.3.2", "sim-south-1.4.0"]
    workdir = re.search(r"central side in (\S+) \.\.\.", err).group(1)
    assert not os.path.exists(workdir), "the temporary folder outlived the command"


def test_fleet_command_says_what_is_missing(monkeypatch, runner):
    from daemon.cli import fleet
    monkeypatch.setattr(fleet, "binary", lambda *names: None if "vmagent" in names else "/usr/bin/true")
    code, _, err = runner("fleet", "--duration", "1")
    assert code == 2 and "victoria-metrics (vmagent)" in err
