"""Shared fixtures and the session's process guard.

Fixtures: builtin:tiny built once per run (cache_dir), configs, apps and clients on it, engines on it
(make_engine, no_thread_left), the CLI runner, one redis-server for the run. Plain shared code (the
process starters, metric readers, fakes) lives in tests/support/.

The process guard: every process the suite starts must be gone when it ends; one still alive fails
the run (see support/processes.py).
"""
from __future__ import annotations

import io
import os
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

# tests run single-process metrics unless a test starts gunicorn itself
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from daemon.config import Config  # noqa: E402
from support import processes, redis_server as redis_support  # noqa: E402
from support.engine import generation_threads  # noqa: E402

pytest_plugins = ("pytester",)  # tests/selfcheck runs pytest sessions of its own


# --- the process guard ---------------------------------------------------------------------------
def pytest_sessionstart(session):
    processes.session_started(session)


def pytest_sessionfinish(session):
    processes.session_finished(session)


# --- builtin:tiny, configs, apps -----------------------------------------------------------------


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


# --- engines -------------------------------------------------------------------------------------
@pytest.fixture
def make_engine(request, cache_dir):
    """Load engines on builtin:tiny, each closed after the test: make_engine(listener=None, **overrides)
    with Config overrides. A module or a test changes the defaults with
    `@pytest.mark.engine_defaults(**overrides)` (the closest marker wins, a call's arguments win over all)."""
    from daemon.model.engine import Engine
    defaults = dict(model="builtin:tiny", cache_dir=cache_dir, threads=1, warmup=False,
                    max_new_tokens=64, generation_timeout_s=60.0)
    for marker in reversed(list(request.node.iter_markers("engine_defaults"))):  # module, class, test
        defaults.update(marker.kwargs)
    made = []

    def make(listener=None, **overrides) -> Engine:
        made.append(Engine.load(Config(**{**defaults, **overrides}), listener=listener))
        return made[-1]
    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def no_thread_left():
    """The test must leave no generation thread running (5 s to wind down after it ends)."""
    yield
    deadline = time.monotonic() + 5
    while generation_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generation_threads() == []


# --- Redis -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the test session, stopped at the end even on failure (skipped where
    Redis is missing, failed there in CI)."""
    redis_support.require()
    server = redis_support.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


# --- scripted output and a live HTTP app ---------------------------------------------------------
@pytest.fixture
def scripted(monkeypatch):
    """Make the model say exactly `text` (then end of text), whatever its weights: for tool calls
    and other replies the random built-in models never produce. Everything after the sampler (text
    streaming, stop strings, parsing, the API) runs for real."""
    from daemon.model.sampling import Sampler

    def script(app, text: str) -> None:
        from daemon.services import get_services
        engine = get_services(app).engine
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [min(engine.eos_ids)]

        def call(self, logits, produced, last):
            return ids[min(produced, len(ids) - 1)]
        monkeypatch.setattr(Sampler, "__call__", call)
    return script


@pytest.fixture
def live_app(app_factory):
    """An app served over real HTTP in this process (werkzeug, a free loopback port): for clients
    like the openai SDK, with in-process test hooks (`scripted`) still in reach. Returns (app, url)."""
    import threading

    from werkzeug.serving import make_server
    servers = []

    def serve(**overrides):
        app = app_factory(**overrides)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return app, f"http://127.0.0.1:{server.server_port}"
    yield serve
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory, cache_dir):
    """A simulated fleet (3 real daemons + 50 simulated devices, their Prometheus servers and vmagents,
    the central store, vmalert, two clustered Alertmanagers), shared by one test module."""
    from support.fleet import MISSING, FleetRun
    if MISSING:
        pytest.skip(f"needs Debian packages: {', '.join(MISSING)}")
    run = FleetRun(tmp_path_factory.mktemp("fleet"), cache_dir).start()
    yield run
    run.stop()
