"""Metrics instrumentation overhead: turn latency with metrics on vs off, interleaved in one process.

Three Flask apps are built by `create_app` in this process on ONE loaded model (the weights are
shared; each app has its own Engine slot, session store and HTTP stack):

- `on`:    the app exactly as served (real `Metrics`, HTTP hooks, GC-pause callback);
- `off`:   the same app with `Metrics`, `Recorder` and `Sampler` replaced by `NullMetrics` (every
           method a no-op) and the
           HTTP hooks not installed, so observe_turn, the refresh after each turn, the store-gauge
           copy, the engine/store listener calls and the before/after-request hooks all vanish;
- `off2`:  a second, identical `off` app: `off2` vs `off` is the noise floor.

Each round runs one turn on each app in a shuffled order (same short prompt, greedy, exactly
--new-tokens tokens: min_new_tokens pins the work), each the first turn of a fresh session (the
shortest turn: the largest share for the instrumentation). The real app's gc.callbacks entry is
process-wide, so it is removed while an `off` app runs and put back for `on`. The sampler and
housekeeping threads run on a timer, not per turn: they are parked (metrics_refresh_s=3600) and
their cost is measured apart. Then each Metrics method is timed inside real `on` turns (CPU time,
wrapped on the instance), which attributes the overhead call by call.

    .venv/bin/python -m bench.metrics_overhead            # both models
    .venv/bin/python -m bench.metrics_overhead --models builtin:tiny --tiny-turns 60
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import sys
import tempfile
import time
from unittest import mock

from bench.common import default_cache_dir, machine_note, markdown_table, median, percentile, today

VARIANTS = ("on", "off", "off2")
PROMPTS = ("Say something short about rivers.", "Name a colour and a fruit.",
           "What is two plus three?")
MODELS = ("builtin:tiny", "builtin:qwen2.5-0.5b-shape")


class _NullMetric:
    """Stands for any Counter/Gauge/Histogram (or child), or any listener hook: every call a no-op."""

    def __call__(self, *args, **kwargs):
        """A listener hook the double does not name (e.g. a store's optional on_store_op)."""

    def labels(self, *args, **kwargs):
        """The same no-op metric, whatever the labels."""
        return self

    def inc(self, *args, **kwargs):
        """No-op."""

    def set(self, *args, **kwargs):
        """No-op."""

    def observe(self, *args, **kwargs):
        """No-op."""


class NullMetrics:
    """A no-op double of daemon.telemetry's Metrics, Recorder and Sampler: every attribute the daemon
    asks for (observe_turn, refresh, on_queue, on_store_op, on_kv_cache, set_store_stats,
    turns_total, ...) is a no-op, so it keeps the real ones' interfaces as they grow."""

    multiprocess_dir = None

    def __init__(self, registry=None, *args, multiprocess=False, **kwargs):
        self.multiprocess = multiprocess  # as the real one: the engine's memory check reads it
        self._null = _NullMetric()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._null


def summary(values) -> dict:
    """Median, p10, p90, IQR of a sample."""
    return {"n": len(values), "median": median(values), "p10": percentile(values, 10),
            "p90": percentile(values, 90),
            "iqr": percentile(values, 75) - percentile(values, 25)}


def _sibling_engine(base):
    """Engine.load's stand-in: a second Engine on `base`'s loaded model, tokenizer and decoder (same
    weights in memory, so the same work), with its own queue slot, KV pool and listener."""
    from daemon.model.builtin import is_builtin
    from daemon.model.engine import Engine

    def load(cls, cfg, *, listener=None, **kwargs):
        engine = Engine(cfg, base.model, base.tokenizer, model_id=base.model_id, dtype=base.dtype,
                        plain_text_only=is_builtin(cfg.model), listener=listener, **kwargs)
        if hasattr(base, "decoder"):
            engine.decoder = base.decoder  # turns run one at a time here: sharing is safe
        engine.load_seconds, engine.ready = base.load_seconds, True
        return engine
    return classmethod(load)


def build_apps(cfg) -> dict:
    """The `on` app as served, then two `off` apps sharing its model (see the module docstring)."""
    from daemon import create_app
    from daemon.api import exposition
    from daemon.model.engine import Engine
    from daemon.services import get_services
    from daemon.telemetry import listeners, metrics, sampler
    apps = {"on": create_app(cfg)}
    with contextlib.ExitStack() as patches:
        for module, name in ((metrics, "Metrics"), (listeners, "Recorder"), (sampler, "Sampler")):
            patches.enter_context(mock.patch.object(module, name, NullMetrics))
        patches.enter_context(mock.patch.object(exposition, "_instrument", lambda app, m: None))
        patches.enter_context(mock.patch.object(Engine, "load",
                                                _sibling_engine(get_services(apps["on"]).engine)))
        for name in VARIANTS[1:]:
            apps[name] = create_app(cfg)
    return apps


def turn(client, session_id: str, prompt: str, new_tokens: int) -> tuple[float, float]:
    """One non-streamed session turn over the WSGI stack: (wall s, process CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    resp = client.post(f"/v1/sessions/{session_id}/messages",
                       json={"content": prompt, "max_tokens": new_tokens, "temperature": 0})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    body = resp.get_json()
    if resp.status_code != 200 or body["usage"]["completion_tokens"] != new_tokens:
        raise RuntimeError(f"turn failed or did other work: {resp.status_code} {body}")
    return wall, cpu


def run_model(model: str, turns: int, args, tmp: str) -> dict:
    """Interleaved rounds on one model; returns per-variant wall/CPU samples and direct costs."""
    from daemon.app import shutdown_app
    from daemon.config import Config
    from daemon.services import get_services
    cfg = Config(model=model, cache_dir=args.cache_dir, state_dir=os.path.join(tmp, "state"),
                 metrics_dir=os.path.join(tmp, "metrics"), threads=args.threads,
                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                 metrics_refresh_s=3600.0, log_level="WARNING")
    apps = build_apps(cfg)
    try:
        gc_pauses = get_services(apps["on"]).sampler._gc_pauses  # the real app's process-wide gc callback
        clients = {name: app.test_client() for name, app in apps.items()}
        rng = random.Random(args.seed)
        samples = {name: {"wall": [], "cpu": []} for name in VARIANTS}
        for i in range(args.warmup + turns):
            # a fresh session per turn (created untimed): the shortest turn, so the largest share
            # for the instrumentation, and no history growth across the run
            sessions = {name: c.post("/v1/sessions", json={}).get_json()["id"] for name, c in clients.items()}
            order = list(VARIANTS)
            rng.shuffle(order)
            for name in order:
                (gc_pauses.install if name == "on" else gc_pauses.uninstall)()
                wall, cpu = turn(clients[name], sessions[name], PROMPTS[i % len(PROMPTS)],
                                 args.new_tokens)
                if i >= args.warmup:
                    samples[name]["wall"].append(wall)
                    samples[name]["cpu"].append(cpu)
        gc_pauses.install()
        on = clients["on"]
        direct = direct_costs(apps, clients, lambda: on.post("/v1/sessions", json={}).get_json()["id"],
                              lambda sid: turn(on, sid, PROMPTS[0], args.new_tokens))
    finally:
        for app in apps.values():
            shutdown_app(app)
    return {"samples": samples, "direct": direct}


def _per_call_us(fn, reps: int) -> float:
    """Median of 5 batches of reps calls, CPU microseconds per call of this thread (load shows less)."""
    batches = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(reps):
            fn()
        batches.append((time.thread_time() - t0) / reps * 1e6)
    return median(batches)


def in_situ(objects, new_session, run_turn, turns: int = 10) -> dict:
    """{method: (calls per turn, CPU µs per call)} of the Recorder and Sampler methods as they run
    inside real turns (wrapped on the instances: cold caches included, unlike a tight loop); plus
    the GC collections per turn (each runs the GC-pause callback twice)."""
    spent: dict[str, list] = {}
    names = [(m, n) for m in objects for n in vars(type(m))
             if n.startswith(("on_", "set_", "observe", "refresh"))
             and n not in ("on_close", "set_config", "set_model_info")]
    sessions = [new_session() for _ in range(turns)]  # created before wrapping: untimed, as above
    for m, name in names:
        def wrapper(*a, _orig=getattr(m, name), _name=name, **k):
            t0 = time.thread_time()
            try:
                return _orig(*a, **k)
            finally:
                spent.setdefault(_name, []).append(time.thread_time() - t0)
        setattr(m, name, wrapper)
    collections = sum(g["collections"] for g in gc.get_stats())
    try:
        for session_id in sessions:
            run_turn(session_id)
    finally:
        for m, name in names:
            delattr(m, name)
    out = {name: (len(xs) / turns, sum(xs) / len(xs) * 1e6) for name, xs in spent.items()}
    out["gc pause callback"] = ((sum(g["collections"] for g in gc.get_stats()) - collections) / turns,
                                float("nan"))
    return out


def direct_costs(apps: dict, clients: dict, new_session, run_turn) -> dict:
    """Per instrumentation call: (calls per turn, CPU µs each); and the timer-driven sampler's costs."""
    from daemon.services import get_services
    from daemon.telemetry import gcstats, process
    services = get_services(apps["on"])
    m = services.sampler
    out = in_situ((services.recorder, m), new_session, run_turn)
    callback = m._gc_pauses._callback
    out["gc pause callback"] = (out["gc pause callback"][0], _per_call_us(
        lambda: (callback("start", {}), callback("stop", {"generation": 0})), 400))
    # HTTP hooks: the same trivial route on the on and off apps, interleaved
    hook = {"on": [], "off": []}
    for _ in range(300):
        for name in hook:
            t0 = time.thread_time()
            clients[name].get("/healthz")
            hook[name].append((time.thread_time() - t0) * 1e6)
    out["http hooks (before + after request)"] = (1, median(hook["on"]) - median(hook["off"]))
    sampler = {"uss": _per_call_us(lambda: process.unique_memory_bytes(m._proc), 3),
               "tracked": _per_call_us(gcstats.tracked_objects, 1), "refresh": _per_call_us(m.refresh, 40)}
    return {"calls": out, "sampler": sampler}


def _pct(x: float) -> str:
    return f"{x * 100:+.2f} %"


def report(model: str, result: dict, new_tokens: int, refresh_s: float) -> str:
    """A markdown block: per-variant table, overhead vs noise floor, direct costs."""
    s = result["samples"]
    stats = {name: {k: summary(v) for k, v in s[name].items()} for name in VARIANTS}
    ms = "{:.2f}".format
    rows = [(name, ms(w["median"] * 1e3), f"{ms(w['p10'] * 1e3)}–{ms(w['p90'] * 1e3)}",
             ms(w["iqr"] * 1e3), ms(c["median"] * 1e3), f"{ms(c['p10'] * 1e3)}–{ms(c['p90'] * 1e3)}")
            for name in VARIANTS for w, c in [(stats[name]["wall"], stats[name]["cpu"])]]
    out = [f"### {model} ({stats['on']['wall']['n']} turns per variant, {new_tokens} new tokens)", "",
           markdown_table(("variant", "wall median ms", "wall p10–p90 ms", "wall IQR ms",
                           "CPU median ms", "CPU p10–p90 ms"), rows), ""]
    rows = []
    for kind in ("wall", "cpu"):
        off = stats["off"][kind]["median"]
        rows.append((f"{kind}: difference of medians", _pct(stats["on"][kind]["median"] / off - 1),
                     _pct(stats["off2"][kind]["median"] / off - 1)))
        # paired: each round ran all three back to back, so load drift between rounds cancels
        paired = [median([a / b - 1 for a, b in zip(s[x][kind], s["off"][kind])]) for x in ("on", "off2")]
        rows.append((f"{kind}: median of per-round ratios", _pct(paired[0]), _pct(paired[1])))
    out += [markdown_table(("estimate", "overhead (on−off)/off", "noise floor (off2−off)/off"), rows), ""]
    d = result["direct"]
    off_us = stats["off"]["cpu"]["median"] * 1e6
    rows, total = [], 0.0
    for name, (n, us) in sorted(d["calls"].items(), key=lambda kv: -(kv[1][0] * kv[1][1])):
        rows.append((name, f"{n:g}", f"{us:.1f}", f"{n * us:.1f}", f"{n * us / off_us * 100:.3f} %"))
        total += n * us
    rows.append(("**sum**", "", "", f"{total:.1f}", f"{total / off_us * 100:.3f} %"))
    out += [markdown_table(("instrumentation call (in real turns)", "calls / turn", "CPU µs each",
                            "CPU µs / turn", "% of an off turn (CPU median)"), rows), ""]
    sm = d["sampler"]
    share = (sm["refresh"] + sm["uss"]) / (refresh_s * 1e6) + sm["tracked"] / 30e6
    out += [f"Sampler thread (a timer, not per turn; parked during the turns above): refresh "
            f"{sm['refresh']:.0f} µs (tight loop) + USS {sm['uss']:.0f} µs every {refresh_s:g} s "
            f"(the default metrics_refresh_s), GC tracked objects {sm['tracked']:.0f} µs every 30 s: "
            f"{share * 100:.3f} % of one core.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    """Run the benchmark on each model and print markdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--turns", type=int, default=24, help="measured turns per variant (0.5B model)")
    p.add_argument("--tiny-turns", type=int, default=60, help="measured turns per variant on builtin:tiny")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured turns per variant first")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--single-process", action="store_true",
                   help="in-memory metric values instead of the multiprocess files `serve` uses")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if min(args.turns, args.tiny_turns) < 20:
        p.error("at least 20 turns per variant")
    with tempfile.TemporaryDirectory(prefix="edgechat-bench-") as tmp:
        if not args.single_process:
            from daemon.telemetry.multiproc import prepare_dir  # before anything imports prometheus_client
            prepare_dir(os.path.join(tmp, "metrics"))
        import torch
        torch.set_num_threads(args.threads)
        mode = "single-process" if args.single_process else "multiprocess (as `edgechat serve`)"
        print(f"metrics overhead, {today()}: metric values {mode}, torch threads {args.threads}; "
              f"{machine_note()}\n")
        for model in args.models.split(","):
            turns = args.tiny_turns if model == "builtin:tiny" else args.turns
            started = time.monotonic()
            result = run_model(model, turns, args, tmp)
            print(report(model, result, args.new_tokens, 5.0))
            print(f"({time.monotonic() - started:.0f} s; after: {machine_note()})\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
