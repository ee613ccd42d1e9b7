"""Simulated edgechat devices: the daemon's own metric families (telemetry.metrics) with healthy or leaking values.

One light process serves many devices, each on its own loopback port, so a fleet of 50 fits a small
box. Time runs `time_scale` times faster than nominal, like the rules rendered for the fleet: a
6 MB/min leak at time scale 0.02 grows 5 MB per real second.

  python -m daemon.fleet.simdevice SPEC.json [PORTS.json]

SPEC is a JSON list of DeviceSpec fields; a port of 0 lets the kernel choose, and the port each device
got is written to PORTS.json ({name: port}) once all of them listen.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest

from ..telemetry.labels import turn_index_bucket
from ..telemetry.metrics import Metrics

MiB, GiB = 2 ** 20, 2 ** 30
# healthy: flat; leak_request: +3 MB per request (a llama.cpp field report); leak_token: the same per
# token; swap_hidden: the leak goes straight to swap (RSS flat); restarting: a worker restart every
# RESTART_EVERY_S nominal; silent: healthy until the harness silences it (POST /-/silence).
SHAPES = ("healthy", "leak_request", "leak_token", "swap_hidden", "restarting", "silent")
LEAKING_SHAPES = ("leak_request", "leak_token", "swap_hidden")
LIMIT = 2 * GiB
FILE_BACKED = 120 * MiB          # RSS that is not anonymous: interpreter, libraries, mapped files
REQUESTS_PER_MIN = 2.0           # nominal traffic of a kiosk: one conversation turn every 30 s
TOKENS_PER_REQUEST = 40
LEAK_PER_REQUEST = 3 * MiB       # 6 MB/min at 2 requests/min: OOM within ~2.5 h from 1.1 GB of 2 GB
LEAK_PER_TOKEN = LEAK_PER_REQUEST / TOKENS_PER_REQUEST
RESTART_EVERY_S = 35 * 60        # nominal: under the crash-loop rule's 3 restarts an hour
OOM_RATIO = 0.97                 # RAM + swap at which a leaking device is OOM-killed and restarts
UPTIME_BEFORE_S = 3600           # real seconds the device pretends to have been up at the start


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: its identity, shape and clock."""

    name: str
    port: int                    # 0: any free port (reported in the ports file)
    shape: str
    version: str
    model: str = "sim-0.5b"
    time_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")


class SimDevice:
    """A device's metrics, advanced to wall-clock time whenever it is scraped."""

    def __init__(self, spec: DeviceSpec, now: float | None = None):
        self.spec = spec
        rng = random.Random(spec.seed)
        self.base = 1.1 * GiB + rng.uniform(-60, 60) * MiB
        self.phase = rng.uniform(0, 420)
        self.restarts = 0
        self._lock = threading.Lock()
        self._boot(time.time() if now is None else now, first=True)

    def _boot(self, t: float, first: bool = False) -> None:
        """A (re)start: fresh metrics (counters from zero), a new start time."""
        self.started = t
        self.requests = 0
        m = self.metrics = Metrics(CollectorRegistry(), multiprocess=False)
        m.build_info.clear()
        m.build_info.labels(self.spec.version, platform.python_version(), "none", "none").set(1)
        m.model_info.labels(self.spec.model, "bfloat16", "native", "one-call", "packaged", "off").set(1)
        m.memory_limit_bytes.set(LIMIT)
        m.host_memory_total_bytes.set(LIMIT)
        m.history_max_turns.set(5)
        m.process_start_time_seconds.set(t - UPTIME_BEFORE_S if first else t)
        m.model_load_seconds.set(40.0)

    def _nominal(self, now: float) -> float:
        return (now - self.started) / self.spec.time_scale

    def _memory(self, nominal_s: float) -> tuple[float, float]:
        """(RAM, swap) bytes now."""
        sawtooth = ((nominal_s + self.phase) % 420) / 420 * 60 * MiB - 30 * MiB
        shape, ram, swap = self.spec.shape, self.base + sawtooth, 0.0
        if shape == "leak_request":
            ram += LEAK_PER_REQUEST * self.requests
        elif shape == "leak_token":
            ram += LEAK_PER_TOKEN * self.requests * TOKENS_PER_REQUEST
        elif shape == "swap_hidden":
            ram += 100 * MiB
            swap = LEAK_PER_REQUEST * self.requests
        return ram, swap

    def _turn(self, index: int, rng: random.Random) -> None:
        m = self.metrics
        seconds = rng.uniform(1.2, 2.4)
        m.turns_total.labels("ok").inc()
        m.turn_duration_seconds.labels(turn_index_bucket(index)).observe(seconds)
        m.time_to_first_token_seconds.observe(seconds * 0.2)
        m.time_per_output_token_seconds.observe(seconds * 0.8 / TOKENS_PER_REQUEST)
        m.queue_wait_seconds.observe(0.002)
        m.prompt_tokens_total.inc(120 + 30 * min(index, 5))
        m.completion_tokens_total.inc(TOKENS_PER_REQUEST)
        m.turn_history_messages.observe(1 + 2 * min(index - 1, 5))
        m.turn_prompt_tokens.observe(120 + 30 * min(index, 5))
        m.http_requests_total.labels("/v1/sessions/<id>/messages", "POST", "200").inc()
        m.http_request_duration_seconds.labels("/v1/sessions/<id>/messages").observe(seconds)

    def refresh(self, now: float) -> None:
        """Advance traffic, memory and restarts to `now`."""
        shape = self.spec.shape
        if shape == "restarting" and self._nominal(now) >= RESTART_EVERY_S:
            self.restarts += 1
            self._boot(now)
        due = int(self._nominal(now) / 60 * REQUESTS_PER_MIN)
        rng = random.Random(self.spec.seed * 1_000_003 + self.restarts * 7919 + self.requests)
        while self.requests < due:
            self.requests += 1
            self._turn(1 + (self.requests - 1) % 8, rng)
        ram, swap = self._memory(self._nominal(now))
        if shape in LEAKING_SHAPES and ram + swap >= OOM_RATIO * LIMIT:  # the kernel OOM-kills the daemon
            self.restarts += 1
            self._boot(now)
            ram, swap = self._memory(0)
        m = self.metrics
        m.process_resident_memory_bytes.set(ram)
        m.process_anonymous_memory_bytes.set(ram - FILE_BACKED)
        m.process_swap_bytes.set(swap)
        m.process_unique_memory_bytes.set(ram * 0.8)
        m.process_virtual_memory_bytes.set(ram * 3)
        m.process_open_fds.set(24)
        m.process_threads.set(9)
        m.service_memory_bytes.set(ram)
        m.service_memory_charged_bytes.set(ram + 200 * MiB)
        m.host_memory_available_bytes.set(max(LIMIT - ram, 0))
        m.sessions.set(3)
        m.history_messages.set(3 * 11)
        m.history_messages_max.set(11 if self.requests >= 5 else 1 + 2 * self.requests)
        m.history_tokens_max.set(420)
        # what the daemon's object census reports (at most every 2 min there)
        for kind, count in (("torch.Tensor", 310), ("dict", 52_000), ("list", 21_000), ("function", 48_000)):
            m.live_objects.labels(kind).set(count)
        m.torch_tensor_bytes.set(self.base * 0.8)

    def exposition(self) -> bytes:
        """The /metrics body, as fresh as a real daemon's (its sampler refreshes before a scrape)."""
        with self._lock:
            self.refresh(time.time())
            self.metrics.http_requests_total.labels("/metrics", "GET", "200").inc()
            return generate_latest(self.metrics.registry)


def serve(device: SimDevice) -> ThreadingHTTPServer:
    """Serve one device's /metrics on 127.0.0.1:port in a thread; POST /-/silence stops it for good."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = device.exposition()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/-/silence":
                self.send_error(404)
                return
            self.send_response(204)
            self.end_headers()
            threading.Thread(target=server.shutdown, daemon=True).start()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", device.spec.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"sim-{device.spec.name}", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    """Serve every device of a spec file until SIGTERM."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m daemon.fleet.simdevice SPEC.json [PORTS.json]", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        specs = [DeviceSpec(**item) for item in json.load(handle)]
    disable_created_metrics()  # as the daemon's multiprocess exposition: no *_created series
    servers = [serve(SimDevice(spec)) for spec in specs]
    if len(argv) == 2:
        ports = {spec.name: server.server_address[1] for spec, server in zip(specs, servers)}
        with open(argv[1] + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(ports, handle)
        os.replace(argv[1] + ".tmp", argv[1])
    print(f"serving {len(servers)} simulated devices", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    for server in servers:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
