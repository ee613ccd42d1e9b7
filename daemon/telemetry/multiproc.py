"""The prometheus_client multiprocess folder: set up at serve start, kept bounded across worker recycling.

prometheus_client writes one file per metric type and pid and never deletes counter/histogram
files of dead pids (client_python #275, #367): with gunicorn `max_requests` the folder grows and
scrapes slow down. `worker_exited` folds a dead pid's files into one `<type>_archive.db` per type,
so totals stay monotonic and the folder holds O(live workers) files.

Compaction and scrapes exclude each other with flock on `.edgechat.lock` in the folder: a scrape
never sees a dead pid's values both in its file and in the archive, or in neither (brian-brazil's
objection to compaction in client_python #204/#518). Only the gunicorn master compacts, after it has
reaped the pid and before it forks a replacement, so no live process can own that pid meanwhile.

prometheus_client picks its value class when first imported, from PROMETHEUS_MULTIPROC_DIR: this
module imports it lazily, and prepare_dir() must run before anything imports it.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import mmap
import os
import sys

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOCK_NAME = ".edgechat.lock"
OWNER_NAME = ".edgechat.owner"  # flock held by the daemon whose folder it is; says which daemon
ARCHIVE = "archive"  # stands where a pid stands in file names: counter_archive.db, gauge_max_archive.db
_SUMMED = ("counter", "histogram", "summary")
_GAUGE_MERGE = {"min": min, "max": max, "sum": lambda a, b: a + b}  # + mostrecent; all/live*: dropped


class FolderHeld(RuntimeError):
    """Another running daemon owns this metrics folder; the message names both daemons."""


_claims: dict[str, int] = {}  # folder -> the open owner file whose flock this process holds


def claim_dir(path: str, owner: str) -> None:
    """Hold the folder for this daemon's life (a flock on its owner file, kept open and inherited by
    the workers); `owner` describes this daemon. FolderHeld when a live daemon holds it: its files
    are that daemon's, and wiping them would leave its /metrics reporting this one's workers."""
    path = os.path.abspath(path)
    if path in _claims:
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(path, OWNER_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderHeld(f"metrics folder {path} is held by a running edgechat daemon ({holder}); "
                         f"this daemon ({owner}) needs its own: set metrics_dir (EDGECHAT_METRICS_DIR, "
                         "--metrics-dir), or leave it empty for one per state_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    _claims[path] = fd


def prepare_dir(path: str, owner: str | None = None) -> str:
    """Claim the folder (see claim_dir), create it (0700), wipe metric files of a previous run,
    export PROMETHEUS_MULTIPROC_DIR.

    Only *.db files are removed, never the folder, so a misconfigured path cannot lose data.
    Raises RuntimeError when prometheus_client was already imported without multiprocess mode:
    workers forked from this process would then silently keep their metrics to themselves.
    """
    path = os.path.abspath(path)
    claim_dir(path, owner or f"pid {os.getpid()}")
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set; "
                           "call prepare_dir() before importing the app or prometheus_client")
    with _locked(path, exclusive=True):
        for name in glob.glob(os.path.join(path, "*.db")) + glob.glob(os.path.join(path, ".*.tmp")):
            os.remove(name)
    os.environ[MULTIPROC_ENV] = path
    return path


@contextlib.contextmanager
def _locked(path: str, exclusive: bool):
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing drops the lock


_write_failures = [0]  # metric writes lost to a full folder in this process (see backed_files)


def write_failures() -> int:
    """Metric values this process could not write to its files since it started (folder full)."""
    return _write_failures[0]


def backed_files() -> None:
    """Make this worker's metric files take their disk blocks before a value is written in them.

    prometheus_client grows its files with ftruncate, which on tmpfs (and most file systems) only
    makes a hole; the first write through the mmap into a hole the full file system cannot fill
    kills the process with SIGBUS. posix_fallocate reserves the blocks first and says ENOSPC
    instead: the value is then kept in the worker (prometheus_client's own copy, written with its
    next change once there is room) and counted (write_failures()). A worker that cannot even
    create its files refuses to boot, naming the folder. Idempotent; call before any metric exists.
    """
    from prometheus_client import values
    from prometheus_client.mmap_dict import MmapedDict
    if getattr(values.MmapedDict, "_edgechat_backed", False):
        return

    class BackedMmapedDict(MmapedDict):
        _edgechat_backed = True

        def __init__(self, filename, read_mode=False):
            if not read_mode:
                try:
                    with open(filename, "a+b") as fh:
                        os.posix_fallocate(fh.fileno(), 0, mmap.PAGESIZE)  # the header it writes
                except OSError as exc:
                    raise RuntimeError(f"metrics_dir {os.path.dirname(filename)}: no room for this "
                                       f"worker's metric files ({exc.strerror})") from exc
            super().__init__(filename, read_mode)

        def _init_value(self, key):
            encoded = key.encode("utf-8")
            size = 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16  # as the parent packs it
            os.posix_fallocate(self._f.fileno(), self._used, size)  # OSError: nothing written
            super()._init_value(key)

        def read_value(self, key):
            try:
                return super().read_value(key)
            except OSError:
                _write_failures[0] += 1
                return 0.0, 0.0

        def write_value(self, key, value, timestamp):
            try:
                super().write_value(key, value, timestamp)
            except OSError:
                _write_failures[0] += 1

    values.MmapedDict = BackedMmapedDict


def worker_exited(pid: int, path: str | None = None) -> None:
    """A worker is gone (gunicorn child_exit): drop its live gauges, fold the rest into archives."""
    from prometheus_client.multiprocess import mark_process_dead
    path = path or os.environ[MULTIPROC_ENV]
    with _locked(path, exclusive=True):
        mark_process_dead(pid, path)
        for typ in _SUMMED:
            _fold(path, f"{typ}_{pid}.db", f"{typ}_{ARCHIVE}.db", pid, _add)
        for mode in ("min", "max", "sum", "mostrecent"):
            _fold(path, f"gauge_{mode}_{pid}.db", f"gauge_{mode}_{ARCHIVE}.db", pid,
                  _latest if mode == "mostrecent" else _gauge_merge(mode))
        # `all` keeps a series per pid forever by design; a dead worker's is dropped to stay bounded
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, f"gauge_all_{pid}.db"))


def _add(old: tuple[float, float], new: tuple[float, float]) -> tuple[float, float]:
    return old[0] + new[0], 0.0


def _latest(old: tuple[float, float], new: tuple[float, float]) -> tuple[float, float]:
    return new if new[1] >= old[1] else old


def _gauge_merge(mode: str):
    def merge(old: tuple[float, float], new: tuple[float, float]) -> tuple[float, float]:
        return _GAUGE_MERGE[mode](old[0], new[0]), 0.0
    return merge


def _fold(path: str, dead_name: str, archive_name: str, pid: int, merge) -> None:
    """Merge one dead file into its archive (written aside, then renamed over), then delete it."""
    from prometheus_client.mmap_dict import MmapedDict
    dead = os.path.join(path, dead_name)
    if not os.path.exists(dead):
        return
    archive = os.path.join(path, archive_name)
    merged: dict[str, tuple[float, float]] = {}
    for source in (archive, dead):
        if not os.path.exists(source):
            continue
        for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(source):
            if source == dead and _labels_pid(key) == str(pid):
                continue  # a series about the dead process itself (process CPU): gone with it
            merged[key] = merge(merged[key], (value, timestamp)) if key in merged else (value, timestamp)
    tmp = os.path.join(path, f".{archive_name}.tmp")  # not *.db: invisible to collectors
    out = MmapedDict(tmp)
    try:
        for key, (value, timestamp) in merged.items():
            out.write_value(key, value, timestamp)
    finally:
        out.close()
    os.replace(tmp, archive)
    os.remove(dead)


def _labels_pid(key: str) -> str | None:
    labels = json.loads(key)[2]
    return labels.get("pid") if isinstance(labels, dict) else None


class LockedMultiProcessCollector:
    """MultiProcessCollector that reads the folder under a shared lock (no torn compaction).

    Keep one across scrapes: it remembers how it parsed each file key last time (json.loads of
    ~500 keys was ~20 % of a scrape's CPU, bench/scrape_cost.py). Only key parses are kept, never
    values: workers change values in place in mmap'd files, which leaves mtime and size alone.
    """

    def __init__(self, path: str):
        self.path = path
        self._keys: dict[str, tuple] = {}  # key -> (metric, sample name, sorted labels, help)

    def describe(self) -> list:
        """Nothing to declare up front: the names come from the files."""
        return []

    def collect(self):
        """Merge every worker's and the archives' files into metric families."""
        from prometheus_client.multiprocess import MultiProcessCollector
        with _locked(self.path, exclusive=False):
            metrics = self._read(glob.glob(os.path.join(self.path, "*.db")))
        return list(MultiProcessCollector._accumulate_metrics(metrics, True))

    def _read(self, files: list[str]) -> dict:
        """prometheus_client's MultiProcessCollector._read_metrics (0.26), with the key cache kept.

        The cache becomes the keys of this read only, so a dead worker's pid-labelled keys go.
        tests/test_metrics.py checks the output equals prometheus_client's own collector's.
        """
        from prometheus_client.metrics_core import Metric
        from prometheus_client.mmap_dict import MmapedDict
        known, seen, metrics = self._keys, {}, {}
        for path in files:
            parts = os.path.basename(path).split("_")
            typ = parts[0]
            try:
                entries = MmapedDict.read_all_values_from_file(path)
            except FileNotFoundError:
                if typ == "gauge" and parts[1].startswith("live"):
                    continue  # as prometheus_client: a live gauge file may go between glob and read
                raise
            for key, value, timestamp, _pos in entries:
                parsed = seen.get(key) or known.get(key)
                if parsed is None:
                    metric_name, name, labels, help_text = json.loads(key)
                    parsed = (metric_name, name, tuple(sorted(labels.items())), help_text)
                seen[key] = parsed
                metric_name, name, labels_key, help_text = parsed
                metric = metrics.get(metric_name)
                if metric is None:
                    metric = metrics[metric_name] = Metric(metric_name, help_text, typ)
                if typ == "gauge":
                    metric._multiprocess_mode = parts[1]
                    metric.add_sample(name, labels_key + (("pid", parts[2][:-3]),), value, timestamp)
                else:
                    metric.add_sample(name, labels_key, value)  # duplicates summed by _accumulate
        self._keys = seen
        return metrics


def scrape_registry(path: str, *first):
    """A registry for scrapes: any `first` collectors (e.g. a refresher), then the folder.

    Build it once per endpoint and reuse it, so the folder collector keeps its key cache.
    """
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry()
    for collector in first + (LockedMultiProcessCollector(path),):
        registry.register(collector)
    return registry
