"""The memory budget: which limit counts (config, cgroup, host) and how cgroup v1 and v2 are read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.memory import budget as memory_budget
from daemon.memory.cgroup import CgroupMemory
from daemon.telemetry import process


@pytest.mark.parametrize("config_bytes,cgroup,host,expected", [
    (2 << 30, 1 << 30, 8 << 30, (2 << 30, "config")),
    (0, 1 << 30, 8 << 30, (1 << 30, "cgroup")),
    (0, 64 << 30, 8 << 30, (8 << 30, "cgroup")),      # a limit above the RAM cannot be reached
    (0, 9223372036854771712, 8 << 30, (8 << 30, "host")),  # cgroup v1's "no limit"
    (0, None, 8 << 30, (8 << 30, "host")),
])
def test_memory_limit_precedence(config_bytes, cgroup, host, expected):
    assert memory_budget.memory_limit(config_bytes, cgroup, host) == expected


def _fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> str:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return str(proc)


def test_cgroup_v2_limit_of_the_tightest_ancestor(tmp_path):
    root = tmp_path / "root"
    svc = root / "sys/fs/cgroup/edge.slice/edgechat.service"
    svc.mkdir(parents=True)
    for d, limit, current in ((svc, "max", "700"), (svc.parent, "2000", "900"),
                              (svc.parent.parent, "max", "5000")):
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(current + "\n")
        (d / "memory.stat").write_text("anon 500\ninactive_file 100\n")
    proc = _fake_proc(tmp_path, "0::/edge.slice/edgechat.service\n",
                      "30 23 0:26 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n")
    cg = CgroupMemory.detect(proc, root=str(root))
    assert cg.version == 2 and cg.limit_bytes() == 2000
    assert cg.current_bytes() == 900 and cg.working_set_bytes() == 800
    budget = memory_budget.read_memory(cg, 0, siblings=False)
    # what counts is the working set: inactive page cache is reclaimed before any OOM kill
    assert (budget.limit, budget.limit_source, budget.service, budget.charged) == (
        2000, "cgroup", 800, 900)


def test_cgroup_v1_in_a_hybrid_host(tmp_path):
    root = tmp_path / "root"
    mine = root / "sys/fs/cgroup/memory/docker/abc"
    mine.mkdir(parents=True)
    (root / "sys/fs/cgroup/unified").mkdir(parents=True)  # v2 mounted, without the memory controller
    (mine / "memory.limit_in_bytes").write_text("1073741824\n")
    (mine / "memory.usage_in_bytes").write_text("4096\n")
    (mine / "memory.stat").write_text("cache 10\ntotal_inactive_file 96\n")
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc\n0::/\n",
                      "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
                      "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    cg = CgroupMemory.detect(proc, root=str(root))
    assert cg.version == 1 and cg.limit_bytes() == 1 << 30
    assert cg.current_bytes() == 4096 and cg.working_set_bytes() == 4000
    (mine / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cg.limit_bytes() is None  # v1's "unlimited"


def test_no_cgroup_means_rss_sum(tmp_path):
    proc = _fake_proc(tmp_path, "", "")
    assert CgroupMemory.detect(proc, root=str(tmp_path)) is None
    budget = memory_budget.read_memory(None, 0, siblings=False)
    assert budget.limit_source == "host" and budget.service == process.rss_of(os.getpid()) > 0
