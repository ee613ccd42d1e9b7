"""One frozen, validated configuration, built once from env vars (EDGECHAT_*) and CLI flags."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

ENV_PREFIX = "EDGECHAT_"
DTYPES = ("auto", "float32", "bfloat16")
LEAK_MODES = ("off", "history", "tensors")
QUANTIZE = ("none", "int8", "int4", "auto")
KERNELS = ("auto", "native", "onednn", "plain")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
SESSION_STORE_PREFIXES = ("memory", "sqlite:///", "redis://", "rediss://", "unix://")
# (title, first setting) of each group of settings, in field order: --help groups flags by these
SECTIONS = (("model", "model"), ("server", "host"), ("history policy", "max_history_turns"),
            ("generation", "max_new_tokens"), ("per-turn memory hygiene", "gc_after_turn"),
            ("security", "api_keys"), ("observability", "metrics_path"))


def _xdg(var: str, fallback: str) -> str:
    """Return the XDG base folder for edgechat, honouring the variable when set."""
    base = os.environ.get(var) or os.path.expanduser(fallback)
    return os.path.join(base, "edgechat")


def instance_metrics_dir(state_dir: str) -> str:
    """The metrics folder of the daemon whose state folder this is: one per instance, so two daemons
    on one host never share (and wipe) each other's files. Under $XDG_RUNTIME_DIR (a tmpfs: no
    writes to an SD card) keyed by the state folder's path, else inside the state folder."""
    state = os.path.abspath(os.path.expanduser(state_dir))
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        key = hashlib.sha256(state.encode()).hexdigest()[:12]
        return os.path.join(run, "edgechat", f"metrics-{key}")
    return os.path.join(state, "metrics")


def _opt(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None,
         choices: tuple | None = None, secret: bool = False):
    """A dataclass field carrying its documentation (used by --help, the README table and env example).

    choices: the allowed values (validated, and offered by --help); secret: also readable from the
    file named by the `<name>_file` setting or systemd's $CREDENTIALS_DIRECTORY, never handed to
    workers through their environment.
    """
    meta = {"help": help, "choices": choices, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Every setting of the daemon; field `x` is env var EDGECHAT_X and flag --x (flags win)."""

    # --- model -----------------------------------------------------------------------------
    model: str = _opt("Qwen/Qwen2.5-0.5B-Instruct",
                      help="Hub id, local folder, or builtin:tiny / builtin:qwen2.5-0.5b-shape.")
    served_model_name: str = _opt("", help="The model's name in the API (/v1/models, the `model` "
                                          "field, the edgechat_model_info label); empty = `model`, "
                                          "or a local folder's own name rather than its path.")
    dtype: str = _opt("auto", choices=DTYPES, help="auto | float32 | bfloat16; auto = the faster of the "
                                                   "checkpoint's bfloat16 and float32 on this CPU (timed at "
                                                   "first start, cached; float32 only where it fits the "
                                                   "memory budget).")
    threads: int = _opt(0, help="torch intra-op threads per worker; 0 = physical cores.")
    quantize: str = _opt("none", choices=QUANTIZE, help="none | int8 | int4 | auto: weight-only int8 rows or "
                                                        "int4 groups of 32 (half / under a third of bfloat16's "
                                                        "weight bytes; Qwen2/Llama-family models only); auto = "
                                                        "the fastest of all, timed at first start.")
    kernel: str = _opt("auto", choices=KERNELS, help="auto | native | onednn | plain: how decode runs the "
                                                     "projections (native = edgechat's compiled GEMV, shipped "
                                                     "in the wheel, built at first start in an editable "
                                                     "checkout; auto = the fastest, timed at first start and "
                                                     "cached).")
    warmup: bool = _opt(True, help="Run a short generation before /readyz turns ready.")
    # --- server ----------------------------------------------------------------------------
    host: str = _opt("127.0.0.1", help="Address to listen on.")
    port: int = _opt(8000, help="TCP port to listen on.")
    workers: int = _opt(1, help="gunicorn worker processes; each holds one copy of the model.")
    worker_threads: int = _opt(4, help="Request threads per worker beyond those the batch and its waiting line "
                                       "take (probes, /metrics, sessions).")
    graceful_timeout_s: float = _opt(60.0, help="Seconds in-flight turns get to finish after SIGTERM.")
    max_requests: int = _opt(0, help="Recycle a worker after this many requests (a leak safety "
                                     "valve); 0 = never.")
    max_requests_jitter: int = _opt(0, help="Random extra requests before recycling, so workers "
                                            "do not restart together.")
    state_dir: str = _opt(help="Folder for durable state (sessions).",
                          factory=lambda: _xdg("XDG_STATE_HOME", "~/.local/state"))
    cache_dir: str = _opt(help="Folder for built-in models and other caches.",
                          factory=lambda: _xdg("XDG_CACHE_HOME", "~/.cache"))
    cors_origins: tuple = _opt((), help="Comma-separated origins a browser app may call the API from "
                                        "(CORS), or * for any; empty = no CORS headers.")
    # --- history policy --------------------------------------------------------------------
    max_history_turns: int = _opt(5, help="User+assistant turns kept per session; 0 = unbounded.")
    max_history_tokens: int = _opt(0, help="Prompt token budget (system + history + new message); "
                                           "0 = model context minus max_new_tokens.")
    session_ttl_s: float = _opt(600.0, help="Idle seconds before a session expires; 0 = never.")
    max_sessions: int = _opt(1000, help="Sessions kept; beyond, the least recently active session of "
                                        "the key holding the most is evicted.")
    max_sessions_per_key: int = _opt(0, help="Sessions one API key may hold; at it, that key's own "
                                             "least recently active one is evicted. 0 = max_sessions.")
    history_trim_to: float = _opt(0.5, help="Over a history limit, cut to this share of it at once, so "
                                            "the kept prefix (and its KV cache) lasts several turns; "
                                            "1 = drop only what must go. Needs kv_cache_bytes.")
    session_store: str = _opt("", help="Where sessions live, shared by all workers: "
                                       "sqlite:///abs/path.db or redis://host:port/db; empty = the "
                                       "SQLite file sessions.db in state_dir; memory = per worker, "
                                       "lost at restart (tests).")
    # --- generation ------------------------------------------------------------------------
    max_new_tokens: int = _opt(512, help="Cap on generated tokens per turn (requests may ask less).")
    min_new_tokens: int = _opt(0, help="Suppress end-of-text before this many tokens (testing aid).")
    generation_timeout_s: float = _opt(120.0, help="Per-request generation deadline; the reply ends "
                                                   "with finish_reason=length.")
    max_batch: int = _opt(8, help="Generations decoded together per worker (continuous batching: each step "
                                  "reads the weights once for all of them); a generation joins only when its "
                                  "KV cache fits kv_cache_bytes beside the others'. 1 = one at a time.")
    prefill_chunk: int = _opt(64, help="Prompt tokens one step prefills beside running generations: more "
                                       "answers a new prompt sooner, fewer keeps the others streaming evenly.")
    queue_limit: int = _opt(4, help="Requests that may wait for a place in the batch; more get 503.")
    queue_timeout_s: float = _opt(30.0, help="Seconds a request waits for a place in the batch before 503.")
    max_body_bytes: int = _opt(1_048_576, help="Largest accepted request body; larger gets 413.")
    request_read_timeout_s: float = _opt(10.0, help="Seconds a client has to send a request's head; "
                                                    "its body gets as long again plus its size at "
                                                    "request_read_min_rate. Later gets 408.")
    request_read_min_rate: int = _opt(65_536, help="Bytes/s a request body must arrive at, at least "
                                                   "(see request_read_timeout_s).")
    kv_cache_bytes: int = _opt(134_217_728, help="Per-worker budget for KV caches: running generations' "
                                                 "(reserved whole when they join the batch) and those kept "
                                                 "between turns (a turn then prefills only its new tokens; "
                                                 "LRU, dropped first). 0 = none kept, one generation at a "
                                                 "time.")
    # --- per-turn memory hygiene -----------------------------------------------------------
    gc_after_turn: bool = _opt(False, help="Run gc.collect() after every turn (see docs/memory.md).")
    malloc_trim_after_turn: bool = _opt(True, help="Call glibc malloc_trim(0) after every turn to "
                                                   "return freed heap to the OS.")
    # --- security --------------------------------------------------------------------------
    api_keys: tuple = _opt((), secret=True, help="Comma-separated bearer keys for /v1, /tokenize and "
                                                 "/detokenize; empty = open.")
    api_keys_file: str = _opt("", help="File holding api_keys (comma- or line-separated); default: "
                                       "$CREDENTIALS_DIRECTORY/api_keys when systemd provides it.")
    admin_key: str = _opt("", secret=True, help="Bearer key for the /debug/memory admin endpoints; "
                                                "empty = those endpoints do not exist.")
    admin_key_file: str = _opt("", help="File holding admin_key; default: "
                                        "$CREDENTIALS_DIRECTORY/admin_key when systemd provides it.")
    metrics_key: str = _opt("", secret=True, help="Bearer key Prometheus must send to metrics_path; "
                                                  "empty = open (cannot be combined with metrics_port, "
                                                  "which has no auth).")
    metrics_key_file: str = _opt("", help="File holding metrics_key; default: "
                                          "$CREDENTIALS_DIRECTORY/metrics_key when systemd provides it.")
    max_turns_in_flight_per_key: int = _opt(0, help="Turns (running or waiting) one API key may have "
                                                    "per worker; more get 429. 0 = half of what the "
                                                    "model takes (max_batch + queue_limit, rounded up) "
                                                    "when api_keys "
                                                    "is set, else no limit. Without api_keys, limits "
                                                    "apply per client address.")
    max_requests_per_minute_per_key: int = _opt(0, help="/v1 requests one API key may make per "
                                                        "minute per worker; more get 429. 0 = no limit.")
    # --- observability ---------------------------------------------------------------------
    metrics_path: str = _opt("/metrics", help="Path of the Prometheus endpoint.")
    metrics_port: int = _opt(0, help="Serve /metrics on this separate port too; 0 = main port only.")
    metrics_dir: str = _opt("", help="prometheus_client multiprocess folder, one per daemon (wiped at "
                                     "start; a daemon finding it held by another running one refuses "
                                     "to start); empty = $XDG_RUNTIME_DIR/edgechat/metrics-<hash of "
                                     "state_dir>, else state_dir/metrics.")
    metrics_refresh_s: float = _opt(5.0, help="Seconds between refreshes of per-worker memory/GC gauges.")
    memory_limit_bytes: int = _opt(0, help="Memory budget; 0 = cgroup limit if set, else host total.")
    tracemalloc: bool = _opt(False, help="Trace Python allocations (costs memory and time).")
    tracemalloc_frames: int = _opt(1, help="Frames kept per traced allocation (1..100); more show who "
                                           "called (group_by=traceback) at more cost.")
    memory_watchdog: bool = _opt(True, help="Free memory above the soft limit and refuse new turns "
                                            "above the hard limit (see docs/runbooks.md).")
    memory_soft_limit_ratio: float = _opt(0.85, help="Share of the memory limit above which the "
                                                     "watchdog frees caches and idle sessions.")
    memory_hard_limit_ratio: float = _opt(0.95, help="Share of the memory limit above which new turns "
                                                     "get 503 and /readyz fails.")
    leak_mode: str = _opt("off", choices=LEAK_MODES, help="off | history | tensors: deliberately leak, for demos and tests.")
    log_level: str = _opt("INFO", choices=LOG_LEVELS, help="DEBUG | INFO | WARNING | ERROR.")
    log_format: str = _opt("text", choices=LOG_FORMATS, help="text | json: one JSON object per line "
                                                            "for every line, gunicorn's included.")
    access_log: bool = _opt(False, help="One log line per HTTP request (gunicorn's access log, with "
                                        "the request id).")

    def __post_init__(self) -> None:
        """Read secrets from their files; reject invalid values at startup, naming the setting."""
        for f in dataclasses.fields(self):
            if f.metadata["choices"]:
                _choice(self, f.name, f.metadata["choices"])
            if f.metadata["secret"]:
                _read_secret(self, f)
        for name in ("threads", "max_history_turns", "max_history_tokens", "max_sessions",
                     "min_new_tokens", "queue_limit", "memory_limit_bytes", "max_requests",
                     "max_requests_jitter", "kv_cache_bytes", "max_sessions_per_key",
                     "max_turns_in_flight_per_key", "max_requests_per_minute_per_key"):
            _at_least(self, name, 0)
        for name in ("workers", "worker_threads", "max_new_tokens", "max_body_bytes",
                     "request_read_min_rate", "max_batch", "prefill_chunk"):
            _at_least(self, name, 1)
        for name in ("session_ttl_s",):
            _at_least(self, name, 0)
        if not 0 < self.history_trim_to <= 1:
            raise ValueError(f"history_trim_to must be in (0, 1], got {self.history_trim_to!r}")
        for name in ("generation_timeout_s", "queue_timeout_s", "graceful_timeout_s",
                     "metrics_refresh_s", "request_read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if not self.metrics_dir:
            object.__setattr__(self, "metrics_dir", instance_metrics_dir(self.state_dir))
        if not self.metrics_path.startswith("/"):
            raise ValueError(f"metrics_path must start with '/', got {self.metrics_path!r}")
        if not self.model:
            raise ValueError("model must not be empty (try --model builtin:tiny)")
        if any(not k or any(c.isspace() for c in k) for k in self.api_keys):
            raise ValueError("api_keys must be non-empty keys without spaces, comma-separated")
        if self.session_store and not (self.session_store == "memory" or self.session_store.startswith(
                SESSION_STORE_PREFIXES[1:])):
            scheme = self.session_store.partition(":")[0] if ":" in self.session_store else ""
            # never echo the value: a Redis URL may carry a password
            raise ValueError(f"session_store must be memory, sqlite:///abs/path.db or "
                             f"redis://host:port/db; got scheme {scheme!r}")
        for name in ("admin_key", "metrics_key"):
            if any(c.isspace() or not c.isprintable() for c in getattr(self, name)):
                raise ValueError(f"{name} must not contain spaces or control characters")
        if self.metrics_key and self.metrics_port:
            raise ValueError("metrics_key guards metrics_path only: metrics_port would serve the same "
                             "metrics without it; set one of the two")
        if not 1 <= self.tracemalloc_frames <= 100:
            raise ValueError(f"tracemalloc_frames must be 1..100, got {self.tracemalloc_frames!r}")
        if not 0 < self.memory_soft_limit_ratio < self.memory_hard_limit_ratio:
            raise ValueError(f"memory_soft_limit_ratio must be > 0 and below memory_hard_limit_ratio "
                             f"({self.memory_hard_limit_ratio!r}), got {self.memory_soft_limit_ratio!r}")
        if not self.memory_hard_limit_ratio <= 1:
            raise ValueError(f"memory_hard_limit_ratio must be <= 1, got {self.memory_hard_limit_ratio!r}")

    @property
    def served_name(self) -> str:
        """The model's name in the API: served_model_name, else `model` (a folder's own name)."""
        if self.served_model_name:
            return self.served_model_name
        if os.path.isdir(self.model) or self.model.startswith(("/", ".", "~")):
            return os.path.basename(os.path.normpath(self.model))
        return self.model

    def turns_in_flight_per_key(self) -> int:
        """The effective per-key limit on turns in flight (0 = none); see max_turns_in_flight_per_key."""
        if self.max_turns_in_flight_per_key or not self.api_keys:
            return self.max_turns_in_flight_per_key
        return (self.max_batch + self.queue_limit + 1) // 2

    def session_store_url(self) -> str:
        """The session store to open: session_store, else the SQLite file in state_dir."""
        if self.session_store:
            return self.session_store
        return "sqlite://" + os.path.join(os.path.abspath(self.state_dir), "sessions.db")

    def replace(self, **changes: Any) -> "Config":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Build from EDGECHAT_* variables, then apply already-typed overrides (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        credentials = environ.get("CREDENTIALS_DIRECTORY")  # systemd's LoadCredential=
        for name in SECRETS if credentials else ():
            path = os.path.join(credentials, name)
            if not values.get(name) and not values.get(name + "_file") and os.path.isfile(path):
                values[name + "_file"] = path
        return cls(**values)


SECRETS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["secret"])


def _read_secret(cfg: Config, f: dataclasses.Field) -> None:
    """Fill a secret from the file its `<name>_file` setting names (never both)."""
    path = getattr(cfg, f.name + "_file")
    if not path:
        return
    if getattr(cfg, f.name):
        raise ValueError(f"{f.name} and {f.name}_file are both set; keep one")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read().replace("\n", ",")
    except OSError as exc:
        raise ValueError(f"{f.name}_file: cannot read {path}: {exc.strerror}") from None
    value = parse_value(f, raw)
    if not value:
        raise ValueError(f"{f.name}_file: {path} is empty")
    object.__setattr__(cfg, f.name, value.strip(",") if isinstance(value, str) else value)


def _choice(cfg: Config, name: str, allowed: tuple) -> None:
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")


def _at_least(cfg: Config, name: str, low: float) -> None:
    if getattr(cfg, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(cfg, name)!r}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def field_type(f: dataclasses.Field) -> type:
    """The runtime type of a config field (annotations are strings under __future__)."""
    return {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple}[str(f.type)]


def parse_value(f: dataclasses.Field, raw: str) -> Any:
    """Parse one env/flag string for field f; ValueError names the setting."""
    kind = field_type(f)
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected true/false")
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text)
        return text
    except ValueError as exc:
        raise ValueError(f"{f.name}: invalid value {raw!r} ({exc})") from None


def to_env(cfg: Config) -> dict[str, str]:
    """Render a config as EDGECHAT_* variables, secrets left out (their *_file settings stay)."""
    out = {}
    for f in dataclasses.fields(Config):
        if f.metadata["secret"]:  # workers get secrets from memory (fork) or their files, never env
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = ",".join(value)
        out[ENV_PREFIX + f.name.upper()] = str(value)
    return out


def markdown_table() -> str:
    """The README's configuration table, generated from the dataclass."""
    rows = ["| setting | env var / flag | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = "(see meaning)" if f.name != "state_dir" else "`$XDG_STATE_HOME/edgechat`"
            default = {"cache_dir": "`$XDG_CACHE_HOME/edgechat`"}.get(f.name, default)
        else:
            value = f.default
            default = f"`{','.join(value) if isinstance(value, tuple) else value}`"
            if value in ((), ""):
                default = "(empty)"
        rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` / `--{f.name.replace('_', '-')}` "
                    f"| {default} | {f.metadata['help'].replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


def env_example() -> str:
    """deploy/edgechat.env.example: every setting, commented out at its default, with its meaning."""
    lines = ["# edgechat settings (systemd EnvironmentFile=, docker --env-file).",
             "# Every line is commented out at its default; uncomment to change.",
             "# Generated from daemon/config.py: python -m daemon.config env-example", ""]
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = ""
        else:
            default = f.default
            default = ",".join(default) if isinstance(default, tuple) else default
            default = str(default).lower() if isinstance(default, bool) else default
        lines += [f"# {f.metadata['help']}", f"#{ENV_PREFIX}{f.name.upper()}={default}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print({"env-example": env_example, "table": markdown_table}[sys.argv[1]](), end="")
