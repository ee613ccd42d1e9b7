"""Builds the compiled decode kernels into the package (setup.cfg declares everything else).

`pip install .` and `pip wheel .` compile daemon/model/kernels/step.cpp with kernels/build.py's command
into daemon/model/kernels/libedgechat_kernels.so, so a wheel install needs no compiler at run time.
The library uses no Python API: the wheel is tagged py3-none-<platform>, one wheel for every Python 3.
An editable install builds nothing here: the daemon builds the kernels at first start, keyed by a hash
of the sources, so an edit is never hidden by a stale build.

No C++ compiler at build time is an error that says what to install; EDGECHAT_BUILD_KERNELS=0 builds a
pure wheel without the kernels instead (the daemon then decodes on torch's kernels, logs it, and
EdgechatDecodeSlowPath fires).
"""
import importlib.util
import os

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join("daemon", "model", "kernels")
_spec = importlib.util.spec_from_file_location("edgechat_kernels_build", os.path.join(HERE, KERNELS, "build.py"))
kernels_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels_build)


def with_kernels() -> bool:
    """Whether this build compiles the kernels (EDGECHAT_BUILD_KERNELS=0 opts out)."""
    value = os.environ.get("EDGECHAT_BUILD_KERNELS", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes"):
        raise SystemExit(f"EDGECHAT_BUILD_KERNELS must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes")


class BuildPy(build_py):
    """The package's Python files and data, then the kernels library beside their sources."""

    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable checkout builds them at first start, from the sources it holds
        if not with_kernels():
            self.announce("EDGECHAT_BUILD_KERNELS=0: no compiled decode kernels in this build; the daemon "
                          "will decode on torch's kernels (about half the speed)", level=3)
            return
        cxx = kernels_build.compiler()
        if cxx is None:
            raise SystemExit(
                "edgechat: no C++ compiler found to build the decode kernels (tried $CXX, g++, c++, clang++).\n"
                "Install one (Debian/Ubuntu: apt-get install g++) and build again; the installed daemon then "
                "needs no compiler.\nOr set EDGECHAT_BUILD_KERNELS=0 to build without them: decode then runs on "
                "torch's kernels at about half the speed.")
        out = os.path.join(self.build_lib, KERNELS, kernels_build.LIBRARY)
        self.announce(" ".join(kernels_build.command(cxx, out)), level=3)
        kernels_build.compile_library(out, cxx, folder=os.path.join(HERE, KERNELS))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode and with_kernels():
            outputs.append(os.path.join(self.build_lib, KERNELS, kernels_build.LIBRARY))
        return outputs


class PlatformDistribution(Distribution):
    """A distribution with a compiled library: installed into platlib, its wheel platform-specific."""

    def has_ext_modules(self):
        return with_kernels()


class BdistWheel(bdist_wheel):
    """py3-none-<platform> with the kernels (no Python ABI in them), py3-none-any without."""

    def get_tag(self):
        python, abi, plat = super().get_tag()
        return ("py3", "none", plat) if not self.root_is_pure else (python, abi, plat)


setup(distclass=PlatformDistribution, cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel})
