"""Memory watchdog: soft limit frees (idle sessions, caches, gc, trim), hard limit refuses turns and fails /readyz."""
from __future__ import annotations

import time

import pytest
import requests
import torch
from prometheus_client import CollectorRegistry

from daemon.memory import watchdog as wd
from daemon.memory.budget import MemoryBudget, MemoryReading
from daemon.services import get_services
from daemon.config import Config
from daemon.telemetry.labels import PRESSURE_ACTIONS
from daemon.telemetry.listeners import Recorder
from daemon.telemetry.metrics import Metrics
from daemon.sessions import HistoryPolicy, MemoryStore
from support.fakes import FakeClock
from support.metrics import metric_value
from support.servers import Daemon

torch.set_num_threads(1)
LIMIT = 1000


class Memory:
    """An injected memory reader: readings at these ratios of LIMIT, the last one repeating."""

    def __init__(self, *ratios: float):
        self.readings = list(ratios)
        self.calls = 0

    def set(self, *ratios: float) -> None:
        self.readings = list(ratios)

    def __call__(self) -> MemoryReading:
        self.calls += 1
        ratio = self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]
        if isinstance(ratio, Exception):
            raise ratio
        service = int(ratio * LIMIT)
        return MemoryReading(host_available=LIMIT, host_total=2 * LIMIT, limit=LIMIT,
                             limit_source="config", service=service, charged=service)


class Engine:
    """Stands in for daemon.model.engine.Engine: counts release_caches() calls."""

    def __init__(self, running: int = 0):
        self.released = 0
        self.running = running
        self.kept: list[int] = []

    def release_caches(self) -> int:
        self.released += 1
        return 4 << 20

    def shed(self, keep: int = 1) -> int:
        self.kept.append(keep)
        gone, self.running = max(0, self.running - keep), min(self.running, keep)
        return gone


def actions(metrics: Metrics) -> dict[str, float]:
    return {a: metric_value(metrics, "edgechat_memory_pressure_actions_total", action=a, default=0.0)
            for a in PRESSURE_ACTIONS}


@pytest.fixture
def rig():
    """A watchdog over a real MemoryStore and Metrics, with injected memory, clock and trim."""
    clock, memory, engine = FakeClock(1000.0), Memory(0.5), Engine()
    metrics = Metrics(CollectorRegistry(), multiprocess=False)
    store = MemoryStore(HistoryPolicy(max_turns=5, max_tokens=0, ttl_s=0, max_sessions=100),
                        lambda messages: sum(len(m["content"]) for m in messages), clock=clock,
                        listener=Recorder(metrics))
    trims = []
    dog = wd.MemoryWatchdog(MemoryBudget(0, 0.85, 0.95, siblings=False, read=memory), store=store,
                            engine=engine, metrics=Recorder(metrics), clock=clock, trim=trims.append)
    yield dog, clock, memory, store, engine, metrics, trims
    store.close()
    metrics.close()


def test_below_the_soft_limit_nothing_happens(rig):
    dog, clock, memory, store, engine, metrics, trims = rig
    store.create(None)
    assert dog.check() == wd.OK and not dog.refusing
    assert actions(metrics) == dict.fromkeys(PRESSURE_ACTIONS, 0.0)
    assert engine.released == 0 and trims == [] and store.stats().sessions == 1
    assert metric_value(metrics, "edgechat_memory_pressure_level", default=0.0) == 0


def test_soft_limit_evicts_idle_sessions_releases_caches_and_counts_it(rig):
    dog, clock, memory, store, engine, metrics, trims = rig
    old = [store.create(None).id for _ in range(3)]
    clock.t += wd.IDLE_EVICT_S          # these three are idle for a minute now
    recent = store.create(None).id      # this one was just used
    memory.set(0.90)
    assert dog.check() == wd.SOFT and not dog.refusing
    assert store.stats().sessions == 1 and store.get(recent, None).id == recent
    assert metric_value(metrics, "edgechat_sessions_evicted_total", reason="memory_pressure", default=0.0) == 3
    assert actions(metrics) == {"evict_sessions": 1, "release_caches": 1, "gc_collect": 1, "malloc_trim": 1,
                                "refuse_turns": 0, "resume_turns": 0, "shed_generations": 0}
    assert engine.kept == []  # the batch is left alone below the hard limit
    assert engine.released == 1 and trims == [0]
    assert metric_value(metrics, "edgechat_memory_pressure_level", default=0.0) == 1
    assert old  # noqa: the evicted ids are gone
    # still high a moment later: no second pass before RELEASE_EVERY_S (each costs a full collection)
    clock.t += 1
    dog.check()
    assert actions(metrics)["gc_collect"] == 1
    clock.t += wd.RELEASE_EVERY_S
    dog.check()
    assert actions(metrics)["gc_collect"] == 2 and engine.released == 2


def test_hard_limit_refuses_until_below_the_soft_limit(rig):
    dog, clock, memory, store, engine, metrics, trims = rig
    store.create(None)                  # active a moment ago: survives the soft pass, not the hard one
    memory.set(0.97)
    assert dog.check() == wd.HARD and dog.refusing
    assert store.stats().sessions == 0
    assert actions(metrics)["refuse_turns"] == 1
    assert metric_value(metrics, "edgechat_memory_pressure_level", default=0.0) == 2
    memory.set(0.90)                    # below hard but above soft: hysteresis keeps refusing
    assert dog.check() == wd.HARD
    memory.set(0.50)
    assert dog.check() == wd.OK and not dog.refusing
    assert actions(metrics)["resume_turns"] == 1 and actions(metrics)["refuse_turns"] == 1
    assert metric_value(metrics, "edgechat_memory_pressure_level", default=0.0) == 0


def test_hard_limit_sheds_the_newest_generations_once(rig):
    dog, clock, memory, store, engine, metrics, trims = rig
    engine.running = 3
    memory.set(0.97)
    assert dog.check() == wd.HARD
    assert engine.kept == [1] and engine.running == 1 and actions(metrics)["shed_generations"] == 1
    dog.check()  # still hard: asked again, but nothing is left to shed, so nothing is counted
    assert engine.running == 1 and actions(metrics)["shed_generations"] == 1


def test_memory_freed_by_the_release_avoids_refusing(rig):
    dog, clock, memory, store, engine, metrics, trims = rig
    memory.set(0.97, 0.60)              # the release brings memory back down before the verdict
    assert dog.check() == wd.OK and not dog.refusing
    assert actions(metrics)["gc_collect"] == 1 and actions(metrics)["refuse_turns"] == 0


def test_unreadable_memory_keeps_the_last_verdict(rig):
    dog, clock, memory, store, engine, metrics, trims = rig
    memory.set(0.97)
    dog.check()
    memory.set(OSError("no /proc"))
    assert dog.check() == wd.HARD


@pytest.mark.parametrize("soft,hard", [(0.0, 0.9), (0.9, 0.9), (0.95, 0.9), (0.5, 1.5)])
def test_watchdog_rejects_bad_ratios(soft, hard):
    with pytest.raises(ValueError):
        MemoryBudget(0, soft, hard, siblings=False, read=Memory(0.1))


@pytest.mark.parametrize("env,setting", [
    ({"EDGECHAT_MEMORY_SOFT_LIMIT_RATIO": "0.96"}, "memory_soft_limit_ratio"),
    ({"EDGECHAT_MEMORY_SOFT_LIMIT_RATIO": "0"}, "memory_soft_limit_ratio"),
    ({"EDGECHAT_MEMORY_HARD_LIMIT_RATIO": "1.2"}, "memory_hard_limit_ratio"),
    ({"EDGECHAT_MEMORY_HARD_LIMIT_RATIO": "lots"}, "memory_hard_limit_ratio"),
    ({"EDGECHAT_MEMORY_WATCHDOG": "maybe"}, "memory_watchdog"),
    ({"EDGECHAT_TRACEMALLOC_FRAMES": "0"}, "tracemalloc_frames"),
    ({"EDGECHAT_ADMIN_KEY": "two words"}, "admin_key"),
])
def test_invalid_settings_name_themselves(env, setting):
    with pytest.raises(ValueError, match=setting):
        Config.from_env(env)


def test_defaults():
    cfg = Config.from_env({})
    assert (cfg.memory_watchdog, cfg.memory_soft_limit_ratio, cfg.memory_hard_limit_ratio) == (True, 0.85, 0.95)
    assert (cfg.admin_key, cfg.tracemalloc, cfg.tracemalloc_frames) == ("", False, 1)


# --- through the app: the real wiring, with the memory reader swapped for a fake -----------------------
def _turn(client):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})


def test_hard_limit_turns_get_503_and_readyz_fails_until_memory_drops(app_factory):
    app = app_factory(session_store="memory")
    client, dog = app.test_client(), get_services(app).watchdog
    assert dog is not None and client.get("/readyz").status_code == 200
    dog.budget.read = memory = Memory(0.97)
    assert dog.check() == wd.HARD
    session = client.post("/v1/sessions", json={}).get_json()["id"]  # sessions may start; turns may not

    resp = _turn(client)
    assert resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1
    assert resp.get_json()["error"]["code"] == "memory_pressure"
    resp = client.post(f"/v1/sessions/{session}/messages", json={"content": "hi", "max_tokens": 2})
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "memory_pressure"
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["memory_below_hard_limit"] is False
    assert ready.get_json()["memory_pressure_level"] == 2
    text = client.get("/metrics").get_data(as_text=True)
    assert 'edgechat_requests_rejected_total{reason="memory_pressure"} 2.0' in text
    assert "edgechat_memory_pressure_level 2.0" in text
    assert 'edgechat_memory_pressure_actions_total{action="refuse_turns"} 1.0' in text

    memory.set(0.40)
    assert dog.check() == wd.OK
    assert _turn(client).status_code == 200
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert 'edgechat_memory_pressure_actions_total{action="resume_turns"} 1.0' in text


def test_soft_limit_in_the_app_evicts_idle_sessions(app_factory):
    app = app_factory(session_store="memory")
    client, dog = app.test_client(), get_services(app).watchdog
    ids = [client.post("/v1/sessions", json={}).get_json()["id"] for _ in range(2)]
    dog.idle_evict_s = 0.0  # sessions just created count as idle
    dog.budget.read = Memory(0.90)
    assert dog.check() == wd.SOFT
    assert all(client.get(f"/v1/sessions/{i}").status_code == 404 for i in ids)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'edgechat_sessions_evicted_total{reason="memory_pressure"} 2.0' in text
    assert 'edgechat_memory_pressure_actions_total{action="evict_sessions"} 1.0' in text
    assert _turn(client).status_code == 200  # soft pressure frees, it does not refuse


def test_off_switch(app_factory):
    app = app_factory(memory_watchdog=False)
    assert get_services(app).watchdog is None
    assert "memory_below_hard_limit" not in app.test_client().get("/readyz").get_json()["checks"]


# --- a real leaking daemon under gunicorn, with the real memory reader ----------------------------------
# a real daemon's series may carry a worker's pid: read the largest of them (0 when there is none)
LARGEST = dict(combine=max, default=0.0)

@pytest.mark.e2e
def test_a_leaking_daemon_refuses_turns_instead_of_outgrowing_its_limit(tmp_path, cache_dir):
    # leak_mode tensors keeps every turn's scores and KV cache: ~2 MB a turn at 256 tokens on builtin:tiny
    args = ("--leak-mode", "tensors", "--max-new-tokens", "256", "--min-new-tokens", "256",
            "--kv-cache-bytes", "0")
    for name in ("probe", "leak"):
        (tmp_path / name).mkdir()
    body = {"messages": [{"role": "user", "content": "tell me more"}], "max_tokens": 256}
    with Daemon(tmp_path / "probe", cache_dir, *args) as probe:
        for _ in range(3):  # the first turn alone adds ~50 MB (allocator arenas, torch buffers)
            requests.post(probe.url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()
        warm = metric_value(probe.url, "edgechat_service_memory_bytes", **LARGEST)
    limit = int(warm / 0.90)  # a warm daemon sits near 90 %: above the soft limit, below the hard one
    # the headroom between the hard limit and the limit must hold one turn's growth: a 256-token turn
    # here can add over 1 % of the limit at once (its retained scores plus heap glibc keeps)
    with Daemon(tmp_path / "leak", cache_dir, *args, "--memory-limit-bytes", str(limit),
                "--memory-hard-limit-ratio", "0.93") as d:
        for served in range(300):
            resp = requests.post(d.url + "/v1/chat/completions", json=body, timeout=120)
            if resp.status_code != 200:
                break
        else:
            memory = metric_value(d.url, "edgechat_service_memory_bytes", **LARGEST)
            pytest.fail(f"300 leaking turns and never refused; memory {memory} of {limit}")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "memory_pressure", resp.text
        assert int(resp.headers["Retry-After"]) >= 1 and served >= 1
        ready = requests.get(d.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["memory_below_hard_limit"] is False
        assert metric_value(d.url, "edgechat_memory_pressure_level", **LARGEST) == 2
        for action in ("gc_collect", "release_caches", "refuse_turns"):
            assert metric_value(d.url, "edgechat_memory_pressure_actions_total", action=action,
                                **LARGEST) >= 1, action
        assert metric_value(d.url, "edgechat_requests_rejected_total", reason="memory_pressure", **LARGEST) >= 1
        # refusing stops the leak: memory stops growing, within the limit's margin, and the worker lives on
        # 20 refused turns, which would have leaked ~40 MB if admitted; the margin (half that) absorbs
        # what refusing itself costs: the server's threads and their malloc arenas, a census pass
        held = metric_value(d.url, "edgechat_service_memory_bytes", **LARGEST)
        for _ in range(20):
            assert requests.post(d.url + "/v1/chat/completions", json=body, timeout=60).status_code == 503
        time.sleep(2)  # two sampler ticks
        assert metric_value(d.url, "edgechat_service_memory_bytes", **LARGEST) <= held + 20 * 2**20
        # (not asserted: staying under the limit itself. The last admitted turn, or a census pass,
        # can carry memory a few % past the hard limit on this tiny test budget: seen up to +6.6 %.)
        assert d.proc.poll() is None and "memory pressure" in d.log()
