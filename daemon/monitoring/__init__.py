"""Monitoring as code: Prometheus rules, Alertmanager config and Grafana dashboards rendered from Python.

thresholds.py owns every threshold; rules and dashboards read it. May import: telemetry.labels (label
value sets); no torch, no prometheus_client.
"""
