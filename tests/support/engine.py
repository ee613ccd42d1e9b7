"""What the engine tests share besides their fixtures (conftest.py: make_engine, no_thread_left)."""
from __future__ import annotations

import threading

from daemon.model.streaming import THREAD_PREFIX


def generation_threads() -> list[str]:
    """Names of the generation worker threads alive now."""
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
