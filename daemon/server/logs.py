"""Logging setup: plain text for a terminal, one JSON object per line for journald/Loki."""
from __future__ import annotations

import json
import logging
import os
import time


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line with pid, so several workers' logs can be told apart."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname,
               "logger": record.name, "pid": os.getpid(), "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str, fmt: str) -> None:
    """Configure the edgechat loggers once per process (idempotent)."""
    root = logging.getLogger("edgechat")
    root.setLevel(level)
    if any(getattr(h, "_edgechat", False) for h in root.handlers):
        for h in root.handlers:
            h.setFormatter(_formatter(fmt))
        return
    handler = logging.StreamHandler()
    handler._edgechat = True  # type: ignore[attr-defined]
    handler.setFormatter(_formatter(fmt))
    root.addHandler(handler)
    root.propagate = False


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
