"""Metrics: contract names, what moves when, HTTP instrumentation, promtool, multiprocess folder hygiene
(the memory budget and cgroup readers the sampler reads through: tests/memory/test_budget.py)."""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import requests
from flask import Flask, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.services import get_services
from daemon.sessions import StoreStats
from daemon.config import Config
from daemon.memory import budget as memory_budget
from daemon.telemetry.labels import TURN_INDEX_BUCKETS, turn_index_bucket
from daemon.telemetry.listeners import Recorder
from daemon.telemetry.metrics import Metrics
from daemon.telemetry.sampler import Sampler
from support import REPO_ROOT
from support.metrics import metric_value, samples, series_of
from support.processes import track
from support.servers import free_port

ROOT = REPO_ROOT

CONTRACT = """
edgechat_process_resident_memory_bytes edgechat_process_unique_memory_bytes
edgechat_process_anonymous_memory_bytes edgechat_process_swap_bytes
edgechat_process_virtual_memory_bytes edgechat_process_open_fds edgechat_process_threads
edgechat_process_cpu_seconds_total edgechat_process_start_time_seconds
edgechat_host_memory_available_bytes edgechat_host_memory_total_bytes edgechat_memory_limit_bytes
edgechat_service_memory_bytes edgechat_sessions edgechat_history_messages
edgechat_history_messages_max edgechat_history_tokens_max edgechat_history_max_turns
edgechat_turn_history_messages edgechat_turn_prompt_tokens edgechat_history_truncations_total
edgechat_sessions_evicted_total edgechat_gc_collections_total edgechat_gc_collected_objects_total
edgechat_gc_uncollectable_objects_total edgechat_gc_pause_seconds edgechat_gc_tracked_objects
edgechat_turn_duration_seconds edgechat_time_to_first_token_seconds
edgechat_time_per_output_token_seconds edgechat_queue_wait_seconds edgechat_prompt_tokens_total
edgechat_completion_tokens_total edgechat_turns_total edgechat_generations_in_progress
edgechat_queue_depth edgechat_http_requests_total edgechat_http_request_duration_seconds
edgechat_requests_rejected_total edgechat_build_info edgechat_model_info edgechat_model_load_seconds
""".split()
HISTOGRAMS = {"edgechat_turn_history_messages", "edgechat_turn_prompt_tokens",
              "edgechat_gc_pause_seconds", "edgechat_turn_duration_seconds",
              "edgechat_time_to_first_token_seconds", "edgechat_time_per_output_token_seconds",
              "edgechat_queue_wait_seconds", "edgechat_http_request_duration_seconds"}


class Telemetry:
    """Metric definitions with their recorder and sampler, as create_app wires them (no model)."""

    def __init__(self, config_limit: int = 0):
        self.metrics = Metrics(CollectorRegistry())
        self.registry = self.metrics.registry
        self.recorder = Recorder(self.metrics)
        budget = memory_budget.MemoryBudget(config_limit, 0.85, 0.95, siblings=False)
        self.sampler = Sampler(self.metrics, budget.read)

    def close(self) -> None:
        self.sampler.close()
        self.metrics.close()


def scrape(t) -> str:
    return generate_latest(t.registry).decode()


@pytest.fixture
def tel():
    t = Telemetry()
    yield t
    t.close()


def cfg(**kw) -> Config:
    base = dict(model="builtin:tiny", metrics_refresh_s=60.0)
    base.update(kw)
    return Config(**base)


# --- names and single-process behaviour -----------------------------------------------------------
def test_every_contract_family_is_exported_with_its_type(tel):
    tel.sampler.refresh()
    tel.sampler.refresh_slow()
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(tel))}
    for name in CONTRACT:
        kind = "counter" if name.endswith("_total") else "histogram" if name in HISTOGRAMS else "gauge"
        family = name[: -len("_total")] if kind == "counter" else name  # the parser drops _total
        assert families.get(family) == kind, name
        assert hasattr(tel.metrics, name[len("edgechat_"):]), name  # attribute = name minus namespace


@pytest.mark.parametrize("turn,bucket", [(0, "1"), (1, "1"), (2, "2-5"), (5, "2-5"), (6, "6-10"),
                                         (10, "6-10"), (11, "11-20"), (20, "11-20"), (21, "21+"),
                                         (10_000, "21+")])
def test_turn_index_bucket(turn, bucket):
    assert turn_index_bucket(turn) == bucket
    assert bucket in TURN_INDEX_BUCKETS


def test_observe_turn_moves_the_right_series(tel):
    before = scrape(tel)
    tel.recorder.observe_turn(turn=7, outcome="length", duration_s=2.0, ttft_s=0.5, completion_tokens=4,
                         prompt_tokens=300, queue_wait_s=0.02, history_messages=13)
    tel.recorder.observe_turn(turn=1, outcome="ok", duration_s=0.3, ttft_s=None, completion_tokens=0,
                         prompt_tokens=20, queue_wait_s=0.0, history_messages=None)
    after = scrape(tel)

    def grew(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("edgechat_turns_total", outcome="length") == 1
    assert grew("edgechat_turns_total", outcome="ok") == 1
    assert grew("edgechat_turns_total", outcome="error") == 0
    assert grew("edgechat_turn_duration_seconds_count", turn_index="6-10") == 1
    assert grew("edgechat_turn_duration_seconds_sum", turn_index="6-10") == pytest.approx(2.0)
    assert grew("edgechat_turn_duration_seconds_count", turn_index="1") == 1
    assert grew("edgechat_turn_duration_seconds_bucket", turn_index="6-10", le="2.5") == 1
    assert grew("edgechat_turn_duration_seconds_bucket", turn_index="6-10", le="1.0") == 0
    assert grew("edgechat_time_to_first_token_seconds_count") == 1  # the None ttft is not observed
    # (2.0 - 0.5) / (4 - 1) = 0.5 s per token after the first
    assert grew("edgechat_time_per_output_token_seconds_sum") == pytest.approx(0.5)
    assert grew("edgechat_time_per_output_token_seconds_count") == 1
    assert grew("edgechat_prompt_tokens_total") == 320
    assert grew("edgechat_completion_tokens_total") == 4
    assert grew("edgechat_queue_wait_seconds_count") == 2
    assert grew("edgechat_turn_history_messages_count") == 1  # stateless turn (None) not observed
    assert grew("edgechat_turn_history_messages_sum") == 13
    assert grew("edgechat_turn_prompt_tokens_count") == 2


def test_unknown_label_values_stay_bounded(tel):
    tel.recorder.observe_turn(turn=1, outcome="exploded", duration_s=1, ttft_s=None, completion_tokens=0,
                         prompt_tokens=1, queue_wait_s=0, history_messages=None)
    tel.recorder.on_truncate("whim", 3)
    text = scrape(tel)
    assert metric_value(text, "edgechat_turns_total", outcome="other") == 1
    assert metric_value(text, "edgechat_history_truncations_total", reason="other") == 3


def test_store_and_engine_listeners(tel):
    tel.recorder.on_truncate("turns", 2)
    tel.recorder.on_truncate("tokens", 5)
    tel.recorder.on_evict("lru", 3)
    tel.recorder.on_evict("ttl", 1)
    tel.recorder.on_queue(waiting=2, running=1)
    text = scrape(tel)
    assert metric_value(text, "edgechat_history_truncations_total", reason="turns") == 2
    assert metric_value(text, "edgechat_history_truncations_total", reason="tokens") == 5
    assert metric_value(text, "edgechat_sessions_evicted_total", reason="lru") == 3
    assert metric_value(text, "edgechat_sessions_evicted_total", reason="ttl") == 1
    assert metric_value(text, "edgechat_sessions_evicted_total", reason="deleted") == 0
    assert metric_value(text, "edgechat_queue_depth") == 2
    assert metric_value(text, "edgechat_generations_in_progress") == 1
    tel.recorder.on_queue(waiting=0, running=0)
    assert metric_value(scrape(tel), "edgechat_queue_depth") == 0


def test_config_model_and_store_gauges(tel):
    tel.recorder.set_config(cfg(max_history_turns=7, kv_cache_bytes=5 << 20))
    tel.recorder.set_model_info("builtin:tiny", "float32", "history", 1.5, "onednn", "per-op", "unavailable")
    tel.recorder.set_store_stats(StoreStats(sessions=3, messages_total=40, messages_max=22, tokens_max=900))
    text = scrape(tel)
    assert metric_value(text, "edgechat_history_max_turns") == 7
    assert metric_value(text, "edgechat_kv_cache_budget_bytes") == 5 << 20
    assert metric_value(text, "edgechat_model_info", model="builtin:tiny", dtype="float32", kernel="onednn",
                        step="per-op", compiled="unavailable", leak_mode="history") == 1
    assert metric_value(text, "edgechat_model_load_seconds") == 1.5
    assert metric_value(text, "edgechat_sessions") == 3
    assert metric_value(text, "edgechat_history_messages") == 40
    assert metric_value(text, "edgechat_history_messages_max") == 22
    assert metric_value(text, "edgechat_history_tokens_max") == 900
    (build,) = series_of(text, "edgechat_build_info")
    assert {k for k, _ in build} == {"version", "python", "torch", "transformers"}
    assert dict(build)["python"] == ".".join(map(str, sys.version_info[:3]))


def test_refresh_reads_the_process_and_gc(tel):
    tel.sampler.refresh()
    tel.sampler.refresh_slow()
    first = scrape(tel)
    assert metric_value(first, "edgechat_process_resident_memory_bytes") > 10 << 20
    assert metric_value(first, "edgechat_process_unique_memory_bytes") > 0
    assert metric_value(first, "edgechat_process_open_fds") > 0
    assert metric_value(first, "edgechat_process_threads") >= 1
    assert metric_value(first, "edgechat_gc_tracked_objects", generation="2") > 1000
    assert metric_value(first, "edgechat_host_memory_total_bytes") >= \
        metric_value(first, "edgechat_host_memory_available_bytes") > 0
    assert metric_value(first, "edgechat_service_memory_bytes") > 0
    junk = [[i] for i in range(50_000)]  # a real gen-2 collection with something to find
    cycle = []
    cycle.append(cycle)
    del junk, cycle
    gc.collect()
    tel.sampler.refresh()
    second = scrape(tel)
    for name in ("edgechat_gc_collections_total", "edgechat_gc_pause_seconds_count"):
        assert metric_value(second, name, generation="2") > metric_value(first, name, generation="2")
    assert metric_value(second, "edgechat_gc_collected_objects_total", generation="2") >= 1
    assert metric_value(second, "edgechat_gc_pause_seconds_sum", generation="2") > 0
    assert metric_value(second, "edgechat_process_cpu_seconds_total") >= \
        metric_value(first, "edgechat_process_cpu_seconds_total") > 0


def test_sampler_is_idempotent_and_close_cleans_up():
    callbacks = len(gc.callbacks)
    t = Telemetry()
    assert len(gc.callbacks) == callbacks + 1  # the sampler's GC pause recorder
    t.sampler.start(0.01)
    thread = t.sampler._thread
    t.sampler.start(0.01)
    assert t.sampler._thread is thread and thread.is_alive()
    t.close()
    assert not thread.is_alive()
    assert len(gc.callbacks) == callbacks


def test_tracemalloc_gauges_only_when_configured(tel):
    assert "edgechat_tracemalloc_traced_bytes" not in scrape(tel)
    was_tracing = tracemalloc.is_tracing()
    try:
        tel.sampler.trace(1)
        blob = [bytes(1000) for _ in range(1000)]  # ~1 MB traced
        tel.sampler.refresh()
        text = scrape(tel)
        assert metric_value(text, "edgechat_tracemalloc_traced_bytes") > 0
        assert metric_value(text, "edgechat_tracemalloc_peak_bytes") >= \
            metric_value(text, "edgechat_tracemalloc_traced_bytes")
        del blob
    finally:
        if not was_tracing:
            tracemalloc.stop()


def test_multiprocess_needs_the_env_before_import(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics()


def test_a_thousand_sessions_make_no_more_series_than_one():
    def run(sessions: int) -> int:
        t = Telemetry()
        m = t.recorder
        try:
            for s in range(sessions):
                for turn in (1, 2, 7, 15, 40):
                    m.observe_turn(turn=turn, outcome="ok", duration_s=0.1 * turn, ttft_s=0.01,
                                   completion_tokens=3, prompt_tokens=10 * turn + s, queue_wait_s=0,
                                   history_messages=2 * turn)
                m.on_truncate("turns", 2)
                m.set_store_stats(StoreStats(s + 1, 10 * (s + 1), 10, 100 + s))
            m.on_evict("lru", sessions)
            t.sampler.refresh()
            return len(samples(scrape(t)))
        finally:
            t.close()
    assert run(1) == run(1000)


# --- Flask integration --------------------------------------------------------------------------
@pytest.fixture
def flask_app():
    app = Flask("metrics-test")

    @app.get("/v1/sessions/<session_id>")
    def session(session_id):
        return {"id": session_id}

    @app.get("/stream")
    def stream():
        return Response((c for c in "abc"), mimetype="text/event-stream")

    from daemon.api.exposition import init_app
    t = Telemetry()
    init_app(app, cfg(), t.metrics, t.sampler)
    app.telemetry = t
    yield app
    t.close()


def test_flask_route_labels_and_both_encodings(flask_app):
    client = flask_app.test_client()
    for sid in ("a1", "b2", "c3"):
        assert client.get(f"/v1/sessions/{sid}").status_code == 200
    assert client.get("/no/such/path/x9").status_code == 404
    assert client.open("/v1/sessions/a1", method="BREW").status_code == 405
    streamed = client.get("/stream")
    assert streamed.data == b"abc"
    streamed.close()  # what the WSGI server does when the stream ends

    text_resp = client.get("/metrics")
    assert text_resp.status_code == 200
    assert text_resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = text_resp.text
    assert metric_value(text, "edgechat_http_requests_total", route="/v1/sessions/<session_id>",
                 method="GET", status="200") == 3
    assert metric_value(text, "edgechat_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert metric_value(text, "edgechat_http_requests_total", route="unmatched", method="other", status="405") == 1
    assert metric_value(text, "edgechat_http_request_duration_seconds_count", route="/v1/sessions/<session_id>") == 3
    assert metric_value(text, "edgechat_http_request_duration_seconds_count", route="/stream") == 1
    assert "a1" not in text and "no/such" not in text  # never the raw path
    assert metric_value(text, "edgechat_process_resident_memory_bytes") > 0

    om = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    families = {f.name for f in om_parse(om.text)}
    assert {"edgechat_http_requests", "edgechat_turns", "edgechat_build_info"} <= families


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_a_real_scrape(flask_app, tmp_path):
    client = flask_app.test_client()
    client.get("/v1/sessions/x")
    flask_app.telemetry.recorder.observe_turn(turn=3, outcome="ok", duration_s=1, ttft_s=0.1,
                                        completion_tokens=5, prompt_tokens=9, queue_wait_s=0,
                                        history_messages=5)
    text = client.get("/metrics").data
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_metrics_port_served_once(tmp_path, caplog):
    from daemon.api.exposition import init_app
    caplog.set_level("INFO", logger="edgechat.metrics")
    port = free_port()
    first, second = Telemetry(), Telemetry()
    apps = Flask("a"), Flask("b")  # held: an app's collection closes its metrics port
    served = init_app(apps[0], cfg(metrics_port=port), first.metrics, first.sampler)
    try:
        # the port is taken: serves the main path only
        again = init_app(apps[1], cfg(metrics_port=port), second.metrics, second.sampler)
        assert "already served" in caplog.text
        assert served.server is not None and again.server is None
        resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert resp.status_code == 200 and "edgechat_process_resident_memory_bytes" in resp.text
    finally:
        first.close()
        second.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_metrics_import_no_torch():
    code = ("import sys, daemon.telemetry.metrics, daemon.telemetry.multiproc, daemon.api.exposition; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items()
                                           if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- multiprocess mode (each "worker" is a child python: the env var must precede the import) -----
WORKER = r"""
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from daemon.telemetry.listeners import Recorder
from daemon.telemetry.metrics import Metrics
from daemon.telemetry.sampler import Sampler
from daemon.memory.budget import MemoryBudget
metrics = Metrics()
s = Sampler(metrics, MemoryBudget(0, 0.85, 0.95, siblings=True).read)
s.refresh()
s.refresh_slow()
m = Recorder(metrics)
m.observe_turn(turn=int(sys.argv[2]), outcome="ok", duration_s=0.5, ttft_s=0.1, completion_tokens=5,
               prompt_tokens=10, queue_wait_s=0.0, history_messages=3)
m.on_queue(waiting=1, running=1)
print(os.getpid(), flush=True)
sys.stdin.readline()  # live until the test closes stdin
"""


def start_worker(path: Path, turn: int = 1) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = track(subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(turn)], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    return proc, proc.stdout.readline().strip()


def stop_worker(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)


def folder_scrape(path: Path) -> str:
    from daemon.telemetry.multiproc import scrape_registry
    return generate_latest(scrape_registry(str(path))).decode()


def pids_of(text: str, name: str) -> set[str]:
    return {dict(labels)["pid"] for labels in series_of(text, name)}


@pytest.fixture
def mpdir(tmp_path):
    path = tmp_path / "metrics"
    path.mkdir()
    workers: list[subprocess.Popen] = []
    yield path, workers
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_two_workers_two_pids_and_a_dead_one_leaves(mpdir):
    from daemon.telemetry.multiproc import worker_exited
    path, workers = mpdir
    (a, pid_a), (b, pid_b) = start_worker(path), start_worker(path, turn=8)
    workers += [a, b]
    text = folder_scrape(path)
    for name in ("edgechat_process_resident_memory_bytes", "edgechat_process_unique_memory_bytes",
                 "edgechat_process_start_time_seconds", "edgechat_process_cpu_seconds_total"):
        assert pids_of(text, name) == {pid_a, pid_b}, name
    assert metric_value(text, "edgechat_queue_depth") == 2  # livesum over workers
    assert len(series_of(text, "edgechat_build_info")) == 1  # livemax: one series, no pid
    assert "pid" not in dict(next(iter(series_of(text, "edgechat_service_memory_bytes"))))
    assert metric_value(text, "edgechat_turns_total", outcome="ok") == 2
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

    stop_worker(a)
    worker_exited(int(pid_a), str(path))
    text = folder_scrape(path)
    assert pids_of(text, "edgechat_process_resident_memory_bytes") == {pid_b}
    assert pids_of(text, "edgechat_process_cpu_seconds_total") == {pid_b}
    assert metric_value(text, "edgechat_queue_depth") == 1
    assert metric_value(text, "edgechat_turns_total", outcome="ok") == 2  # the dead worker's turn stays
    assert metric_value(text, "edgechat_turn_duration_seconds_count", turn_index="1") == 1
    assert metric_value(text, "edgechat_turn_duration_seconds_count", turn_index="6-10") == 1


def test_twenty_recycled_workers_keep_the_folder_bounded(mpdir):
    from daemon.telemetry.multiproc import worker_exited
    path, workers = mpdir
    live, live_pid = start_worker(path)
    workers.append(live)
    per_worker = {p.name.replace(live_pid, "PID") for p in path.glob("*.db")}
    assert len(per_worker) == 7  # counter, histogram, gauge_{liveall,livesum,livemax,livemin,livemostrecent}
    before = None
    for _ in range(20):
        proc, pid = start_worker(path, turn=3)
        stop_worker(proc)
        worker_exited(int(pid), str(path))
        total = metric_value(folder_scrape(path), "edgechat_turns_total", outcome="ok")
        assert before is None or total == before + 1  # monotonic across every recycle
        before = total
    files = sorted(p.name for p in path.glob("*.db"))
    assert len(files) == 7 + 2, files  # the live worker's files + counter/histogram archives
    assert {f.split("_")[-1][:-3] for f in files} == {live_pid, "archive"}
    text = folder_scrape(path)
    assert metric_value(text, "edgechat_turns_total", outcome="ok") == 21
    assert metric_value(text, "edgechat_turn_duration_seconds_count", turn_index="2-5") == 20
    assert metric_value(text, "edgechat_turn_duration_seconds_bucket", turn_index="2-5", le="0.5") == 20
    assert metric_value(text, "edgechat_prompt_tokens_total") == 210
    assert pids_of(text, "edgechat_process_resident_memory_bytes") == {live_pid}
    assert pids_of(text, "edgechat_process_cpu_seconds_total") == {live_pid}


def test_a_kept_folder_collector_reads_what_prometheus_client_reads(mpdir):
    """One collector kept across scrapes (it caches key parses) returns exactly what
    prometheus_client's own collector returns, sees values written in place, and forgets a dead
    worker's pid-labelled keys."""
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.multiprocess import MultiProcessCollector
    from daemon.telemetry.multiproc import LockedMultiProcessCollector, worker_exited
    path, workers = mpdir
    (a, pid_a), (b, pid_b) = start_worker(path), start_worker(path, turn=8)
    workers += [a, b]
    collector = LockedMultiProcessCollector(str(path))
    kept = CollectorRegistry()
    kept.register(collector)

    def stock() -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(path))
        return generate_latest(registry)

    first = generate_latest(kept)
    assert first == stock()
    assert any(f'"pid": "{pid_a}"' in key for key in collector._keys)
    # a worker's increment: a value rewritten in place in its mmap'd file, mtime/size may stay
    counter = MmapedDict(str(path / f"counter_{pid_b}.db"))
    try:
        key = next(k for k, _v, _t in counter.read_all_values() if '"edgechat_turns_total"' in k
                   and '"ok"' in k)
        counter.write_value(key, 41.0, 0.0)
    finally:
        counter.close()
    second = generate_latest(kept)
    assert second == stock() != first
    assert metric_value(second.decode(), "edgechat_turns_total", outcome="ok") == 42
    stop_worker(a)
    worker_exited(int(pid_a), str(path))
    assert generate_latest(kept) == stock()
    assert not any(f'"pid": "{pid_a}"' in key for key in collector._keys)


PREPARE = r"""
import os, sys
path = sys.argv[1]
if sys.argv[2] == "early":
    import prometheus_client
from daemon.telemetry.multiproc import prepare_dir
try:
    prepare_dir(path)
except RuntimeError as exc:
    print("refused:", exc)
    sys.exit(0)
print("env", os.environ["PROMETHEUS_MULTIPROC_DIR"] == path)
from prometheus_client import values
print("multiprocess", values.ValueClass._multiprocess)
"""


def test_prepare_dir_wipes_and_insists_on_import_order(tmp_path):
    path = tmp_path / "run" / "metrics"
    path.mkdir(parents=True)
    (path / "counter_123.db").write_bytes(b"old")
    (path / "keep.txt").write_text("not ours")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}

    def run(mode):
        out = subprocess.run([sys.executable, "-c", PREPARE, str(path), mode], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout
    assert "refused: prometheus_client was imported before" in run("early")
    assert (path / "counter_123.db").exists()  # refused means untouched
    assert run("late").split() == ["env", "True", "multiprocess", "True"]
    assert not (path / "counter_123.db").exists() and (path / "keep.txt").exists()


# --- real gunicorn: the shipped server hooks, two workers, a kill, twenty recycles ---------------
E2E_APP = '''
import os
from flask import Flask
from daemon.api.exposition import init_app
from daemon.config import Config
from daemon.memory.budget import MemoryBudget
from daemon.telemetry.metrics import Metrics
from daemon.telemetry.sampler import Sampler

def create():
    app = Flask("e2e")

    @app.get("/pid")
    def pid():
        return {"pid": os.getpid()}

    cfg = Config(model="builtin:tiny", metrics_refresh_s=0.2)
    metrics = Metrics()
    sampler = Sampler(metrics, MemoryBudget.from_config(cfg, siblings=True).read)
    sampler.start(cfg.metrics_refresh_s)
    init_app(app, cfg, metrics, sampler)
    return app
'''


def _poll(fn, timeout_s: float = 60.0):
    """Call fn until it returns truthy; the last value (falsy on timeout)."""
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = fn()
        except requests.RequestException:
            result = None
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.mark.e2e
def test_gunicorn_two_workers_kill_and_twenty_recycles(tmp_path):
    import signal
    (tmp_path / "e2e_app.py").write_text(E2E_APP)
    path = tmp_path / "metrics"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # the hooks read it; on_starting creates and wipes it
    server = track(subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:daemon.server.hooks",
                                     "--bind", f"127.0.0.1:{port}", "--workers", "2", "--max-requests", "4",
                                     "--pythonpath", str(tmp_path), "e2e_app:create()"],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=(tmp_path / "gunicorn.log").open("wb")))
    try:
        def live_pids() -> set[str]:
            return pids_of(requests.get(base + "/metrics", timeout=5).text,
                           "edgechat_process_resident_memory_bytes")
        two = _poll(lambda: (lambda p: p if len(p) == 2 else None)(live_pids()))
        assert two and len(two) == 2, (tmp_path / "gunicorn.log").read_text()[-3000:]

        victim = sorted(two)[0]
        os.kill(int(victim), signal.SIGKILL)
        after = _poll(lambda: (lambda p: p if len(p) == 2 and victim not in p else None)(live_pids()))
        assert after and victim not in after

        seen, sent = set(), 0
        while len(seen) < 22 and sent < 400:  # 2 first workers + 20 recycled ones
            seen.add(requests.get(base + "/pid", timeout=10).json()["pid"])
            sent += 1
        assert len(seen) >= 22
        # settle: two live workers again, each has refreshed its gauges
        assert _poll(lambda: len(live_pids()) == 2)
        files = sorted(p.name for p in path.glob("*.db"))
        assert len(files) <= 2 * 7 + 2, files  # two workers' files + counter/histogram archives
        assert sum(f.endswith("_archive.db") for f in files) == 2
        text = requests.get(base + "/metrics", timeout=5).text
        assert metric_value(text, "edgechat_http_requests_total", route="/pid", method="GET", status="200") == sent
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


# --- real turns on builtin:tiny through the app (the lead's fixtures) ---------------------------
def _turns(client, n: int, session: str | None = None) -> str:
    sid = session or client.post("/v1/sessions", json={"system": "Be brief."}).get_json()["id"]
    for i in range(n):
        resp = client.post(f"/v1/sessions/{sid}/messages", json={"content": f"turn {i}", "max_tokens": 4})
        assert resp.status_code == 200, resp.get_data(as_text=True)
    return sid


def test_real_turns_move_the_metrics(app_factory):
    app = app_factory(max_history_turns=2)
    client = app.test_client()
    before = client.get("/metrics").text
    _turns(client, 4)
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 3})
    text = client.get("/metrics").text

    def grew(name, **labels):
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    assert sum(metric_value(text, "edgechat_turns_total", outcome=o) for o in ("ok", "length")) == 5
    assert grew("edgechat_turn_duration_seconds_count", turn_index="1") == 2  # session turn 1 + stateless
    assert grew("edgechat_turn_duration_seconds_count", turn_index="2-5") == 3
    assert grew("edgechat_turn_history_messages_count") == 4  # session turns only
    assert grew("edgechat_prompt_tokens_total") > 0 and grew("edgechat_completion_tokens_total") > 0
    assert grew("edgechat_time_to_first_token_seconds_count") == 5
    assert metric_value(text, "edgechat_http_requests_total", route="/v1/sessions/<session_id>/messages",
                 method="POST", status="200") == 4
    engine = get_services(app).engine  # dtype and kernel auto: what the tuner chose on this CPU
    assert metric_value(text, "edgechat_model_info", model="builtin:tiny", dtype=engine.dtype_label,
                        kernel=engine.kernel, step=engine.decode_path.get("step", "per-op"),
                        compiled=engine.decode_path["compiled"], leak_mode="off") == 1
    assert engine.decode_path["compiled"] in ("packaged", "built")  # the test machine has a compiler
    assert metric_value(text, "edgechat_history_max_turns") == 2
    assert metric_value(text, "edgechat_sessions") == 1
    assert metric_value(text, "edgechat_history_truncations_total", reason="turns") > 0
    assert metric_value(text, "edgechat_process_resident_memory_bytes") > 50 << 20


@pytest.mark.parametrize("leak_mode", ["off", "history"])
def test_history_gauges_grow_only_with_the_history_leak(app_factory, leak_mode):
    app = app_factory(max_history_turns=1, leak_mode=leak_mode)
    client = app.test_client()
    sid, longest = None, []
    for _ in range(4):
        sid = _turns(client, 1, sid)
        longest.append(metric_value(client.get("/metrics").text, "edgechat_history_messages_max"))
    if leak_mode == "history":
        assert [b - a for a, b in zip(longest, longest[1:])] == [2, 2, 2]
    else:
        assert max(longest) <= 3  # system + the one kept turn
    assert metric_value(client.get("/metrics").text, "edgechat_history_max_turns") == 1  # config, not growth
