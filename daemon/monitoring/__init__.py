"""Monitoring as code: Prometheus rules, Alertmanager config and Grafana dashboards rendered from Python."""
