"""Every bounded label value set, owned here once: metrics pre-create them, producers import them."""
from __future__ import annotations

TURN_INDEX_BUCKETS = ("1", "2-5", "6-10", "11-20", "21+")
OUTCOMES = ("ok", "length", "timeout", "cancelled", "error")
TRUNCATE_REASONS = ("turns", "tokens")
# "quota": a key at max_sessions_per_key lost its own least recently active session
EVICT_REASONS = ("ttl", "lru", "quota", "deleted", "memory_pressure")
# What a session store times (daemon.sessions), one histogram series each.
STORE_OPERATIONS = ("create", "get", "delete", "sweep", "stats", "acquire", "commit", "release",
                    "probe")
# the ones that write: a store failing these while reads work is unwritable, not down
STORE_WRITES = frozenset(("create", "delete", "sweep", "acquire", "commit", "release", "probe"))
# Why a request was refused: by the API, or by the server while reading it (daemon.server.worker).
REJECT_REASONS = ("queue_full", "queue_timeout", "unauthorized", "session_busy", "memory_pressure",
                  "read_timeout", "request_too_large", "malformed_request", "read_busy",
                  "prompt_too_long", "rate_limited", "too_many_in_flight", "session_quota", "shutting_down",
                  "session_gone", "store_unavailable")
# Why a generation had to wait before joining the batch (daemon.model.admission): every place taken, or
# its KV cache did not fit the budget beside the running ones.
ADMISSION_WAIT_REASONS = ("batch_full", "kv_budget")
# What the memory watchdog (daemon.memory.watchdog) does.
PRESSURE_ACTIONS = ("evict_sessions", "release_caches", "gc_collect", "malloc_trim", "refuse_turns",
                    "resume_turns", "shed_generations")
# The object census (daemon.memory.census) exports these types; every other type is summed into "other".
LIVE_OBJECT_TYPES = ("torch.Tensor", "dict", "list", "tuple", "set", "function", "cell", "other")
# Why the KV pool (daemon.model.kvpool) dropped a cache.
KV_DROP_REASONS = ("lru", "oversize", "released", "pressure")
# How decode runs (edgechat_model_info): the whole step in one call to the compiled kernels, or op by op
# (torch's kernels, or the compiled GEMVs one projection at a time).
DECODE_STEPS = ("one-call", "per-op")
# Where this worker's compiled decode kernels came from (daemon.model.kernels.state): shipped in the
# package, built at first start (an editable checkout), asked for but not loadable, or not asked for.
COMPILED_STATES = ("packaged", "built", "unavailable", "off")
OTHER = "other"  # any label value outside the known sets, so cardinality stays bounded


def turn_index_bucket(turn: int) -> str:
    """The bounded turn_index label of a turn's 1-based position in its conversation."""
    if turn <= 1:
        return "1"
    if turn <= 5:
        return "2-5"
    if turn <= 10:
        return "6-10"
    return "11-20" if turn <= 20 else "21+"


def bounded(value: str, allowed: tuple[str, ...]) -> str:
    """value itself when it is in the allowed set, else OTHER."""
    return value if value in allowed else OTHER
