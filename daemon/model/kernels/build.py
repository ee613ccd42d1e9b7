"""How the decode kernels are compiled: one command for `pip install` / `pip wheel` (setup.py, the
library shipped in the wheel) and for an editable checkout's build at first start (into cache_dir).

Standard library only: setup.py loads this file by path, before torch or the daemon can be imported.
The hash of the sources (and flags) is compiled into the library (`edgechat_source_hash()`), so a
library built from other sources is never taken for the one these sources make.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT = "step.cpp"  # the one compiled unit: it includes gemv.cpp, which includes arm.cpp on aarch64
SOURCES = ("step.cpp", "gemv.cpp", "arm.cpp")
LIBRARY = "libedgechat_kernels.so"  # the packaged library's name: no Python ABI tag, it uses no Python API
# No -march: one binary per architecture; each ISA's functions carry their own target attribute and
# are picked at run time. -ffp-contract=off: the compiler may not fuse a scalar a*b+c into an FMA in one
# instantiation of a kernel and not in another (a row's sums must not depend on how many rows run beside
# it). -fopenmp links libgomp.so.1, which resolves to the copy torch already loaded.
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


def compiler(environ: dict | None = None) -> str | None:
    """$CXX, else the first of g++, c++, clang++ on PATH; None when there is none."""
    env = os.environ if environ is None else environ
    path = env.get("PATH", os.defpath)
    return next((c for c in (env.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c, path=path)), None)


def source_hash(folder: str = HERE) -> str | None:
    """The first 16 hex digits of sha256 over the sources and flags; None when a source is missing."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for name in SOURCES:
        try:
            with open(os.path.join(folder, name), "rb") as handle:
                digest.update(name.encode() + b"\0" + handle.read())
        except FileNotFoundError:
            return None
    return digest.hexdigest()[:16]


def command(cxx: str, out: str, folder: str = HERE, digest: str | None = None) -> list[str]:
    """The compiler call that builds the library at `out` from the sources in `folder`."""
    digest = digest or source_hash(folder)
    if digest is None:
        raise FileNotFoundError(f"the kernel sources ({', '.join(SOURCES)}) are not all in {folder}")
    return [cxx, *FLAGS, f'-DEDGECHAT_SOURCE_HASH="{digest}"', "-o", out, os.path.join(folder, UNIT)]


def compile_library(out: str, cxx: str | None = None, folder: str = HERE, timeout: float = 300) -> str:
    """Build the library at `out` (written whole or not at all: two builders at once both end with a
    whole file); the compiler used. FileNotFoundError without a compiler, RuntimeError if it fails."""
    cxx = cxx or compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        done = subprocess.run(command(cxx, tmp, folder), capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-400:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cxx
