"""promtool, as the rule tests run it: a missing binary fails the test (CI installs Debian's prometheus)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from support import REPO_ROOT


def promtool(*args: str, cwd: str = str(REPO_ROOT)) -> subprocess.CompletedProcess:
    """Run promtool with `args` in `cwd`; its output comes back as text."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found on PATH: install Debian's `prometheus` package (.ci/run does)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=240)
