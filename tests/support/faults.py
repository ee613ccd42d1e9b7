"""Real means of breaking a daemon's dependencies, each started and ended by the test.

- A small tmpfs mounted over a folder (root with CAP_SYS_ADMIN): filled to ENOSPC by a real file,
  remounted read-only. Where mounting is not allowed, `EnospcShim`: a preloaded library, compiled
  here with the system C compiler, that fails write(2) and friends with ENOSPC for files under one
  folder while a flag file exists.
- libfaketime (Debian's `faketime`) with FAKETIME_DONT_FAKE_MONOTONIC=1 and a timestamp file the
  test rewrites to step the wall clock.
- A memory cgroup (v2, else v1) with a limit below the worker's usage: the kernel's OOM killer.
Every helper undoes itself (context managers), also when the test fails.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/faketime/libfaketimeMT.so.1")


@functools.lru_cache(maxsize=None)
def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, outside a locked-down sandbox)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = tempfile.mkdtemp(prefix="edgechat-mount-probe-")
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                            capture_output=True, timeout=10).returncode == 0
        if ok:
            subprocess.run(["umount", probe], capture_output=True, timeout=10, check=True)
        return ok
    finally:
        os.rmdir(probe)


class Tmpfs:
    """A tmpfs of `size` bytes mounted on `path` (created), unmounted (lazily) on exit."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = Path(path), size
        self.filler = self.path / ".filler"

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs",
                        str(self.path)], check=True, capture_output=True, timeout=10)
        return self

    def fill(self) -> int:
        """Write a file until the file system says ENOSPC; returns the bytes it took."""
        written = 0
        with open(self.filler, "ab", buffering=0) as fh:
            block = b"\0" * 4096
            try:
                while True:
                    written += fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return written

    def drain(self) -> None:
        """Remove the filler: the space is back."""
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def read_only(self, on: bool) -> None:
        """Remount read-only (on) or read-write."""
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.path)],
                       check=True, capture_output=True, timeout=10)

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=10)


SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* While $EDGECHAT_FAULT_FLAG exists, writes to files under $EDGECHAT_FAULT_PREFIX fail with the
   errno number the flag file holds (ENOSPC when it holds none). */
static int failing(int fd) {
    const char *prefix = getenv("EDGECHAT_FAULT_PREFIX"), *flag = getenv("EDGECHAT_FAULT_FLAG");
    char link[64], target[4096], code[16] = {0};
    ssize_t n;
    int f;
    if (!prefix || !flag || access(flag, F_OK) != 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return 0;
    target[n] = 0;
    if (strncmp(target, prefix, strlen(prefix)) != 0) return 0;
    f = open(flag, O_RDONLY);
    if (f >= 0) { if (read(f, code, sizeof code - 1) < 0) code[0] = 0; close(f); }
    return atoi(code) > 0 ? atoi(code) : ENOSPC;
}
#define NEXT(name) static __typeof__(name) *next; if (!next) next = dlsym(RTLD_NEXT, #name)
#define FAIL(fd) int e = failing(fd); if (e) { errno = e; return -1; }
ssize_t write(int fd, const void *buf, size_t count) {
    NEXT(write); FAIL(fd) return next(fd, buf, count); }
ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    NEXT(pwrite); FAIL(fd) return next(fd, buf, count, off); }
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    NEXT(pwrite64); FAIL(fd) return next(fd, buf, count, off); }
ssize_t writev(int fd, const struct iovec *iov, int n) {
    NEXT(writev); FAIL(fd) return next(fd, iov, n); }
int posix_fallocate(int fd, off_t off, off_t len) {
    NEXT(posix_fallocate); int e = failing(fd); if (e) return e; return next(fd, off, len); }
int posix_fallocate64(int fd, off_t off, off_t len) {
    NEXT(posix_fallocate64); int e = failing(fd); if (e) return e; return next(fd, off, len); }
int fallocate(int fd, int mode, off_t off, off_t len) {
    NEXT(fallocate); FAIL(fd) return next(fd, mode, off, len); }
int ftruncate(int fd, off_t len) {
    NEXT(ftruncate); FAIL(fd) return next(fd, len); }
"""


class EnospcShim:
    """The preloaded library failing writes under `prefix` (ENOSPC, or another errno such as EROFS:
    a file system the kernel remounted read-only after I/O errors, which a test cannot do to a
    folder with open files): env() for the daemon, on()/off()."""

    def __init__(self, workdir: Path, prefix: Path):
        self.workdir, self.prefix = Path(workdir), Path(prefix)
        self.flag = self.workdir / "enospc.on"
        self.lib = self.workdir / "libenospc.so"

    def build(self) -> "EnospcShim":
        """Compile the shim with the system C compiler (cc)."""
        source = self.workdir / "enospc.c"
        source.write_text(SHIM_C)
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler (cc) to build the ENOSPC shim")
        subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(self.lib), str(source), "-ldl"],
                       check=True, capture_output=True, timeout=120)
        return self

    def env(self) -> dict:
        """What the daemon's environment needs."""
        return {"LD_PRELOAD": str(self.lib), "EDGECHAT_FAULT_PREFIX": str(self.prefix.resolve()),
                "EDGECHAT_FAULT_FLAG": str(self.flag)}

    def on(self, code: int = errno.ENOSPC) -> None:
        """Writes under the prefix fail with errno `code` from now on (EROFS: read-only)."""
        self.flag.write_text(str(code))

    def off(self) -> None:
        """They succeed again."""
        with contextlib.suppress(FileNotFoundError):
            self.flag.unlink()


def faketime_lib() -> str | None:
    """Debian's libfaketime (multi-threaded build), if installed."""
    return next((lib for lib in FAKETIME_LIBS if os.path.exists(lib)), None)


# libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC=1 shifts the deadline of an absolute
# clock_nanosleep on a monotonic clock by the fake offset (EINVAL: Python's time.sleep fails). Loaded
# first, this passes those sleeps straight to the kernel; every other call goes on to libfaketime.
# pthread_cond_timedwait goes straight to glibc too: CPython's condition variables (the GIL's) keep
# monotonic time, and libfaketime's wrapper reads its settings on every call, which made each GIL
# hand-off between the scheduler and a request thread cost milliseconds (a turn ran 40x slower).
MONOTONIC_SLEEP_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const struct timespec *t) {
    static __typeof__(pthread_cond_timedwait) *real;
    if (!real) real = dlvsym(dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD), "pthread_cond_timedwait", "GLIBC_2.3.2");
    return real(c, m, t);
}
int clock_nanosleep(clockid_t clock, int flags, const struct timespec *t, struct timespec *rem) {
    static __typeof__(clock_nanosleep) *next;
    if (clock == CLOCK_MONOTONIC || clock == CLOCK_BOOTTIME || clock == CLOCK_MONOTONIC_RAW)
        return syscall(SYS_clock_nanosleep, clock, flags, t, rem) == 0 ? 0 : errno;
    if (!next) next = dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, t, rem);
}
"""


class SteppedClock:
    """libfaketime for a daemon: the wall clock offset read from a file (again after at most 1 s),
    monotonic clocks left real. step("+2h") / step("-2h") / step("+0") move it while the daemon
    runs, in effect within STEP_S."""

    STEP_S = 1.5

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.file = self.workdir / "faketime.rc"
        self.file.write_text("+0\n")
        self.sleep_lib = self.workdir / "libmonosleep.so"
        source = self.workdir / "monosleep.c"
        source.write_text(MONOTONIC_SLEEP_C)
        subprocess.run([shutil.which("cc") or "cc", "-shared", "-fPIC", "-O1", "-o", str(self.sleep_lib),
                        str(source), "-ldl"], check=True, capture_output=True, timeout=120)

    def env(self) -> dict:
        """What the daemon's environment needs."""
        return {"LD_PRELOAD": f"{self.sleep_lib}:{faketime_lib()}",
                "FAKETIME_TIMESTAMP_FILE": str(self.file), "FAKETIME_CACHE_DURATION": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_RESET": "1"}

    def step(self, offset: str) -> None:
        """Set the offset from the real clock (libfaketime's "+2h" syntax)."""
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        os.replace(tmp, self.file)
        time.sleep(self.STEP_S)  # libfaketime re-reads the file once a second


def memory_cgroup_parent() -> Path | None:
    """A memory cgroup folder this process may create children in (v2 with the memory controller,
    else v1's memory hierarchy), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            if "memory" in (base / "cgroup.controllers").read_text().split() and os.access(base, os.W_OK):
                return base
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            if os.access(base, os.W_OK):
                return base
    return None


@contextlib.contextmanager
def memory_limited(pid: int, limit_bytes: int):
    """Move `pid` into a new memory cgroup limited to limit_bytes; the cgroup goes on exit."""
    parent = memory_cgroup_parent()
    if parent is None:
        raise RuntimeError("no writable memory cgroup")
    group = parent / f"edgechat-fault-{os.getpid()}-{pid}"
    group.mkdir()
    v2 = (group / "memory.max").exists()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        if v2:
            (group / "memory.max").write_text(str(limit_bytes))
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # a process still in it: move survivors out first
                with contextlib.suppress(OSError):
                    for proc in (group / "cgroup.procs").read_text().split():
                        (parent / "cgroup.procs").write_text(proc)
                time.sleep(0.1)
