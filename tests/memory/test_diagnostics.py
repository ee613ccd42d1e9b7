"""Finding the leak: admin endpoints, tracemalloc diff and object census on a leaking daemon, `edgechat diagnose`."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tracemalloc

import pytest
import requests
import torch

from daemon.memory import census as census_mod
from daemon.cli import diagnose
from daemon.memory.tracing import DROPPED_FILES, SHARED_SWITCH, NoBaseline, TracingOff, Tracer
from support.servers import Daemon, free_port
from support import REPO_ROOT

torch.set_num_threads(1)
ROOT = REPO_ROOT
KEY = "s3cret-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(autouse=True)
def no_tracing_left_behind():
    """tracemalloc is process-wide: never let one test slow down the rest of the run."""
    was = tracemalloc.is_tracing()
    yield
    if tracemalloc.is_tracing() and not was:
        tracemalloc.stop()


def leak_line() -> tuple[str, int]:
    """(file, line) of the daemon's deliberate leak (leak_mode tensors), read from the source."""
    found = [(str(path), number) for path in sorted((ROOT / "daemon").rglob("*.py"))
             for number, text in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"\bretain(?:ed)?\.append\(", text)]
    assert len(found) == 1, found
    return found[0]


def turn(client, i: int, tokens: int = 8) -> None:
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"hi {i}"}],
                                                     "max_tokens": tokens})
    assert resp.status_code == 200, resp.get_json()


# --- the admin surface ------------------------------------------------------------------------------
def test_admin_endpoints_do_not_exist_without_an_admin_key(app_factory):
    client = app_factory().test_client()
    for method, path in [("GET", "/debug/memory/top"), ("POST", "/debug/memory/snapshot"),
                         ("GET", "/debug/memory/diff"), ("GET", "/debug/memory/census"),
                         ("POST", "/debug/memory/tracemalloc")]:
        assert client.open(path, method=method, headers=AUTH).status_code == 404, path


@pytest.mark.parametrize("headers,code", [({}, "missing_admin_key"),
                                          ({"Authorization": "Bearer wrong-key"}, "invalid_admin_key"),
                                          ({"Authorization": f"Basic {KEY}"}, "missing_admin_key"),
                                          ({"Authorization": f"Bearer {KEY}x"}, "invalid_admin_key")])
def test_admin_endpoints_need_the_admin_key(app_factory, headers, code):
    client = app_factory(admin_key=KEY, api_keys=("user-key",)).test_client()
    resp = client.get("/debug/memory/census", headers=headers)
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == code
    assert resp.get_json()["pid"] > 0 and resp.headers["X-Edgechat-Pid"].isdigit()
    # an API key is not an admin key
    assert client.get("/debug/memory/census", headers={"Authorization": "Bearer user-key"}).status_code == 401
    assert 'edgechat_requests_rejected_total{reason="unauthorized"}' in client.get("/metrics").get_data(True)


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/debug/memory/top?limit=abc", None), ("GET", "/debug/memory/top?limit=0", None),
    ("GET", "/debug/memory/top?limit=101", None), ("GET", "/debug/memory/diff?group_by=file", None),
    ("GET", "/debug/memory/census?limit=-3", None), ("GET", "/debug/memory/census?holders=maybe", None),
    ("POST", "/debug/memory/tracemalloc", {"enabled": "yes"}), ("POST", "/debug/memory/tracemalloc", {}),
])
def test_bad_parameters_are_400(app_factory, method, path, body):
    client = app_factory(admin_key=KEY).test_client()
    resp = client.open(path, method=method, headers=AUTH, json=body)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["param"] in ("limit", "group_by", "holders", "enabled")


def test_top_and_diff_say_how_to_turn_tracing_on(app_factory):
    client = app_factory(admin_key=KEY).test_client()
    for path in ("/debug/memory/top", "/debug/memory/diff"):
        resp = client.get(path, headers=AUTH)
        assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "tracemalloc_off"
        assert "EDGECHAT_TRACEMALLOC=1" in resp.get_json()["error"]["message"]


def test_tracing_switched_at_run_time(app_factory):
    app = app_factory(admin_key=KEY, tracemalloc_frames=5)
    client = app.test_client()
    on = client.post("/debug/memory/tracemalloc", headers=AUTH, json={"enabled": True}).get_json()
    assert on["tracing"] and on["changed"] and on["frames"] == 5 and tracemalloc.is_tracing()
    assert client.get("/debug/memory/diff", headers=AUTH).get_json()["error"]["code"] == "no_baseline"
    turn(client, 0)
    top = client.get("/debug/memory/top?limit=3&group_by=traceback", headers=AUTH).get_json()
    assert top["pid"] > 0 and top["group_by"] == "traceback" and len(top["entries"]) == 3
    for entry in top["entries"]:
        assert {"file", "line", "source", "size_bytes", "count", "traceback"} <= entry.keys()
        assert entry["traceback"][-1]["line"] == entry["line"] and len(entry["traceback"]) <= 5
        assert entry["file"] not in DROPPED_FILES
    assert top["entries"][0]["size_bytes"] >= top["entries"][-1]["size_bytes"] > 0
    assert "edgechat_tracemalloc_traced_bytes" in client.get("/metrics").get_data(True)
    off = client.post("/debug/memory/tracemalloc", headers=AUTH, json={"enabled": False}).get_json()
    assert off["changed"] and not off["tracing"] and not tracemalloc.is_tracing()


def test_tracing_from_the_config(app_factory):
    client = app_factory(admin_key=KEY, tracemalloc=True, tracemalloc_frames=3).test_client()
    top = client.get("/debug/memory/top?limit=2", headers=AUTH).get_json()
    assert top["tracing"] and top["frames"] == 3 and len(top["entries"]) == 2


# --- finding the leak ---------------------------------------------------------------------------------
def test_leak_mode_tensors_points_at_torch_tensors_held_by_the_leaking_line(app_factory):
    leak_file, leak_lineno = leak_line()
    # replies of exactly 24 tokens: the leak keeps 24 score tensors a turn, plus the turn's KV cache
    app = app_factory(admin_key=KEY, leak_mode="tensors", min_new_tokens=24)
    client = app.test_client()
    assert client.post("/debug/memory/tracemalloc", headers=AUTH, json={"enabled": True}).status_code == 200
    for i in range(3):  # first-use allocations (caches, label children) before the baseline
        turn(client, i, 24)
    snap = client.post("/debug/memory/snapshot", headers=AUTH).get_json()
    assert snap["tracemalloc_baseline"] and snap["census"]["torch"]["tensors"] > 0
    for i in range(20):
        turn(client, i, 24)

    census = client.get("/debug/memory/census?limit=5", headers=AUTH).get_json()
    top = census["growth"][0]
    assert top["type"] == "torch.Tensor" and top["count_diff"] >= 20 * 24 and top["bytes_diff"] > 0
    assert census["torch"]["bytes_diff"] > 0
    # what holds them: the engine's `retained` list, filled by the leaking line
    assert census["holders"] and all(h.startswith("daemon.model.engine.Engine.retained -> list") for h in census["holders"])

    diff = client.get("/debug/memory/diff?limit=10", headers=AUTH).get_json()["entries"]
    # tracemalloc names where things were allocated, not who keeps them: the biggest growth is the
    # retained score tensors, allocated in the leaking function; the line that keeps them is listed too
    assert diff[0]["file"] == leak_file and diff[0]["count_diff"] >= 20 * 24
    assert (leak_file, leak_lineno) in [(e["file"], e["line"]) for e in diff]
    assert all(e["size_diff_bytes"] > 0 for e in diff)

    text = client.get("/metrics").get_data(True)
    tensors = re.search(r'^edgechat_live_objects\{type="torch.Tensor"\} (\S+)$', text, re.M)
    assert tensors and float(tensors.group(1)) >= census["torch"]["tensors"] > 0
    assert float(re.search(r"^edgechat_torch_tensor_bytes (\S+)$", text, re.M).group(1)) > 0


def test_without_the_leak_tensors_do_not_grow(app_factory):
    client = app_factory(admin_key=KEY, kv_cache_bytes=0).test_client()
    for i in range(3):
        turn(client, i)
    client.post("/debug/memory/snapshot", headers=AUTH)
    for i in range(20):
        turn(client, i)
    census = client.get("/debug/memory/census", headers=AUTH).get_json()
    assert census["torch"]["tensors_diff"] < 20 and census["holders"] == []
    assert all(g["type"] != "torch.Tensor" or g["count_diff"] < 20 for g in census["growth"])


# --- pieces -------------------------------------------------------------------------------------------
def test_tracer_without_tracing_or_baseline():
    tracer = Tracer()
    with pytest.raises(TracingOff):
        tracer.top(5)
    assert tracer.start() and not tracer.start()
    try:
        with pytest.raises(NoBaseline):
            tracer.diff(5)
        tracer.mark()
        hoard = [bytearray(1000) for _ in range(500)]  # noqa: F841 - the growth to find
        [entry] = tracer.diff(1)
        assert entry["file"] == __file__ and "bytearray(1000)" in entry["source"]
        assert entry["count_diff"] >= 500 and entry["size_diff_bytes"] >= 500_000
    finally:
        assert tracer.stop()
    assert tracer.status()["baseline_at"] is None


def test_tracing_switch_is_shared_through_the_folder(tmp_path):
    here, there = Tracer(shared_dir=str(tmp_path)), Tracer(shared_dir=str(tmp_path))
    assert here.start() and tracemalloc.is_tracing()
    tracemalloc.stop()  # as if `there` were another worker, not tracing yet
    assert there.follow() and tracemalloc.is_tracing()
    assert not there.follow()  # a switch is followed once
    assert here.stop() and not tracemalloc.is_tracing()
    tracemalloc.start()  # `there` still traces
    assert there.follow() and not tracemalloc.is_tracing()
    # a switch left by a previous server (another master pid) is ignored
    (tmp_path / SHARED_SWITCH).write_text(json.dumps({"server": -1, "enabled": True}))
    assert not there.follow() and not tracemalloc.is_tracing()
    assert not Tracer().follow()  # single process: nothing shared


def test_storage_bytes_counts_shared_storage_once():
    base = torch.zeros(1000, dtype=torch.float32)
    views = [base, base[10:20], base.view(10, 100)]
    assert census_mod.storage_bytes(views) == 4000
    assert census_mod.storage_bytes(views + [torch.zeros(10, dtype=torch.float64)]) == 4080


def test_table_and_sizes():
    assert diagnose.size(512) == "512 B" and diagnose.size(3 * 1024 * 1024, sign=True) == "+3.0 MiB"
    assert diagnose.site("/x/lib/python3.11/site-packages/torch/nn/module.py", 7) == "torch/nn/module.py:7"
    assert diagnose.site("/srv/edgechat/daemon/model/sampling.py", 119) == "daemon/model/sampling.py:119"
    out = diagnose.table(["a", "source"], [["1", "x" * 100]], width=10)
    assert out.splitlines()[2] == "  1  xxxxxxxxx…"


# --- `edgechat diagnose` against a real daemon ----------------------------------------------------------
def test_diagnose_reports_unreachable_daemon(runner):
    code, _, err = runner("diagnose", f"http://127.0.0.1:{free_port()}", "--admin-key", KEY)
    assert code == diagnose.EXIT_ERROR and "cannot scrape" in err


@pytest.mark.e2e
def test_diagnose_gathers_every_worker_of_a_real_daemon(tmp_path, cache_dir):
    # tracing switched on at run time, as the runbook says: with --tracemalloc each worker also
    # traces its ~115 MiB of import-time allocations, and every snapshot then takes tens of seconds here
    with Daemon(tmp_path, cache_dir, "--admin-key", KEY, "--workers", "2", "--leak-mode", "tensors",
                "--max-new-tokens", "8") as d:
        pids = set(re.findall(r'^edgechat_process_start_time_seconds\{[^}]*pid="(\d+)"',
                              requests.get(d.url + "/metrics", timeout=10).text, re.M))
        assert len(pids) == 2
        for i in range(4):
            requests.post(d.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4})
        cmd = [sys.executable, "-m", "daemon", "diagnose", d.url, "--tracemalloc", "on", "--snapshot",
               "--watch", "0.5", "--count", "2", "--limit", "5"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**d.env, "EDGECHAT_ADMIN_KEY": KEY})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert out.count("== ") == 2 and out.count("2 worker(s) answered") == 2
        for pid in pids:
            assert f"worker {pid}: tracemalloc on" in out and f"worker {pid}: baseline taken" in out
            assert out.count(f"-- worker {pid}") == 2
        assert "top allocation sites (tracemalloc, group_by=lineno" in out
        assert "growth since the baseline (tracemalloc" in out and "object census" in out
        assert re.search(r"^  #\s+size\s+count\s+where\s+source line$", out, re.M)  # the table's header
        assert re.search(r"^  #1\s+\d", out, re.M)

        wrong = subprocess.run(cmd[:5] + ["--admin-key", "nope"], capture_output=True, text=True,
                               timeout=120, env=d.env)
        assert wrong.returncode == diagnose.EXIT_ERROR and "invalid admin key" in wrong.stderr
