"""The /metrics endpoint, per-request HTTP metrics, and the optional metrics port, wired by init_app."""
from __future__ import annotations

import errno
import logging
import time
import weakref

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, start_http_server
from werkzeug.wsgi import ClosingIterator

from ..telemetry.metrics import Metrics
from .auth import bearer_matches
from .errors import ApiError
from ..telemetry.multiproc import scrape_registry
from ..telemetry.sampler import Sampler

log = logging.getLogger("edgechat.metrics")
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
UNMATCHED = "unmatched"
# A scrape refreshes the scraping worker's gauges, at most this often (cheap readings only).
SCRAPE_REFRESH_MAX_AGE_S = 1.0


class _Refresher:
    """A collector that collects nothing: registered first, it refreshes the gauges before a scrape."""

    def __init__(self, sampler: Sampler, max_age_s: float):
        self._sampler, self._max_age_s = sampler, max_age_s

    def describe(self) -> list:
        """Nothing to declare."""
        return []

    def collect(self) -> list:
        """Refresh this worker's process/GC/host gauges; yield no families."""
        self._sampler.refresh(max_age_s=self._max_age_s)
        return []


def exposition_registry(metrics: Metrics, sampler: Sampler, max_age_s: float = SCRAPE_REFRESH_MAX_AGE_S):
    """What scrapes collect: a refresh, then this registry (single process) or the folder (multi).

    Build once per endpoint and reuse: the folder collector keeps its parsed keys between scrapes.
    """
    refresher = _Refresher(sampler, max_age_s)
    if metrics.multiprocess:
        return scrape_registry(metrics.multiprocess_dir, refresher)
    registry = CollectorRegistry()
    registry.register(refresher)
    registry.register(metrics.registry)  # a registry is a collector too
    return registry


def route_label() -> str:
    """The matched route template (never the raw path, which may carry ids), or 'unmatched'."""
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


class Exposition:
    """What /metrics serves from (built once: the folder collector keeps its parsed keys) and the port server."""

    def __init__(self, registry, server) -> None:
        self.registry, self.server = registry, server


def init_app(app: Flask, config, metrics: Metrics, sampler: Sampler) -> Exposition:
    """Serve the metrics at config.metrics_path (and metrics_port), time every request."""
    _instrument(app, metrics)
    registry = exposition_registry(metrics, sampler)
    bp = Blueprint("edgechat_metrics", __name__)
    bp.add_url_rule(config.metrics_path, "scrape", _scrape(registry, metrics, config.metrics_key),
                    methods=["GET"])
    app.register_blueprint(bp)
    server = _serve_port(registry, config) if config.metrics_port > 0 else None
    if server is not None:
        metrics.on_close(lambda: (server.shutdown(), server.server_close()))
    # Flask has no app-shutdown hook (teardown_appcontext runs after every request): close at
    # shutdown_app(), or when the app is collected, or at interpreter exit. Must not hold the app.
    weakref.finalize(app, lambda: (sampler.close(), metrics.close()))
    return Exposition(registry, server)


def _scrape(registry, metrics: Metrics, key: str):
    def scrape() -> Response:
        """Prometheus metrics (text exposition; OpenMetrics when asked)."""
        if key and not bearer_matches(key):
            metrics.requests_rejected_total.labels(reason="unauthorized").inc()
            raise ApiError(401, "send 'Authorization: Bearer <metrics key>' (setting metrics_key)",
                           code="invalid_metrics_key")
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type})
    return scrape


def _instrument(app: Flask, metrics: Metrics) -> None:
    """Count every request by route template, method and status; time it until its body closes."""

    def start() -> None:
        g.edgechat_t0 = time.perf_counter()

    # first, so the clock starts even when a later hook (auth) answers early
    app.before_request_funcs.setdefault(None, []).insert(0, start)

    @app.after_request
    def count(response):
        route = route_label()
        method = request.method if request.method in METHODS else "other"
        metrics.http_requests_total.labels(route, method, str(response.status_code)).inc()
        t0 = g.get("edgechat_t0")
        if t0 is None:
            return response
        hist = metrics.http_request_duration_seconds.labels(route)
        # HTTP errors come back as a ClosingIterator over a finished body: not a stream
        if response.is_streamed and not isinstance(response.response, ClosingIterator):
            # counted now, timed when the server closes the body: a streamed turn's duration
            # covers the whole stream (or the client's disconnect)
            response.call_on_close(lambda: hist.observe(time.perf_counter() - t0))
        else:
            hist.observe(time.perf_counter() - t0)
        return response


def _serve_port(registry, config):
    """Serve metrics on config.metrics_port too; under several workers the first to bind serves all.

    Any worker's scrape reads every worker's files, so one server is enough; the others log and
    go on. If the serving worker is recycled the port is free until another worker starts.
    """
    try:
        server, _thread = start_http_server(config.metrics_port, addr=config.host,
                                            registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.info("metrics port %s already served (by another worker): this one serves %s only",
                 config.metrics_port, config.metrics_path)
        return None
    log.info("metrics also on http://%s:%s/metrics", config.host, config.metrics_port)
    return server
