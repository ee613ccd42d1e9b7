"""Simulates an edgechat daemon's scrapes (memory, history, turns, HTTP, GC) as promtool input series."""
from __future__ import annotations

import bisect
import dataclasses
import math
import random
from typing import Callable

STEP = 30                      # scrape interval of prometheus/prometheus.yml, seconds
JOB, INSTANCE = "edgechat", "127.0.0.1:8000"
MiB, GiB = 2 ** 20, 2 ** 30
TTL = 600                      # session_ttl_s: an idle session is evicted 10 min after its last turn
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)   # turn latency, CPU inference
TURN_INDEX = (("1", 1), ("2-5", 5), ("6-10", 10), ("11-20", 20), ("21+", math.inf))
STALE = "stale"
FILE_BACKED = 120 * MiB        # RSS that is not anonymous: interpreter, shared libraries, mapped files


def turn_bucket(i: int) -> str:
    """The turn_index label of the i-th turn of a conversation."""
    return next(label for label, last in TURN_INDEX if i <= last)


@dataclasses.dataclass
class User:
    """Someone chatting: conversations of `turns` turns, `think` s between turns, `gap` s between chats."""

    start: float
    turns: int
    latency: Callable[[int], float]      # seconds taken by turn i of a conversation (before jitter)
    think: float = 30
    gap: float = 120
    until: float = math.inf


@dataclasses.dataclass
class Epoch:
    """One life of the daemon, from (re)start to stop: its workers, memory, users and history policy."""

    start: float
    memory: Callable[[float], float]     # service memory (bytes) at t seconds after `start`
    users: list[User]
    pids: tuple[str, ...] = ("",)        # "" = single-process mode: no pid label
    end: float = math.inf
    limit: float = 2 * GiB
    max_turns: int = 5                   # what the daemon reports as its configured limit
    trims: bool = True                   # False: the history bug (appends, never trims)
    swap: Callable[[float], float] = lambda t: 0   # workers' swapped-out memory (bytes) at t after `start`


@dataclasses.dataclass
class Turn:
    """One finished turn: when it ended, its position in the conversation, how long it took."""

    end: float
    index: int
    seconds: float


@dataclasses.dataclass
class Session:
    """One conversation: created at `created`, its turns in order."""

    created: float
    turns: list[Turn]

    @property
    def ends(self) -> list[float]:
        """End times of the turns, for counting those finished by a scrape."""
        return [turn.end for turn in self.turns]


class Histogram:
    """Cumulative bucket counts of turn latency, as prometheus_client keeps them."""

    def __init__(self):
        self.buckets = [0] * len(BUCKETS)
        self.count, self.sum = 0, 0.0

    def observe(self, seconds: float) -> None:
        for i, le in enumerate(BUCKETS):
            self.buckets[i] += seconds <= le
        self.count += 1
        self.sum += seconds


def _simulate_users(epoch: Epoch, rng: random.Random, horizon: float) -> list[Session]:
    sessions = []
    for user in epoch.users:
        t = epoch.start + user.start
        until = min(user.until, epoch.end, horizon)
        while t < until:
            session = Session(t, [])
            for i in range(1, user.turns + 1):
                seconds = user.latency(i) * rng.uniform(0.9, 1.1)
                if t + seconds >= until:
                    break
                t += seconds
                session.turns.append(Turn(t, i, round(seconds, 3)))
                t += user.think * rng.uniform(0.5, 1.5)
            sessions.append(session)
            t += user.gap * rng.uniform(0.5, 1.5)
    return sessions


class Scrapes:
    """The series of one scenario, sampled every STEP seconds over `minutes`."""

    def __init__(self, minutes: float, seed: int = 1):
        self.n = int(minutes * 60 // STEP) + 1
        self.rng = random.Random(seed)
        self.series: dict[str, list] = {}

    def _put(self, name: str, labels: dict, k: int, value) -> None:
        all_labels = {"job": JOB, "instance": INSTANCE, **{a: b for a, b in labels.items() if b != ""}}
        key = name + "{" + ", ".join(f'{a}="{b}"' for a, b in sorted(all_labels.items())) + "}"
        self.series.setdefault(key, [None] * self.n)[k] = value

    def add(self, epoch: Epoch) -> None:
        """Sample one daemon life; counters start from zero, series go stale when it stops."""
        sessions = _simulate_users(epoch, self.rng, self.n * STEP)
        turns = sorted((turn for s in sessions for turn in s.turns), key=lambda turn: turn.end)
        hist = {label: Histogram() for label, _ in TURN_INDEX}
        done = 0
        for k in range(self.n):
            t = k * STEP
            if t < epoch.start + STEP:   # the first scrape after a start sees the new process
                continue
            if t >= epoch.end:
                if t - STEP < epoch.end:
                    for key in self._keys_of(epoch):
                        self.series[key][k] = STALE
                continue
            while done < len(turns) and turns[done].end <= t:
                hist[turn_bucket(turns[done].index)].observe(turns[done].seconds)
                done += 1
            self._sample(epoch, k, t, sessions, done, hist)

    def _keys_of(self, epoch: Epoch) -> list[str]:
        return [key for key, values in self.series.items() if not key.startswith("up{")
                and any(v is not None and v != STALE for v in values)]

    def _sample(self, epoch: Epoch, k: int, t: float, sessions: list[Session], done: int,
                hist: dict[str, "Histogram"]) -> None:
        put = self._put
        memory = round(epoch.memory(t - epoch.start))
        put("edgechat_service_memory_bytes", {}, k, memory)
        put("edgechat_memory_limit_bytes", {}, k, epoch.limit)
        swap = round(epoch.swap(t - epoch.start))
        for pid in epoch.pids:
            rss = memory // len(epoch.pids)
            put("edgechat_process_resident_memory_bytes", {"pid": pid}, k, rss)
            put("edgechat_process_unique_memory_bytes", {"pid": pid}, k, rss * 4 // 5)
            put("edgechat_process_anonymous_memory_bytes", {"pid": pid}, k, rss - FILE_BACKED // len(epoch.pids))
            put("edgechat_process_swap_bytes", {"pid": pid}, k, swap // len(epoch.pids))
            put("edgechat_process_start_time_seconds", {"pid": pid}, k, epoch.start)
        # history as the store holds it: trimmed to max_turns unless the epoch has the bug
        keep = epoch.max_turns if epoch.trims and epoch.max_turns > 0 else math.inf
        alive = [s for s in sessions if s.created <= t
                 and t < (s.turns[-1].end if s.turns else s.created) + TTL]
        lengths = [1 + 2 * min(bisect.bisect_right(s.ends, t), keep) for s in alive]
        put("edgechat_history_messages_max", {}, k, max(lengths, default=0))
        put("edgechat_history_messages", {}, k, sum(lengths))
        put("edgechat_sessions", {}, k, len(alive))
        put("edgechat_history_max_turns", {}, k, epoch.max_turns)
        # counters
        put("edgechat_turns_total", {"outcome": "ok"}, k, done)
        created = sum(s.created <= t for s in sessions)
        http = {("/v1/sessions", "201"): created, ("/v1/sessions/<id>/messages", "200"): done,
                ("/metrics", "200"): k - int(epoch.start // STEP)}
        for (route, status), count in http.items():
            put("edgechat_http_requests_total", {"route": route, "method": "POST" if route != "/metrics"
                                                 else "GET", "status": status}, k, count)
        put("edgechat_requests_rejected_total", {"reason": "queue_full"}, k, 0)
        put("edgechat_gc_uncollectable_objects_total", {"generation": "2"}, k, 0)
        # a few ms of young-generation collection per turn, a full collection every 20 turns
        put("edgechat_gc_pause_seconds_sum", {"generation": "0"}, k, round(0.004 * done, 3))
        put("edgechat_gc_pause_seconds_sum", {"generation": "2"}, k, round(0.06 * (done // 20), 3))
        for label, h in hist.items():
            for le, count in zip(BUCKETS, h.buckets):
                put("edgechat_turn_duration_seconds_bucket", {"turn_index": label, "le": f"{le:g}"}, k, count)
            put("edgechat_turn_duration_seconds_bucket", {"turn_index": label, "le": "+Inf"}, k, h.count)
            put("edgechat_turn_duration_seconds_count", {"turn_index": label}, k, h.count)
            put("edgechat_turn_duration_seconds_sum", {"turn_index": label}, k, round(h.sum, 3))

    def up(self, down: list[tuple[float, float]]) -> None:
        """The `up` series Prometheus writes itself: 0 while the daemon is between lives."""
        for k in range(self.n):
            t = k * STEP
            self._put("up", {}, k, 0 if any(a <= t < b + STEP for a, b in down) else 1)


def encode(values: list, scale: float = 1.0) -> str:
    """promtool's series notation, with runs folded ("1+2x10", "_x5", "stale")."""
    out, i = [], 0
    while i < len(values):
        v = values[i]
        if v is None or v == STALE:
            j = i
            while j < len(values) and values[j] == v:
                j += 1
            out.append("_" + (f"x{j - i}" if j - i > 1 else "") if v is None else " ".join([STALE] * (j - i)))
            i = j
            continue
        j, step = i + 1, None
        while j < len(values) and isinstance(values[j], (int, float)):
            delta = values[j] - values[j - 1]
            if step is None:
                step = delta
            elif delta != step:
                break
            j += 1
        if j - i <= 2:
            out.append(_num(v * scale))
            i += 1
            continue
        out.append(f"{_num(v * scale)}{'+' if step >= 0 else '-'}{_num(abs(step) * scale)}x{j - i - 1}")
        i = j
    return " ".join(out)


def _num(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.6f}".rstrip("0").rstrip(".")
