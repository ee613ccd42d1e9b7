"""Object census: live objects by type, bytes of live torch tensors, growth since a baseline, and who holds it.

Catches what tracemalloc cannot see: tensor storage is allocated by torch, outside Python's allocator.
It walks every object the GC tracks (gc.get_objects), so it is O(objects), each walk inside C calls
only (heapwalk.py says why: a heap list held by Python code can break another thread's work;
holders(), which must hold what it finds, runs in a forked child): 0.15-0.5 s per ~375 k objects (torch + transformers + Flask loaded) on the 2-core dev box at load
average ~10, plus a full gc.collect() (0.7 s there) when asked to collect first. The daemon runs it
on demand (admin endpoints) and, without the collection, for the gauges at a low rate (CENSUS_EVERY_S,
from the tracing thread in tracing.py). Never imports torch: a
process that has not loaded it simply has no tensors.
"""
from __future__ import annotations

import gc
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType, ModuleType
from typing import Protocol

from ..telemetry.labels import LIVE_OBJECT_TYPES, OTHER
from .heapwalk import by_type_id, in_child, live_classes, pick

CENSUS_EVERY_S = 120.0  # background census for the gauges: well under 1 % of one core
TENSOR = "torch.Tensor"  # every tensor subclass (Parameter included) is counted under this name too
HOLDER_SCANS = 20  # gc.get_referrers calls per holders() (each one walks the whole heap)


def _module(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    return module if isinstance(module, str) else ""  # some C types expose a descriptor here


def type_name(cls: type) -> str:
    """"dict" for builtins, "module.QualName" otherwise."""
    module = _module(cls)
    name = getattr(cls, "__qualname__", None)
    name = name if isinstance(name, str) else cls.__name__
    return name if module in ("", "builtins") else f"{module}.{name}"


def _tensor_class():
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared storages counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        try:
            storage = t.untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse/nested/functional: no storage
            continue
        if key[1] == 0 or key in seen:  # meta and empty tensors own no memory
            continue
        seen.add(key)
        total += size
    return total


@dataclass(frozen=True)
class Census:
    """One count of live GC-tracked objects by type, and the torch tensors among them."""

    taken_at: float
    seconds: float                 # what this census cost
    counts: dict[str, int]         # exact type name -> live objects
    objects: int                   # all GC-tracked objects
    tensors: int                   # live torch tensors (subclasses included)
    tensor_bytes: int              # their distinct storages' bytes
    tensor_ids: frozenset = field(default=frozenset(), repr=False)  # to tell new tensors from old
    daemon_ids: frozenset = field(default=frozenset(), repr=False)  # objects of daemon.* classes

    def exported(self) -> dict[str, int]:
        """Counts folded into the bounded LIVE_OBJECT_TYPES label set (the gauges)."""
        out = {name: self.counts.get(name, 0) for name in LIVE_OBJECT_TYPES if name not in (TENSOR, OTHER)}
        out[TENSOR] = self.tensors
        out[OTHER] = max(self.objects - sum(out.values()), 0)
        return out


def take(collect: bool = True, ids: bool = True) -> Census:
    """Count live objects now; collect=True runs gc.collect() first so garbage is not counted;
    ids=True also records which tensors and daemon objects exist (for a baseline; a second pass)."""
    started = time.perf_counter()
    if collect:
        gc.collect()
    by_id = by_type_id()
    classes = live_classes()
    by_type = Counter()
    for type_id, n in by_id.items():
        cls = classes.get(type_id)  # None: the class died since the walk (its objects did too)
        if cls is not None:
            by_type[cls] += n
    tensor_cls = _tensor_class()
    tensor_types = frozenset(id(t) for t in by_type if tensor_cls is not None and issubclass(t, tensor_cls))
    daemon_types = frozenset(id(t) for t in by_type if _module(t).startswith("daemon."))
    # second walk: the objects of those types (complete objects, safe to hold in Python)
    picked = pick(tensor_types | (daemon_types if ids else frozenset())) \
        if tensor_types or (ids and daemon_types) else []
    tensors = [o for o in picked if id(type(o)) in tensor_types]
    daemon_ids = {id(o) for o in picked if id(type(o)) in daemon_types} if ids else set()
    del picked
    counts = {type_name(t): n for t, n in by_type.items()}
    tensor_bytes, tensor_ids = storage_bytes(tensors), frozenset(map(id, tensors) if ids else ())
    count = len(tensors)
    del tensors
    return Census(time.time(), time.perf_counter() - started, counts, sum(by_id.values()), count,
                  tensor_bytes, tensor_ids, frozenset(daemon_ids))


def growth(now: Census, base: Census | None, limit: int) -> dict:
    """The census as JSON: biggest types now and, against `base`, the types that grew most."""
    top = sorted(now.counts.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    out = {"taken_at": now.taken_at, "seconds": round(now.seconds, 4), "objects": now.objects,
           "torch": {"tensors": now.tensors, "bytes": now.tensor_bytes},
           "top": [{"type": name, "count": n} for name, n in top], "baseline_at": None, "growth": []}
    if base is None:
        return out
    # tracemalloc.* objects are the tracer's own baseline, taken with this one: not the program's growth
    diffs = {name: n - base.counts.get(name, 0) for name, n in now.counts.items()
             if not name.startswith("tracemalloc.")}
    if now.tensors - base.tensors > 0:  # all tensor classes together, with their bytes
        diffs[TENSOR] = now.tensors - base.tensors
    grown = sorted(((k, v) for k, v in diffs.items() if v > 0), key=lambda kv: kv[1], reverse=True)
    out["baseline_at"] = base.taken_at
    out["objects_diff"] = now.objects - base.objects
    out["torch"].update(tensors_diff=now.tensors - base.tensors, bytes_diff=now.tensor_bytes - base.tensor_bytes)
    out["growth"] = [{"type": name, "count": now.tensors if name == TENSOR else now.counts.get(name, 0),
                      "count_diff": d, **({"bytes": now.tensor_bytes, "bytes_diff": now.tensor_bytes -
                                           base.tensor_bytes} if name == TENSOR else {})}
                     for name, d in grown[:limit]]
    return out


def new_tensors(base: Census, sample: int = 6) -> list:
    """Up to `sample` tensors that did not exist at the baseline (by id), spread evenly over all new
    ones: a leak makes hundreds, a turn running meanwhile only its few temporaries."""
    tensor_cls = _tensor_class()
    if tensor_cls is None:
        return []
    # exact types, not isinstance(): that would run every object's __class__ and ABC machinery
    classes = live_classes()
    kinds = frozenset(i for i in by_type_id() if i in classes and issubclass(classes[i], tensor_cls))
    found = [o for o in pick(kinds) if id(o) not in base.tensor_ids]
    picked = found[:: max(1, len(found) // sample)][:sample]
    del found  # it refers to every new tensor: it must not be around when holders() looks
    return picked


def holders(targets: list, base: Census, max_scans: int = HOLDER_SCANS) -> list[str]:
    """Name what keeps `targets` alive: walk referrers up to a module, or to an object of the daemon's
    own classes that already lived at the baseline (what grew is payload; the old owner is the leak).

    Returns up to two chains that reach an owner (else what was found), holder first, e.g. "daemon.model.engine.Engine.retained -> list ->
    types.SimpleNamespace -> tuple -> torch.Tensor". Each step is a gc.get_referrers() walk over the
    whole heap, so at most `max_scans` run in all; a chain cut short starts with "?".
    """
    budget = [max_scans]
    ignore = {id(targets)}
    chains: list[_Chain] = []
    for target in targets:  # until two chains reach an owner: temporaries end fast, without one
        if budget[0] <= 0 or sum(c.rooted for c in chains) >= 2:
            break
        chains.append(_chain(target, budget, ignore, base.daemon_ids))
    rooted = [c for c in chains if c.rooted]
    return [str(c) for c in (rooted or chains)]  # a chain that found no owner only when none did


class _Chain(str):
    """A holder chain; `rooted` when it ends at a module or an old daemon object."""

    rooted = False


def _done(names: list[str], root: str | None = None, cut: bool = False) -> _Chain:
    chain = _Chain(" -> ".join(([root] if root else ["?"] if cut else []) + names[::-1]))
    chain.rooted = root is not None
    return chain


def _chain(target, budget: list[int], ignore: set[int], old: frozenset) -> _Chain:
    names = [type_name(type(target))]
    prev, current = None, target
    seen = {id(target)}
    while budget[0] > 0:
        budget[0] -= 1
        # frames refer to what they are looking at (this one included): never the holder
        refs = [r for r in gc.get_referrers(current)
                if id(r) not in seen and id(r) not in ignore and not isinstance(r, FrameType)]
        root = next((r for r in refs if isinstance(r, ModuleType) or id(r) in old), None)
        if root is not None:
            if getattr(root, "__dict__", None) is current:  # held through root's own __dict__
                names.pop()
            return _done(names, _attribute_of(root, current, prev))
        if not refs:  # held only by running code (frames): a temporary, not a leak
            return _done(names)
        nxt = next((r for r in refs if type(r) is not dict), refs[0])  # an object over its __dict__
        del refs
        seen.add(id(nxt))
        names.append(type_name(type(nxt)))
        prev, current = current, nxt
    return _done(names, cut=True)


def _attribute_of(root, child, grandchild) -> str:
    """"module.Class.attr" (or "module.attr"): the attribute of `root` through which `child` is held."""
    prefix = root.__name__ if isinstance(root, ModuleType) else type_name(type(root))
    attrs = getattr(root, "__dict__", None) or {}
    wanted = grandchild if attrs is child else child  # child may be root's own __dict__
    for name, value in attrs.items():
        if value is wanted:
            return f"{prefix}.{name}"
    return prefix


class CensusListener(Protocol):
    """Observer of censuses (metrics)."""

    def set_census(self, counts: dict[str, int], tensor_bytes: int) -> None:
        """Live objects by type (over LIVE_OBJECT_TYPES) and tensor storage bytes of one census."""


class CensusKeeper:
    """This worker's baseline census; take() also refreshes the census gauges.

    One census at a time per worker: a second one running meanwhile would hold lists of every tensor,
    which the first one's holders() would then report as the holders.
    """

    def __init__(self, metrics: CensusListener | None = None):
        self._metrics = metrics
        self._lock = threading.RLock()
        self.baseline: Census | None = None

    def take(self, collect: bool = True, ids: bool = True) -> Census:
        """A census now, exported to the gauges."""
        with self._lock:
            census = take(collect, ids)
        if self._metrics is not None:
            self._metrics.set_census(census.exported(), census.tensor_bytes)
        return census

    def mark(self) -> Census:
        """Take the baseline census (after a full collection)."""
        with self._lock:
            self.baseline = self.take(collect=True)
            return self.baseline

    def report(self, limit: int, with_holders: bool = True) -> dict:
        """A census now as JSON (see growth()), with what holds new tensors when they grew."""
        with self._lock:
            now, base = self.take(collect=True), self.baseline
            out = growth(now, base, limit)
            out["holders"] = []
            if with_holders and base is not None and now.tensors > base.tensors:
                out["holders"] = in_child(lambda: holders(new_tensors(base), base))
            return out
