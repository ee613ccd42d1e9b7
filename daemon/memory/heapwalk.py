"""Walks of every object the GC tracks that never hold its lists while another thread runs.

gc.get_objects() and gc.get_referrers() hand out every object, including a tuple another thread is
still building from a generator; a list of ours holding it when that thread resumes breaks its
`tuple(...)` (pick() explains). So counting and picking run inside C calls only, and what must hold
the objects it finds (census.holders) runs in a forked child, which has one thread.
"""
from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import time
from collections import Counter
from itertools import chain, compress, repeat

HOLDERS_TIMEOUT_S = 60.0  # a forked walk is killed past this


def _heap():
    """Every GC-tracked object, lazily: the list gc.get_objects() makes lives only inside the C call
    that consumes this iterator (see pick() for why that matters)."""
    return chain.from_iterable(map(gc.get_objects, (None,)))


class _CollectorOff:
    """No collection inside a walk: it would run gc callbacks and finalizers, i.e. bytecode."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc) -> None:
        if self.was:
            gc.enable()


def by_type_id() -> Counter:
    """Live objects per id(type): ints hash in C, where a metaclass's own __hash__ would be bytecode."""
    counts: Counter = Counter()
    with _CollectorOff():
        counts.update(map(id, map(type, _heap())))  # update() runs Python before the walk, none in it
    return counts


def pick(type_ids: frozenset) -> list:
    """The live objects whose id(type) is in type_ids (never tuples), picked inside one C call.

    gc.get_objects() hands out every object, including a tuple another thread is still building from
    a generator (`tuple(x for x in ...)`). Should that thread run while a list of ours holds its tuple,
    the tuple's final resize sees a second reference and fails ("SystemError:
    Objects/tupleobject.c: bad argument to internal function") in whatever request it serves. No
    thread runs while a C call that runs no bytecode holds the GIL, so each generation's objects are
    listed twice (the second list is the first plus that first list itself, at the end of generation
    0) and compress() keeps the first list's objects whose type the second one selects: map, compress
    and chain only, and every list is gone before any bytecode runs again. A tee() would do it with
    one list, but its buffer lists itself among the objects: a cycle the collector would free later.
    """
    keep = (type_ids - {id(tuple)}).__contains__  # a tuple picked could be one still being built
    picked: list = []
    with _CollectorOff():
        for generation in gc_generations():
            objects, again = map(gc.get_objects, (generation,)), map(gc.get_objects, (generation,))
            wanted = map(map, repeat(keep), map(map, repeat(id), map(map, repeat(type), again)))
            picked.extend(chain.from_iterable(map(compress, objects, wanted)))
    return picked


def gc_generations() -> range:
    """The collector's generations (0 youngest)."""
    return range(len(gc.get_count()))


def live_classes() -> dict[int, type]:
    """Every live class by id: tp_subclasses from object down (a walk of classes, not of the heap)."""
    found, todo = {id(object): object}, [object]
    while todo:
        cls = todo.pop()
        for sub in (type.__subclasses__(cls) if isinstance(cls, type) else ()):
            if id(sub) not in found:
                found[id(sub)] = sub
                todo.append(sub)
    return found


def in_child(work, timeout_s: float = HOLDERS_TIMEOUT_S):
    """work() run in a forked child, its picklable result returned: the child has one thread, so
    walks that must hold what gc hands out (holders()) cannot break another thread's work there.
    Costs the pages the walk touches (copy-on-write), so it serves on-demand reports only."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(read)
            with os.fdopen(write, "wb") as out:
                out.write(pickle.dumps(work()))
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"the forked walk took over {timeout_s:.0f} s")
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError("the forked walk ended without a result")
    return pickle.loads(b"".join(chunks))
