"""Logging: one format for every line through Python logging (edgechat, gunicorn, libraries, warnings),
in the master and the workers: plain text for a terminal, one JSON object per line for journald/Loki.

The request id rides on a context variable the API sets per request (and a generation's thread
inherits), so every line logged while serving a request carries it.
"""
from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import os
import time

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgechat_request_id",
                                                                       default=None)
# LogRecord's own attributes; anything else on a record came from `extra=` and is kept
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                "request_id"}
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# gunicorn's access line (atoms: gunicorn docs "access_log_format"), the request id from our header
ACCESS_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or None) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


def _extra(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line with pid, request id and `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname,
               "logger": record.name, "pid": os.getpid(), "msg": record.getMessage()}
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        out.update(_extra(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with the request id and `extra=` fields appended when there are any."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tail = {k: v for k, v in [("request_id", getattr(record, "request_id", None)),
                                  *_extra(record).items()] if v is not None}
        return line + "".join(f" {k}={v}" for k, v in tail.items()) if tail else line


def make_formatter(fmt: str = "text") -> logging.Formatter:
    """The formatter for log_format (also named by gunicorn's logconfig_dict)."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


class Handler(logging.StreamHandler):
    """edgechat's stderr handler on the root logger (a class of its own, so setup can replace it)."""

    def __init__(self, fmt: str = "text") -> None:
        super().__init__()  # sys.stderr as it is now (pytest and gunicorn may have replaced it)
        self.setFormatter(make_formatter(fmt))
        self.addFilter(RequestIdFilter())


def _levels(level: str, access: bool) -> dict[str, str]:
    return {"root": "WARNING", "edgechat": level, "gunicorn.error": level,
            "gunicorn.access": "INFO" if access else "WARNING"}


def dict_config(level: str, fmt: str, access: bool = False) -> dict:
    """gunicorn's logconfig_dict: one stderr Handler on the root logger; gunicorn's, edgechat's and
    libraries' loggers propagate to it. Libraries speak from WARNING up; edgechat and gunicorn from
    `level`."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"()": Handler, "fmt": fmt}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {name: {"level": lvl, "handlers": [], "propagate": True}
                    for name, lvl in _levels(level, access).items() if name != "root"},
    }


def setup(level: str, fmt: str, access: bool = False) -> None:
    """Configure logging for this process (the master before gunicorn starts, each app): replaces
    edgechat's own handler and leaves any other (a test's capture) alone."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, Handler)]:
        root.removeHandler(handler)
    root.addHandler(Handler(fmt))
    for name, lvl in _levels(level, access).items():
        logger = logging.getLogger(None if name == "root" else name)
        logger.setLevel(lvl)
        if name != "root":
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn from libraries become log lines too
