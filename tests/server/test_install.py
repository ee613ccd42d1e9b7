"""A wheel install is fast with no compiler: the sdist holds the kernels' sources, `pip wheel` builds the
wheel from it with the compiled kernels inside (py3-none-<platform>, libgomp linked, not bundled), and
the wheel installed into a fresh venv serves builtin:tiny on the one-call compiled step where no
compiler is on PATH. What deploy/Dockerfile's two stages do, without Docker."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import requests

from daemon.model.kernels import build
from support import REPO_ROOT
from support.servers import Daemon

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# what deploy/Dockerfile copies into its builder stage (and Dockerfile.dockerignore lets through)
CONTEXT = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "daemon")
KERNELS = "daemon/model/kernels/"
COMPILERS = ("g++", "gcc", "c++", "cc", "clang", "clang++")


def _pip(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """This venv's pip, offline and without caches, so only what the test built is installed."""
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd,
                          env={**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_NO_INDEX": "1", **(env or {})},
                          capture_output=True, text=True, timeout=240)


def _no_compiler_env(bin_dir) -> dict:
    """The environment with PATH holding only `bin_dir` (no compiler there), and no CXX."""
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC", "PYTHONPATH")}
    env["PATH"] = str(bin_dir)
    assert not [c for c in COMPILERS if shutil.which(c, path=env["PATH"])]
    return env


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> str:
    """The sdist of a copy of the build context (the checkout's own build products left out)."""
    root = tmp_path_factory.mktemp("build")
    src = root / "src"
    src.mkdir()
    for name in CONTEXT:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy(source, src / name)
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(root / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(root / "dist" / done.stdout.split()[-1])


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> str:
    """The wheel pip builds from the sdist (setup.py compiles the kernels with the system compiler)."""
    out = tmp_path_factory.mktemp("wheels")
    done = _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), sdist)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [name] = os.listdir(out)
    return str(out / name)


def test_the_sdist_holds_the_kernel_sources(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {KERNELS + s for s in build.SOURCES} | {"setup.py", "MANIFEST.in", KERNELS + "build.py"} <= names
    assert not [n for n in names if n.endswith(".so")]


def test_the_wheel_ships_the_kernels_for_every_python(wheel):
    machine = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert os.path.basename(wheel) == f"edgechat-0.1.0-py3-none-{machine}.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert "Root-Is-Purelib: false" in whl.read("edgechat-0.1.0.dist-info/WHEEL").decode()
        library = whl.read(KERNELS + build.LIBRARY)
    assert {KERNELS + build.LIBRARY} | {KERNELS + s for s in build.SOURCES} <= names
    assert not [n for n in names if "libgomp" in n or "cpython" in n], "no second libgomp, no ABI tag"
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    extracted = os.path.join(os.path.dirname(wheel), build.LIBRARY)
    with open(extracted, "wb") as handle:
        handle.write(library)
    dynamic = subprocess.run([readelf, "-d", extracted], capture_output=True, text=True, timeout=30).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic))
    assert "libgomp.so.1" in needed, "torch's OpenMP runtime, resolved at load time"
    assert not [n for n in needed if "python" in n], "the library uses no Python API"


def test_the_installed_wheel_decodes_on_the_compiled_step_with_no_compiler(wheel, tmp_path, cache_dir):
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # the test venv's packages (torch, transformers, ...) without a second download: a .pth line adds its
    # site-packages after the new venv's own, whose `daemon` (the wheel's) therefore comes first; the
    # lines of that folder's own .pth files (an editable install of the checkout) are not read
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    with open(os.path.join(purelib, "test-venv.pth"), "w", encoding="utf-8") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    done = _pip("--python", str(python), "install", "--no-deps", wheel)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    env = _no_compiler_env(venv / "bin")
    where = subprocess.run([str(python), "-c", "import daemon; print(daemon.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr

    daemon = Daemon(tmp_path, cache_dir, "--kernel", "native", "--no-warmup", env=env,
                    command=[str(venv / "bin" / "edgechat")])
    with daemon:
        decode = requests.get(daemon.url + "/readyz", timeout=10).json()["decode"]
        assert decode["kernel"] == "native" and decode["step"] == "one-call", decode
        assert decode["compiled"] == "packaged" and decode["isa"], decode
        turn = requests.post(daemon.url + "/v1/chat/completions", timeout=60,
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert turn.status_code == 200 and turn.json()["usage"]["completion_tokens"] > 0
        metrics = requests.get(daemon.url + "/metrics", timeout=10).text
    assert re.search(r'edgechat_model_info\{[^}]*compiled="packaged"[^}]*step="one-call"', metrics) or \
        re.search(r'edgechat_model_info\{[^}]*step="one-call"[^}]*compiled="packaged"', metrics), metrics[-2000:]
    loaded = re.search(r"decode kernels: (\S+) \(packaged, ", daemon.log())
    assert loaded and loaded.group(1) == os.path.join(purelib, KERNELS, build.LIBRARY), daemon.log()[-3000:]


def test_no_compiler_at_build_time_is_a_clear_error_unless_opted_out(sdist, tmp_path):
    env = _no_compiler_env(os.path.dirname(sys.executable))
    failed = _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "a"), sdist, env=env)
    assert failed.returncode != 0
    assert "no C++ compiler found to build the decode kernels" in failed.stdout + failed.stderr
    assert "EDGECHAT_BUILD_KERNELS=0" in failed.stdout + failed.stderr
    pure = _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "b"), sdist,
                env={**env, "EDGECHAT_BUILD_KERNELS": "0"})
    assert pure.returncode == 0, pure.stdout[-2000:] + pure.stderr[-3000:]
    [name] = os.listdir(tmp_path / "b")
    assert name == "edgechat-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / "b" / name) as whl:
        assert KERNELS + build.LIBRARY not in whl.namelist()
