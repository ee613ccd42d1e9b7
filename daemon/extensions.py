"""Small accessors for what hangs off the app (config, engine, session store, metrics): no globals."""
from __future__ import annotations

from flask import Flask, current_app

CONFIG = "edgechat.config"
ENGINE = "edgechat.engine"
STORE = "edgechat.store"
METRICS = "edgechat.metrics"


def _get(key: str, app: Flask | None):
    return (app or current_app).extensions[key]


def get_config(app: Flask | None = None):
    """The frozen Config this app was built with."""
    return _get(CONFIG, app)


def get_engine(app: Flask | None = None):
    """The app's model engine (one model per worker)."""
    return _get(ENGINE, app)


def get_store(app: Flask | None = None):
    """The app's session store."""
    return _get(STORE, app)


def get_metrics(app: Flask | None = None):
    """The app's Metrics object."""
    return _get(METRICS, app)
