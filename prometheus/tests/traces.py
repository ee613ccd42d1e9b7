"""Device traces over days, for measuring the alerts: every series the memory and history rules read,
one sample per 30 s scrape, from a seeded model of an edge device (shapes.py).

A trace is one device from power-on: traffic with daily and weekly cycles, a KV pool and heap filling
to their caps and settling, sessions, worker recycling, deploys, swap on a pressured host, a limit
changed at run time, scrape gaps, hours offline, counter resets at each restart. A leaky trace adds
one leak shape (shapes.LEAKS) and records when the leak began and when RAM + swap first reached the
limit (the OOM kill; the daemon restarts and the leak goes on). simulate.py's scenarios are hours long
and hand-shaped for promtool; these are days long and drawn at random, for thousands of device-days.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from shapes import DAY, HOUR, LEAKS, MASTER, Params, draw_params, expected_requests, history, kv_pool, leak_bytes, \
    worker_memory
from simulate import FILE_BACKED, GiB, STEP, MiB

# Healthy archetypes; every trace also has daily cycles, caches filling, the sawtooth and scrape gaps.
HEALTHY = ("steady", "daily", "recycling", "deploys", "swap", "limit_change", "offline", "sessions_cap")
TIME_VALUED = ("edgechat_process_start_time_seconds",)   # values are Unix times: the run's start is added


@dataclasses.dataclass
class Truth:
    """What a trace knows about itself (seconds from its start)."""

    device: str
    shape: str
    days: int
    leak_start: float | None = None
    limit_at: float | None = None             # the first OOM: RAM + swap reached the limit
    boots: list[float] = dataclasses.field(default_factory=list)
    offline: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    # RAM + swap against the limit every 5 minutes (NaN while down): how much head room a leak had used
    committed: np.ndarray | None = None
    limits: np.ndarray | None = None

    def headroom_left(self, at: float) -> float | None:
        """Share of the head room the leak found at its start still unused at `at` (seconds)."""
        if self.committed is None or self.leak_start is None:
            return None
        series = lambda t: self.committed[min(int(t // 300), len(self.committed) - 1)]  # noqa: E731
        limit = self.limits[min(int(self.leak_start // 300), len(self.limits) - 1)]
        first = next((series(self.leak_start + k * 300) for k in range(12)
                      if not np.isnan(series(self.leak_start + k * 300))), np.nan)
        now = series(at)
        if np.isnan(first) or np.isnan(now) or limit <= first:
            return None
        return float(max(0.0, min(1.0, (limit - now) / (limit - first))))

    @property
    def leaky(self) -> bool:
        return self.shape in LEAKS

    def armed_from(self, arm_s: float) -> float | None:
        """Where a leak's lead is counted from: its start, or the rules' arming after the last boot
        before the limit, whichever is later."""
        if self.leak_start is None:
            return None
        until = self.limit_at if self.limit_at is not None else math.inf
        boot = max((b for b in self.boots if b <= until), default=0.0)
        return max(self.leak_start, boot + arm_s)


@dataclasses.dataclass
class Series:
    """One series of a trace: samples from step `at` on (NaN: no sample in that scrape)."""

    name: str
    labels: dict
    at: int
    values: np.ndarray


@dataclasses.dataclass
class Trace:
    truth: Truth
    steps: int
    series: list[Series]


def _leak_plan(shape: str, rng: np.random.Generator) -> tuple[float, float, int]:
    """(seconds from start to limit aimed at, leak start, trace days) for a leak shape."""
    s = LEAKS[shape]
    lo, hi = s.to_limit
    if not hi:                                   # never reaches the limit by design: a few days
        return 0.0, rng.uniform(1, 12) * HOUR if rng.random() > s.at_boot else 0.0, int(rng.integers(2, 8))
    to_limit = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    latest = max(HOUR, min(3 * DAY, 14 * DAY - 1.3 * to_limit - 6 * HOUR))
    start = 0.0 if rng.random() < s.at_boot else rng.uniform(HOUR, latest)
    return to_limit, start, int(min(14, max(1, math.ceil((start + 1.3 * to_limit + 6 * HOUR) / DAY))))


class _Builder:
    def __init__(self, name: str, shape: str, days: int | None, seed: int, deploy_at: float | None = None):
        self.rng = rng = np.random.default_rng(seed)
        self.leak = LEAKS.get(shape)
        self.deploy_at = deploy_at
        to_limit, start, leak_days = _leak_plan(shape, rng) if self.leak else (0.0, None, 0)
        if self.leak and deploy_at is not None:
            start = deploy_at + STEP          # the deployed release leaks from its first scrape
        days = days or leak_days
        self.p: Params = draw_params(rng, recycling=shape == "recycling" or bool(self.leak and self.leak.recycled))
        if shape == "sessions_cap":
            self.p = dataclasses.replace(self.p, ttl=0.0)
        self.n = days * DAY // STEP
        self.t = np.arange(self.n, dtype=float) * STEP
        self.rate = expected_requests(self.t, self.p, rng.lognormal(0, 0.3, days + 3))
        self.truth = Truth(name, shape, days, leak_start=start)
        self.sampled = np.zeros(self.n, bool)
        self.limit = np.full(self.n, self.p.limit)
        self.cols = {k: np.full(self.n, np.nan) for k in ("service", "turns", "hist_total", "hist_max", "sessions",
                                                          "committed")}
        self.pids: list[tuple] = []     # first step, anon, swap, KV pool, start time
        self.swapped = np.zeros(self.n)          # healthy swap-out on a pressured host (worker 0)
        self.size, self.chance = 0.0, 0.0
        if self.leak:
            self._size_leak(to_limit)

    def _size_leak(self, to_limit: float) -> None:
        """How much each increment keeps, so that the limit comes about `to_limit` after the start."""
        s, rng, p = self.leak, self.rng, self.p
        if s.name in ("fast", "tensors") and self.deploy_at is None:      # these begin in a busy hour
            busy = np.flatnonzero((self.rate >= np.quantile(self.rate, 0.8)) & (self.t > 2 * 3600))
            self.truth.leak_start = float(self.t[rng.choice(busy)]) if len(busy) else 2 * 3600.0
        elif s.driver in ("requests", "tokens", "sessions", "turns") and self.truth.leak_start > 0:
            # a leak that usage triggers begins while the device is in use
            used = np.flatnonzero((self.t >= self.truth.leak_start) & (self.rate >= 0.5 * self.rate.mean()))
            self.truth.leak_start = float(self.t[used[0]]) if len(used) else self.truth.leak_start
        start = self.truth.leak_start
        room = p.limit - MASTER - p.workers * (p.base + p.kv_cap + p.frag_cap / 2)
        span = (self.t >= start) & (self.t < start + max(to_limit, 3600))
        requests = max(self.rate[span].sum(), 1.0)
        if s.driver == "steps":
            self.size = rng.uniform(50, 200) * MiB
            self.chance = room / self.size / 1.25 / max(span.sum(), 1)
        elif s.driver == "history":
            self.size = rng.uniform(0.1, 0.5) * MiB    # per message held: text, token ids, prompt buffers
        else:
            per = {"requests": requests, "turns": requests, "tokens": requests * p.tokens,
                   "sessions": requests / p.conv_turns, "time": span.sum()}[s.driver]
            # a request, a token's share or a conversation keeps at most a few MB (the fast shapes more):
            # where traffic is too thin for the limit in `to_limit`, the leak just takes longer
            cap = (64 if s.name in ("fast", "hours", "tensors") else 8) * MiB
            self.size = min(room / per, cap * {"tokens": 1 / p.tokens, "sessions": 4}.get(s.driver, 1))
        if s.recycled:   # workers recycle when their share of the leak is 30-70 % of the head room
            share = room / p.workers * rng.uniform(0.3, 0.7)
            self.p = dataclasses.replace(p, max_requests=max(50, int(share / self.size)))

    def plan(self, shape: str) -> list[tuple[int, int]]:
        """Healthy events; returns the stops: (step a daemon life ends, step the next one boots)."""
        rng, days, p, t, stops = self.rng, self.truth.days, self.p, self.t, []
        healthy = shape not in LEAKS
        if self.deploy_at is not None:
            at = int(self.deploy_at // STEP)
            stops.append((at, at + 1))
        if healthy and (shape == "deploys" or rng.random() < 0.15):
            for at in rng.uniform(0.3 * DAY, days * DAY, max(1, int(days / rng.uniform(1, 3)))):
                stops.append((int(at // STEP), int(at // STEP) + int(rng.integers(2, 6))))
        if healthy and (shape == "offline" or rng.random() < 0.1):
            for at in rng.uniform(0.5 * DAY, days * DAY, max(1, days // 5)):
                end = min(at + rng.uniform(1, 8) * HOUR, days * DAY)
                self.truth.offline.append((at, end))
                stops.append((int(at // STEP), int(end // STEP)))
        if healthy and (shape == "swap" or rng.random() < 0.1):
            at, size = rng.uniform(0.2, max(0.3, days - 0.5)) * DAY, rng.uniform(100, 400) * MiB
            up, hold, down = rng.uniform(0.5, 1) * HOUR, rng.uniform(2, 24) * HOUR, rng.uniform(1, 3) * HOUR
            self.swapped = size * np.clip(np.minimum((t - at) / up, 1 - (t - at - up - hold) / down), 0, 1)
        if healthy and (shape == "limit_change" or rng.random() < 0.05):
            at = rng.uniform(0.2, days) * DAY
            need = (MASTER + p.workers * (p.base + p.kv_cap + p.frag_cap) + 100 * MiB) / 0.74
            lower = p.limit - 0.5 * GiB
            self.limit[t >= at] = lower if lower >= need and rng.random() < 0.5 else p.limit + GiB
        return sorted(stops)

    def _driver(self, mine: np.ndarray, hist: dict) -> np.ndarray:
        p, rng, n = self.p, self.rng, len(mine)
        kind = self.leak.driver
        if kind in ("requests", "turns"):
            return mine
        if kind == "tokens":
            return mine * rng.gamma(4, p.tokens / 4, n)
        if kind == "sessions":
            return hist["arrivals"] / p.workers
        if kind == "time":
            return np.ones(n)
        return np.full(n, self.chance / p.workers)   # steps

    def epoch(self, start: int, end: int) -> int | None:
        """One daemon life over steps [start, end): its series; returns the step after an OOM kill, if any."""
        p, rng, t = self.p, self.rng, self.t
        first = start + 1                               # the first scrape after a start sees the process
        if first >= end:
            return None
        seg = slice(first, end)
        requests = rng.poisson(self.rate[seg]).astype(float)
        boot_t = t[start]
        leak_from = max(self.truth.leak_start, boot_t) if self.leak else math.inf
        on = t[seg] >= leak_from
        hist = history(requests, p, trims=not (self.leak and self.leak.driver == "history"), rng=rng)
        parts = []
        for w in range(p.workers):
            mine = np.floor(requests / p.workers) + ((requests % p.workers) > w)
            before = np.cumsum(mine) - mine
            cycle = (before // p.max_requests) if p.max_requests else np.zeros_like(before)
            starts = np.flatnonzero(np.diff(cycle, prepend=-1))
            lives = np.diff(np.append(starts, len(cycle)))
            born = np.repeat(np.where(starts == 0, boot_t, t[seg][starts] - 15), lives)
            served = before - cycle * p.max_requests
            mem = worker_memory(t[seg] - born, served, mine, p, rng.uniform(0, p.saw_period), rng)
            leaked = np.zeros(len(mine))
            if self.leak and self.leak.driver == "history":
                leaked = hist["total"] * self.size / p.workers * on
            elif self.leak:
                leaked = leak_bytes(self.leak, self._driver(mine, hist) * on, self.size, rng)
                if self.leak.recycled:     # a recycled worker gives its leak back
                    leaked = leaked - np.repeat(np.concatenate([[0.0], leaked[starts[1:] - 1]]), lives)
            swapped = self.swapped[seg] * (w == 0) + (leaked if self.leak and self.leak.where == "swap" else 0)
            parts.append((mem + leaked, swapped, starts, born, kv_pool(served, p)))
        service = sum(part[0] - part[1] for part in parts) + MASTER
        swap = sum(part[1] for part in parts)
        over = np.flatnonzero(service + swap >= self.limit[seg])
        stop = over[0] + 1 if len(over) else len(service)     # the OOM scrape is the last one seen
        if len(over) and self.truth.limit_at is None and self.leak:
            self.truth.limit_at = float(t[seg][over[0]])
        idx = slice(first, first + stop)
        self.sampled[idx] = True
        self.cols["service"][idx] = np.round(service[:stop])
        self.cols["committed"][idx] = (service + swap)[:stop]
        self.cols["turns"][idx] = np.cumsum(requests)[:stop]
        for col, key in (("hist_total", "total"), ("hist_max", "max"), ("sessions", "sessions")):
            self.cols[col][idx] = hist[key][:stop]
        for mem, swapped, starts, born, kv in parts:
            for a, b in zip(starts, np.append(starts[1:], len(mem))):
                b = min(b, stop)
                if a < b:
                    anon = mem[a:b] - swapped[a:b] - FILE_BACKED / p.workers
                    self.pids.append((first + a, np.round(anon), np.round(swapped[a:b]), np.round(kv[a:b]),
                                      float(born[a])))
                    if p.workers == 1 and a:          # the one worker reloading: nobody answers scrapes
                        self.sampled[first + a:first + min(a + 2, b)] = False
        return first + stop if len(over) else None

    def run(self, stops: list[tuple[int, int]]) -> None:
        """Daemon lives between boots; an OOM kill adds a restart 1-2 minutes later."""
        boot, boots, i = 0, [0], 0
        while boot < self.n:
            while i < len(stops) and stops[i][0] <= boot:
                i += 1
            end, nxt = stops[i] if i < len(stops) else (self.n, self.n)
            oom = self.epoch(boot, end)
            boot = oom + int(self.rng.integers(2, 5)) if oom is not None else nxt
            if boot < self.n:
                boots.append(boot)
        self.truth.boots = [b * STEP for b in boots]

    def series(self) -> list[Series]:
        gaps = self.rng.random(self.n) < 1 / 1440                   # a failed scrape about twice a day
        gaps = np.convolve(gaps, np.ones(int(self.rng.integers(1, 6))), "same") > 0
        ok = self.sampled & ~gaps
        pick = lambda v, a=0: np.where(ok[a:a + len(v)], v, np.nan)  # noqa: E731
        out = [Series("edgechat_service_memory_bytes", {}, 0, pick(self.cols["service"])),
               Series("edgechat_memory_limit_bytes", {}, 0, pick(self.limit)),
               Series("edgechat_turns_total", {"outcome": "ok"}, 0, pick(self.cols["turns"])),
               Series("edgechat_history_messages", {}, 0, pick(self.cols["hist_total"])),
               Series("edgechat_history_messages_max", {}, 0, pick(self.cols["hist_max"])),
               Series("edgechat_sessions", {}, 0, pick(self.cols["sessions"])),
               Series("edgechat_history_max_turns", {}, 0, pick(np.full(self.n, float(self.p.max_turns))))]
        for pid, (a, anon, swap, kv, born) in enumerate(self.pids, start=100):
            labels = {"pid": str(pid)}
            out += [Series("edgechat_process_anonymous_memory_bytes", labels, a, pick(anon, a)),
                    Series("edgechat_process_swap_bytes", labels, a, pick(swap, a)),
                    Series("edgechat_kv_cache_bytes", labels, a, pick(kv, a)),
                    Series("edgechat_process_start_time_seconds", labels, a, pick(np.full(len(anon), born), a))]
        return out


def leak_days(shape: str, seed: int) -> int:
    """The length build() gives a leaky trace of that seed (its first draws decide it)."""
    return _leak_plan(shape, np.random.default_rng(seed))[2]


def build(name: str, shape: str, seed: int, days: int | None = None, deploy_at: float | None = None) -> Trace:
    """One device's trace: `shape` is a healthy archetype (HEALTHY, `days` long) or a leak (shapes.LEAKS;
    unless `days` is given, its length follows from when the leak starts and how fast it grows).
    `deploy_at`: a restart at that time (s), from which a leak of the new release begins."""
    if shape not in HEALTHY and shape not in LEAKS:
        raise ValueError(f"unknown shape {shape!r}: healthy {HEALTHY}, leaks {tuple(LEAKS)}")
    if shape in HEALTHY and not days:
        raise ValueError("a healthy trace needs its length in days")
    b = _Builder(name, shape, days, seed, deploy_at)
    b.run(b.plan(shape))
    b.truth.committed = b.cols["committed"][::10].astype(np.float32)
    b.truth.limits = b.limit[::10].astype(np.float32)
    return Trace(b.truth, b.n, b.series())


__all__ = ["HEALTHY", "LEAKS", "STEP", "TIME_VALUED", "Series", "Trace", "Truth", "build", "leak_days"]
