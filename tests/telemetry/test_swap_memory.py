"""Anonymous RSS and swap per worker: read from /proc/PID/status, exported by the sampler, moved by a leak."""
from __future__ import annotations

import os
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.telemetry import process
from daemon.telemetry.metrics import Metrics
from daemon.telemetry.sampler import Sampler

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
MiB = 2 ** 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        [line] = [line for line in handle if line.startswith(field + ":")]
    return int(line.split()[1])


def _gauge(metrics: Metrics, name: str) -> float:
    text = generate_latest(metrics.registry).decode()
    [value] = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return value


def test_reads_rssanon_and_vmswap_of_a_process():
    anon, swap = process.anon_swap_bytes(os.getpid())
    # the kernel's own figures, read around the call (the test's allocations move RssAnon a little)
    assert abs(anon - _status_kb("RssAnon") * 1024) < 8 * MiB
    assert swap == _status_kb("VmSwap") * 1024
    assert 0 < anon <= process.rss_of(os.getpid())


def test_gone_process_reads_none():
    assert process.anon_swap_bytes(2 ** 22 + 12345) is None


def test_sampler_exports_anonymous_memory_and_swap_and_a_leak_moves_them():
    metrics = Metrics(CollectorRegistry())
    sampler = Sampler(metrics)
    try:
        sampler.refresh()
        before = _gauge(metrics, "edgechat_process_anonymous_memory_bytes")
        assert _gauge(metrics, "edgechat_process_swap_bytes") >= 0
        held = bytearray(64 * MiB)  # touched pages: anonymous memory, as a leak would hold
        for i in range(0, len(held), 4096):
            held[i] = 1
        sampler.refresh()
        grown = _gauge(metrics, "edgechat_process_anonymous_memory_bytes") - before
        assert grown >= 56 * MiB, f"anonymous memory grew {grown / MiB:.1f} MiB for 64 MiB held"
        del held
    finally:
        sampler.close()
