"""The pieces a day-long device trace is made of (traces.py): traffic, a worker's memory, history, leaks.

Every function works on whole numpy arrays, one value per 30 s scrape, so that thousands of
device-days take seconds to build. Sizes are bytes, times seconds, rates per scrape step.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from simulate import FILE_BACKED, MiB, STEP

DAY, HOUR, MINUTE = 86400, 3600, 60
MASTER = 40 * MiB          # the gunicorn master: no model, a small steady RSS


@dataclasses.dataclass(frozen=True)
class Params:
    """One device's drawn character: hardware, configuration, users."""

    limit: float               # memory limit (cgroup), bytes
    workers: int
    base: float                # one worker's memory after load and warm-up (the model copy and runtime)
    kv_cap: float              # kv_cache_bytes: the KV pool a worker fills, then keeps
    kv_fill: float             # requests over which the pool fills (1 - 1/e of it)
    frag_cap: float            # heap fragmentation a worker gathers over its life, bounded
    frag_fill: float           # requests over which it gathers
    saw_amp: float             # GC / allocator sawtooth, peak to peak
    saw_period: float          # seconds
    inflight: float            # memory of the turn being generated (prefill buffers, its KV cache)
    turn_s: float              # seconds a turn takes
    peak_rpm: float            # requests a minute at the busiest hour
    open_h: float              # local hours of use; floor = share of peak outside them
    close_h: float
    floor: float
    weekend: float             # traffic factor on days 5 and 6 of the week
    tz: float                  # offset of local time, seconds
    tokens: float              # completion tokens per request (mean)
    conv_turns: float          # turns per conversation (mean, geometric)
    max_turns: int             # max_history_turns (the daemon's configured limit)
    ttl: float                 # session_ttl_s; 0 = sessions never expire
    max_sessions: int
    max_requests: int          # gunicorn's worker recycling; 0 = off


def draw_params(rng: np.random.Generator, recycling: bool = False) -> Params:
    """A plausible, well-sized device: healthy steady memory stays under ~75 % of its limit."""
    limit = rng.choice([2.0, 3.0, 4.0], p=[0.6, 0.2, 0.2]) * 2 ** 30
    workers = 2 if limit >= 3 * 2 ** 30 and rng.random() < 0.5 else 1
    kv_cap = rng.choice([64, 128, 128, 256, 512]) * MiB
    frag_cap = rng.uniform(20, 160) * MiB
    # the model's copy per worker: bf16 ~1.3 GB, int8 ~0.87 GB, int4 ~0.76 GB after load
    room = (0.74 * limit - MASTER) / workers - kv_cap - frag_cap - 80 * MiB
    base = min(rng.uniform(0.72, 1.35) * 2 ** 30, room)
    open_h = rng.uniform(6, 10)
    always_on = rng.random() < 0.2
    return Params(
        limit=float(limit), workers=workers, base=base, kv_cap=kv_cap, kv_fill=rng.uniform(20, 400),
        frag_cap=frag_cap, frag_fill=rng.uniform(300, 20000), saw_amp=rng.uniform(20, 100) * MiB,
        saw_period=rng.uniform(200, 900), inflight=rng.uniform(10, 70) * MiB, turn_s=rng.uniform(1.5, 15),
        peak_rpm=float(np.exp(rng.uniform(np.log(0.3), np.log(8)))), open_h=open_h,
        close_h=open_h + rng.uniform(8, 14), floor=rng.uniform(0.4, 1.0) if always_on else rng.uniform(0, 0.05),
        weekend=rng.uniform(0.1, 1.0), tz=rng.uniform(0, DAY), tokens=rng.uniform(40, 250),
        conv_turns=rng.uniform(1.5, 12), max_turns=int(rng.choice([5, 5, 5, 10])),
        ttl=0.0 if rng.random() < 0.1 else float(rng.choice([300, 600, 600, 1800, 3600])),
        max_sessions=int(rng.choice([100, 300, 1000])),
        max_requests=int(rng.uniform(300, 3000)) if recycling else 0)


def expected_requests(t: np.ndarray, p: Params, day_factors: np.ndarray) -> np.ndarray:
    """Mean requests per scrape step: daily use hours, quieter weekends, busier and quieter days."""
    local = t + p.tz
    hour = (local / HOUR) % 24
    day = (local // DAY).astype(int)
    span = (hour - p.open_h) % 24 / (p.close_h - p.open_h)
    bump = np.where(span < 1, np.sin(np.pi * np.clip(span, 0, 1)) ** 1.5, 0.0)
    week = np.where(day % 7 >= 5, p.weekend, 1.0)
    return p.peak_rpm * STEP / 60 * (p.floor + (1 - p.floor) * bump) * week * day_factors[day - day.min()]


def sawtooth(age: np.ndarray, p: Params, phase: float) -> np.ndarray:
    """Allocator arenas filling, then a collection handing memory back (generate.py's sawtooth, per device)."""
    return ((age + phase) % p.saw_period) / p.saw_period * p.saw_amp - p.saw_amp / 2


def kv_pool(served: np.ndarray, p: Params) -> np.ndarray:
    """The KV caches a worker keeps between turns (edgechat_kv_cache_bytes): filling to its budget."""
    return p.kv_cap * (1 - np.exp(-served / p.kv_fill))


def worker_memory(age: np.ndarray, served: np.ndarray, now: np.ndarray, p: Params, phase: float,
                  rng: np.random.Generator) -> np.ndarray:
    """One worker's memory (RAM + what it has swapped) `age` s after it started, having served
    `served` requests, `now` requests in this step: load, warm-up peak, then the steady shape. A turn
    runs at a scrape as often as the worker is busy (one turn at a time per model)."""
    busy = rng.random(len(age)) < np.minimum(1.0, now * p.turn_s / STEP)
    steady = (p.base + kv_pool(served, p) + p.frag_cap * (1 - np.exp(-served / p.frag_fill))
              + sawtooth(age, p, phase) + p.inflight * busy + rng.normal(0, 2 * MiB, len(age)))
    return np.select([age < 30, age < 60, age < 120], [350 * MiB, 0.7 * p.base, p.base + 0.25 * 2 ** 30], steady)


def rolling_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Sum over the last `window` steps, this one included."""
    c = np.cumsum(x, dtype=float)
    out = c.copy()
    out[window:] -= c[:-window]
    return out


def rolling_max(x: np.ndarray, window: int) -> np.ndarray:
    """Maximum over the last `window` steps (a sliding window; the first steps see a shorter one)."""
    padded = np.concatenate([np.zeros(window - 1, dtype=x.dtype), x])
    return np.lib.stride_tricks.sliding_window_view(padded, window).max(axis=1)


def history(requests: np.ndarray, p: Params, trims: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sessions, total messages and the longest conversation of one daemon life, from its requests.

    A conversation of g turns (geometric, mean conv_turns) holds 1 + 2 * min(g, max_turns) messages
    (the system prompt, then a user and an assistant message a turn) until it has been idle for the
    TTL; without a TTL, sessions pile up to max_sessions. `trims=False` is the history bug.
    """
    q = 1 / p.conv_turns
    arrivals = rng.binomial(requests.astype(np.int64), q)
    draws = np.maximum(arrivals, 1)
    longest = np.where(arrivals > 0, np.ceil(np.log1p(-rng.random(len(requests)) ** (1 / draws)) / np.log1p(-q)), 0)
    cap = p.max_turns if trims else np.inf
    if p.ttl > 0:
        window = max(1, int((p.conv_turns * 60 + p.ttl) // STEP))
        sessions = rolling_sum(arrivals, window)
        alive_longest = rolling_max(longest, window)
    else:
        sessions = np.minimum(np.cumsum(arrivals), p.max_sessions)
        alive_longest = np.maximum.accumulate(longest)
    mean_turns = (1 - (1 - q) ** cap) / q if trims else p.conv_turns   # E[min(g, cap)]
    total = np.round(sessions * (1 + 2 * mean_turns))
    longest_msgs = np.where(sessions > 0, 1 + 2 * np.minimum(np.maximum(alive_longest, 1), cap), 0)
    return {"sessions": sessions, "total": total, "max": longest_msgs, "arrivals": arrivals}


# -- leaks ------------------------------------------------------------------------------------------
# Each leak shape: how it grows (what it is proportional to), where the kernel keeps it, and the span
# of times from its start to the limit it is drawn with (seconds; log-uniform). A leak holds its
# bytes until the process that holds them restarts.

@dataclasses.dataclass(frozen=True)
class LeakShape:
    name: str
    driver: str                # requests | tokens | sessions | time | steps | turns
    to_limit: tuple[float, float]
    where: str = "ram"         # ram | swap (swapped out as it is made: RAM stays flat)
    recycled: bool = False     # workers recycle (max_requests) before it reaches the limit
    at_boot: float = 0.4       # share of traces whose leak starts with the process (a leaky deploy)
    about: str = ""


LEAKS = {s.name: s for s in (
    LeakShape("per_request", "requests", (6 * HOUR, 14 * DAY), about="a few KB to MB kept per request: flat at night"),
    LeakShape("per_token", "tokens", (6 * HOUR, 14 * DAY), about="bytes kept per generated token"),
    LeakShape("per_session", "sessions", (6 * HOUR, 14 * DAY), about="bytes kept per new conversation"),
    LeakShape("slow", "time", (7 * DAY, 14 * DAY), about="a background thread's cache: steady, day and night"),
    LeakShape("hours", "requests", (1 * HOUR, 6 * HOUR), about="per request, limit within hours"),
    LeakShape("fast", "requests", (20 * MINUTE, 1 * HOUR), at_boot=0.0, about="per request, limit within the hour"),
    LeakShape("step", "steps", (6 * HOUR, 7 * DAY), about="a buffer of 50-200 MB kept now and then"),
    LeakShape("swap_hidden", "requests", (6 * HOUR, 7 * DAY), where="swap", about="leaked pages swapped out at once"),
    LeakShape("recycled", "requests", (12 * HOUR, 3 * DAY), recycled=True,
              about="per request, but max_requests recycles each worker before it gets far"),
    LeakShape("tensors", "turns", (30 * MINUTE, 6 * HOUR), at_boot=0.0,
              about="generation outputs kept alive: tens of MB a turn, from a busy hour"),
    LeakShape("history", "history", (0, 0), about="the history bug: conversations never trimmed"),
)}


def leak_bytes(shape: LeakShape, driver: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Bytes held since the leak began, per step, from its driver's per-step counts (zero before it began)."""
    if shape.driver == "steps":
        # `driver` holds the chance of a new buffer in each step
        kept = rng.random(len(driver)) < driver
        return np.cumsum(kept * rng.uniform(0.5, 2.0, len(driver)) * size)
    return np.cumsum(driver * size)


__all__ = ["DAY", "FILE_BACKED", "HOUR", "LEAKS", "MASTER", "MINUTE", "LeakShape", "Params", "draw_params",
           "expected_requests", "history", "kv_pool", "leak_bytes", "rolling_max", "rolling_sum", "worker_memory"]
