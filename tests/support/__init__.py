"""Test support shared by the test modules: real processes (daemon, Prometheus, Alertmanager, Redis) and
the bookkeeping that proves none outlives the run, metric readers, fakes. Plain code only: every
fixture lives in tests/conftest.py. Importable as `support` (setup.cfg puts tests/ on the path)."""
from __future__ import annotations

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
