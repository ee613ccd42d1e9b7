"""Shared fixtures: builtin:tiny built once per run, apps and clients on it, the CLI runner."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest

# tests run single-process metrics unless a test starts gunicorn itself
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from daemon.config import Config  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """A cache folder holding builtin:tiny, built once per test run."""
    path = str(tmp_path_factory.mktemp("cache"))
    from daemon.model.builtin import ensure_built
    ensure_built("builtin:tiny", path, log=lambda *a, **k: None)
    return path


@pytest.fixture
def config_factory(cache_dir, tmp_path):
    """Build a Config on builtin:tiny in this test's folders; keyword arguments override."""
    def make(**overrides) -> Config:
        base = dict(model="builtin:tiny", cache_dir=cache_dir, state_dir=str(tmp_path / "state"),
                    metrics_dir=str(tmp_path / "metrics"), threads=1, warmup=False,
                    max_new_tokens=24, metrics_refresh_s=60.0)
        base.update(overrides)
        return Config(**base)
    return make


@pytest.fixture
def app_factory(config_factory):
    """Create apps on builtin:tiny and shut each down after the test."""
    from daemon import create_app
    from daemon.app import shutdown_app
    made = []

    def make(**overrides):
        app = create_app(config_factory(**overrides))
        app.testing = True
        made.append(app)
        return app
    yield make
    for app in made:
        shutdown_app(app)


@pytest.fixture
def app(app_factory):
    """An app on builtin:tiny with the default history policy."""
    return app_factory()


@pytest.fixture
def client(app):
    """A Flask test client for `app`."""
    return app.test_client()


@pytest.fixture
def runner():
    """Run the `edgechat` CLI in-process: returns (exit code, stdout, stderr)."""
    from daemon.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse exits on bad flags and --help
                code = exc.code if isinstance(exc.code, int) else 1
        return code, out.getvalue(), err.getvalue()
    return run
