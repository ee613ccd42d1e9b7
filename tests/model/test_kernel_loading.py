"""Where the compiled kernels come from: the library packaged in the wheel first (when it was built from
the sources beside it), else one built at first start keyed by the sources' hash, else none."""
from __future__ import annotations

import os
import shutil

import pytest

from daemon.model import kernels
from daemon.model.kernels import build


@pytest.fixture
def fresh(monkeypatch):
    """No library loaded yet in this process (as at a worker's start)."""
    monkeypatch.setattr(kernels, "_loaded", {})


def _copy_sources(dest) -> str:
    shutil.copytree(build.HERE, dest, ignore=shutil.ignore_patterns("*.py", "__pycache__", "*.so"))
    return str(dest)


def test_nothing_asked_for_is_off(fresh):
    assert kernels.state() == "off"


def test_the_packaged_library_comes_first_and_needs_no_compiler(fresh, monkeypatch, tmp_path):
    packaged = tmp_path / "site" / build.LIBRARY
    build.compile_library(str(packaged))
    monkeypatch.setattr(kernels, "PACKAGED", str(packaged))
    monkeypatch.setattr(build, "compiler", lambda environ=None: None)
    lines: list[str] = []
    lib = kernels.load(str(tmp_path / "cache"), lines.append)
    assert lib is not None and (lib.source, lib.path) == ("packaged", str(packaged))
    assert lib.digest == build.source_hash()
    assert not (tmp_path / "cache").exists(), "nothing is built when a library is packaged"
    assert kernels.state() == "packaged"
    assert lines == [f"decode kernels: {packaged} (packaged, {lib.label})"]


def test_a_packaged_library_from_other_sources_is_not_used(fresh, monkeypatch, tmp_path):
    """An edit of the sources is never hidden by a library built before it."""
    old = _copy_sources(tmp_path / "old")
    with open(os.path.join(old, "gemv.cpp"), "a", encoding="utf-8") as handle:
        handle.write("\n// before an edit\n")
    stale = os.path.join(old, build.LIBRARY)
    build.compile_library(stale, folder=old)
    monkeypatch.setattr(kernels, "PACKAGED", stale)
    lines: list[str] = []
    lib = kernels.load(str(tmp_path / "cache"), lines.append)
    assert lib is not None and lib.source == "built" and lib.path.startswith(str(tmp_path / "cache"))
    assert lib.digest == build.source_hash() != build.source_hash(old)
    assert any("built from other sources" in line and "not used" in line for line in lines)


def test_first_start_builds_are_keyed_by_the_sources(fresh, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "PACKAGED", str(tmp_path / "none.so"))  # an editable checkout
    cache = str(tmp_path / "cache")
    first = kernels.load(cache)
    built_at = os.stat(first.path).st_mtime_ns
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load(cache).path == first.path and os.stat(first.path).st_mtime_ns == built_at  # reused
    edited = _copy_sources(tmp_path / "edited")
    with open(os.path.join(edited, "step.cpp"), "a", encoding="utf-8") as handle:
        handle.write("\n// an edit\n")
    monkeypatch.setattr(kernels, "SOURCES_DIR", edited)
    monkeypatch.setattr(kernels, "_loaded", {})
    again = kernels.load(cache)
    assert again.path != first.path and again.digest == build.source_hash(edited) != first.digest
    assert kernels.state() == "built"


def test_the_source_hash_covers_every_source_and_the_flags(tmp_path, monkeypatch):
    folder = _copy_sources(tmp_path / "src")
    base = build.source_hash(folder)
    assert base == build.source_hash() and len(base) == 16
    for name in build.SOURCES:
        with open(os.path.join(folder, name), "ab") as handle:
            handle.write(b" ")
        assert build.source_hash(folder) not in (None, base), name
        base = build.source_hash(folder)
    monkeypatch.setattr(build, "FLAGS", (*build.FLAGS, "-g"))
    assert build.source_hash(folder) != base
    os.unlink(os.path.join(folder, build.UNIT))
    assert build.source_hash(folder) is None


@pytest.mark.parametrize("arch,isa,vnni_flag,name,label,dot", [
    ("x86_64", 3, 1, "avx512_bf16", "avx512_bf16+vnni", True),
    ("x86_64", 3, 0, "avx512_bf16", "avx512_bf16", False),
    ("x86_64", 1, 1, "avx2", "avx2", False),
    ("aarch64", 2, 0, "neon_dotprod", "neon_dotprod", True),  # SDOT: the interleaved layouts, no "+vnni"
    ("aarch64", 1, 0, "neon", "neon", False),
])
def test_isa_names_and_the_dot_product_kernels_per_architecture(monkeypatch, arch, isa, vnni_flag, name, label, dot):
    monkeypatch.setattr(kernels, "ARCH", arch)
    monkeypatch.setattr(kernels, "ISA_NAMES", kernels.ISA_LEVELS[arch])
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    chosen = kernels._dot(isa, lambda: vnni_flag)
    lib = kernels.Library(None, isa, "lib.so", vnni=chosen)
    assert (lib.isa_name, lib.label, chosen) == (name, label, dot)
