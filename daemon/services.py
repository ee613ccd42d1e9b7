"""One typed object per app holding what every concern shares, instead of string keys on app.extensions."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:  # only for annotations: importing these costs torch and prometheus_client
    from .api.limits import TenantLimits
    from .api.stats import RecentTurns
    from .config import Config
    from .memory.budget import MemoryBudget
    from .memory.tracing import Diagnostics
    from .memory.watchdog import MemoryWatchdog
    from .model.engine import Engine
    from .sessions import SessionStore
    from .telemetry.listeners import Recorder
    from .telemetry.metrics import Metrics
    from .telemetry.sampler import Sampler

KEY = "edgechat"  # the one key on app.extensions


@dataclass
class Services:
    """This worker's config, telemetry, memory budget, model, store, watchdog and diagnostics."""

    config: Config
    metrics: Metrics
    recorder: Recorder
    sampler: Sampler
    budget: MemoryBudget
    engine: Engine
    store: SessionStore
    recent_turns: RecentTurns
    diagnostics: Diagnostics
    limits: TenantLimits
    watchdog: MemoryWatchdog | None = None  # None when memory_watchdog is off
    stop: threading.Event = field(default_factory=threading.Event)  # ends the background threads

    def close(self) -> None:
        """Stop background threads and release the store, model and telemetry (idempotent)."""
        self.stop.set()
        self.store.close()
        self.engine.close()
        self.sampler.close()
        self.metrics.close()


def get_services(app: Flask | None = None) -> Services:
    """The Services of `app` (current_app by default)."""
    return (app or current_app).extensions[KEY]
