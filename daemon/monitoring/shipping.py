"""What a fleet device ships (the series budget) and the device Prometheus config that evaluates and ships it.

A device's Prometheus scrapes the daemon, evaluates the shipped rules locally (so alerts fire while the
uplink is down), sends alerts to both central Alertmanagers and remote-writes a chosen subset of
series to a local vmagent, which buffers them on disk and forwards them to the central store.
"""
from __future__ import annotations

import dataclasses
import os
import re

import yaml

from .promql import duration
from .thresholds import Thresholds

# The most series one device may ship; tests/fleet checks it against the central store.
SERIES_BUDGET = 200
# Raw series shipped besides the recording rules' outputs: what the fleet dashboard and the cohort
# rules read (version, model, memory against the limit, the leak inputs, restarts, history, turns),
# plus ALERTS (the device's own alert states, which the cohort rule counts) and `up`.
SHIPPED_RAW = (
    "up", "ALERTS", "edgechat_build_info", "edgechat_model_info",
    "edgechat_service_memory_bytes", "edgechat_memory_limit_bytes",
    "edgechat_process_resident_memory_bytes", "edgechat_process_anonymous_memory_bytes",
    "edgechat_process_swap_bytes", "edgechat_process_start_time_seconds",
    "edgechat_history_messages_max", "edgechat_turns_total", "edgechat_memory_pressure_level",
)
# Every recording rule output (level:metric:operation with an instance level).
RECORDED_REGEX = r"instance(_[a-z_]+)?:edgechat_[a-z0-9_]+:[a-z0-9_]+"
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "prometheus", "prometheus.yml")


def keep_regex() -> str:
    """The __name__ regex of write_relabel_configs: recording outputs and the chosen raw series."""
    return "|".join([RECORDED_REGEX, *(re.escape(name) for name in SHIPPED_RAW)])


@dataclasses.dataclass(frozen=True)
class Uplink:
    """How a device reaches the central Alertmanagers: addresses and credentials (TLS when ca_file is set)."""

    alertmanagers: tuple[str, ...]          # host:port of each Alertmanager (all of them: HA pair)
    ca_file: str | None = None              # CA that signed the Alertmanagers' certificate; None = plain HTTP
    username: str | None = None             # basic auth, with password_file
    password_file: str | None = None
    server_name: str | None = None          # TLS server name when it differs from the address


@dataclasses.dataclass(frozen=True)
class Device:
    """One device Prometheus: the labels it ships with and what it scrapes.

    `device` set: one daemon, the device label is an external label. `device` None: several (simulated)
    devices share this Prometheus; each target carries its own device label (file_sd or targets).
    """

    site: str
    version: str
    model: str
    vmagent_url: str                        # the local vmagent's remote-write URL
    device: str | None = None
    targets: tuple[tuple[str, str | None], ...] = (("127.0.0.1:8000", None),)  # (address, device label)
    file_sd: str | None = None              # a file_sd JSON file of targets (labels include device)
    rule_files: tuple[str, ...] = ()
    scrape_interval_s: float = 30.0
    evaluation_interval_s: float = 30.0
    metrics_key_file: str | None = None     # bearer token for /metrics, when the daemon has one


def _tls(uplink: Uplink) -> dict:
    config: dict = {}
    if uplink.ca_file:
        config["scheme"] = "https"
        config["tls_config"] = {"ca_file": uplink.ca_file}
        if uplink.server_name:
            config["tls_config"]["server_name"] = uplink.server_name
    if uplink.username:
        if not uplink.password_file:
            raise ValueError("uplink basic auth needs password_file with username")
        config["basic_auth"] = {"username": uplink.username, "password_file": uplink.password_file}
    return config


def device_prometheus_config(d: Device, uplink: Uplink, base: str = BASE_CONFIG) -> dict:
    """The device's prometheus.yml: the repository's device config plus labels, uplinks and shipping."""
    with open(base, encoding="utf-8") as handle:
        cfg = yaml.safe_load(handle)
    glob = cfg.setdefault("global", {})
    glob["scrape_interval"] = duration(d.scrape_interval_s)
    glob["scrape_timeout"] = duration(min(d.scrape_interval_s, 10.0))
    glob["evaluation_interval"] = duration(d.evaluation_interval_s)
    labels = {"site": d.site, "version": d.version, "model": d.model}
    if d.device:
        labels = {"device": d.device, **labels}
    glob["external_labels"] = labels
    if d.rule_files:
        cfg["rule_files"] = [os.path.abspath(p) for p in d.rule_files]
    cfg["alerting"] = {"alertmanagers": [{**_tls(uplink), "static_configs": [
        {"targets": list(uplink.alertmanagers)}]}]}
    [job] = [j for j in cfg["scrape_configs"] if j.get("job_name") == Thresholds.job]
    if d.metrics_key_file:
        job["authorization"] = {"type": "Bearer", "credentials_file": d.metrics_key_file}
    if d.file_sd:
        job.pop("static_configs", None)
        job["file_sd_configs"] = [{"files": [d.file_sd], "refresh_interval": "30s"}]
    else:
        job["static_configs"] = [{"targets": [address], **({"labels": {"device": name}} if name else {})}
                                 for address, name in d.targets]
    cfg["remote_write"] = [{
        "url": d.vmagent_url,
        # only the budgeted series leave the device (SERIES_BUDGET); the rest stays in its TSDB
        "write_relabel_configs": [{"source_labels": ["__name__"], "regex": keep_regex(), "action": "keep"}],
        # loopback to vmagent: small batches every few seconds keep the WAL reader close to the head
        "queue_config": {"batch_send_deadline": "5s", "max_shards": 2},
        "metadata_config": {"send": False},
    }]
    return cfg


def file_sd_targets(devices: list[tuple[str, str]]) -> list[dict]:
    """A file_sd document: one target group per (address, device name)."""
    return [{"targets": [address], "labels": {"device": name}} for address, name in devices]


def dump(config: dict) -> str:
    """YAML text of a config, keys in the order built."""
    return yaml.safe_dump(config, sort_keys=False, width=4096)
