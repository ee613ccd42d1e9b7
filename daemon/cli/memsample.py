"""Memory samples for the client tools (soak, memwatch): by pid with psutil, or from a daemon's /metrics.

Client-side only: stdlib and psutil, never torch or the daemon's server modules, so the tools start fast.
"""
from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, field

MB = 1024 * 1024
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class MemorySample:
    """Memory of a service at one moment: sums over its processes (bytes; uss None when unreadable)."""

    t: float
    rss: int
    uss: int | None
    vms: int
    pids: tuple = ()
    service: int | None = None   # what counts against the limit (edgechat_service_memory_bytes)
    limit: int | None = None     # edgechat_memory_limit_bytes
    extra: dict = field(default_factory=dict)


class SampleError(RuntimeError):
    """The target could not be sampled (process gone, daemon unreachable, metrics missing)."""


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Parse Prometheus text exposition into {name: [(labels, value), ...]} (comments skipped)."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:  # not a sample line we understand; the format allows none here
            continue
        out.setdefault(name, []).append((dict(_LABEL.findall(labels or "")), number))
    return out


def _sum(metrics: dict, name: str) -> float | None:
    series = metrics.get(name)
    return None if not series else sum(v for _, v in series)


def _max(metrics: dict, name: str) -> float | None:
    series = metrics.get(name)
    return None if not series else max(v for _, v in series)


def sample_metrics(url: str, path: str = "/metrics", timeout: float = 10.0) -> MemorySample:
    """Scrape a daemon and sum its workers' memory series (one series per worker `pid`)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as resp:  # noqa: S310
            metrics = parse_metrics(resp.read().decode("utf-8", "replace"))
    except OSError as exc:  # refused, reset, timeout, HTTP error: the caller decides what it means
        raise SampleError(f"cannot scrape {url}{path}: {exc}") from exc
    rss = _sum(metrics, "edgechat_process_resident_memory_bytes")
    if rss is None:
        raise SampleError(f"{url}{path} has no edgechat_process_resident_memory_bytes")
    uss = _sum(metrics, "edgechat_process_unique_memory_bytes")
    vms = _sum(metrics, "edgechat_process_virtual_memory_bytes") or 0
    pids = tuple(sorted({labels.get("pid", "") for labels, _ in
                         metrics.get("edgechat_process_resident_memory_bytes", [])}))
    service, limit = _max(metrics, "edgechat_service_memory_bytes"), _max(metrics, "edgechat_memory_limit_bytes")
    return MemorySample(t=time.time(), rss=int(rss), uss=None if uss is None else int(uss), vms=int(vms),
                        pids=pids, service=None if service is None else int(service),
                        limit=None if limit is None else int(limit))


def sample_pid(pid: int, children: bool = True) -> MemorySample:
    """Sum RSS/USS/VMS over a process and (by default) all its descendants, e.g. a gunicorn master."""
    import psutil  # imported here: `soak` without --pid needs no psutil
    try:
        root = psutil.Process(pid)
        procs = [root] + (root.children(recursive=True) if children else [])
    except psutil.NoSuchProcess as exc:
        raise SampleError(f"no process {pid}") from exc
    rss = vms = 0
    uss: int | None = 0
    pids = []
    for proc in procs:
        try:
            with proc.oneshot():
                info = proc.memory_info()
                rss, vms = rss + info.rss, vms + info.vms
                try:
                    uss = None if uss is None else uss + proc.memory_full_info().uss
                except psutil.AccessDenied:  # smaps of another user's process: report USS unknown
                    uss = None
            pids.append(str(proc.pid))
        except psutil.NoSuchProcess:  # a child exited between listing and reading: skip it
            if proc is root:
                raise SampleError(f"process {pid} exited") from None
    return MemorySample(t=time.time(), rss=rss, uss=uss, vms=vms, pids=tuple(pids), service=rss)


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value units per minute; None under 2 points."""
    n = len(points)
    if n < 2:
        return None
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0
