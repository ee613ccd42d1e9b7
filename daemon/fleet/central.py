"""The fleet's central side on loopback: VictoriaMetrics, the expected-devices exporter, two clustered
Alertmanagers, vmalert with the fleet rules, and the watcher Prometheus that watches them."""
from __future__ import annotations

import dataclasses
import os

import yaml

from ..monitoring import alertmanager, fleet_rules
from ..monitoring.fleet_rules import EXPECTED_METRIC
from ..monitoring.promql import duration
from ..monitoring.thresholds import Thresholds
from .certs import Credentials, web_config
from .procs import Proc, binary, free_port

EXPECTED_FILE = "edgechat-expected-devices.prom"


@dataclasses.dataclass
class Ports:
    """Every central listening port, chosen free at construction."""

    store: int = dataclasses.field(default_factory=free_port)
    inventory: int = dataclasses.field(default_factory=free_port)
    vmalert: int = dataclasses.field(default_factory=free_port)
    watcher: int = dataclasses.field(default_factory=free_port)
    am: tuple[int, int] = dataclasses.field(default_factory=lambda: (free_port(), free_port()))
    cluster: tuple[int, int] = dataclasses.field(default_factory=lambda: (free_port(), free_port()))


def expected_devices_text(devices: list[tuple[str, str]]) -> str:
    """The expected-devices file (node_exporter textfile format): one series per (device, site)."""
    lines = [f"# HELP {EXPECTED_METRIC} A device that should report to the central store (1).",
             f"# TYPE {EXPECTED_METRIC} gauge"]
    lines += [f'{EXPECTED_METRIC}{{device="{d}",site="{s}"}} 1' for d, s in sorted(devices)]
    return "\n".join(lines) + "\n"


def write_expected(directory: str, devices: list[tuple[str, str]]) -> None:
    """Replace the expected-devices file atomically (node_exporter may read it at any moment)."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{EXPECTED_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(expected_devices_text(devices))
    os.replace(tmp, os.path.join(directory, EXPECTED_FILE))


class Central:
    """Builds (not starts) every central process; `scheme` is https when credentials are given."""

    def __init__(self, workdir: str, creds: Credentials | None, webhook_url: str, time_scale: float,
                 interval_s: float):
        self.workdir, self.creds, self.interval_s, self.time_scale = workdir, creds, interval_s, time_scale
        # Prometheus re-sends firing alerts this often (nominal 1 min); Alertmanager resolves an alert
        # that was not re-sent within 4 of these
        self.resend = duration(max(60 * time_scale, 1.0))
        self.ports = Ports()
        self.scheme = "https" if creds else "http"
        self.thresholds = Thresholds().scaled(time_scale)
        os.makedirs(workdir, exist_ok=True)
        self.rules_dir = os.path.join(workdir, "rules")
        fleet_rules.write(self.rules_dir, time_scale)
        self.inventory_dir = os.path.join(workdir, "inventory")
        os.makedirs(self.inventory_dir, exist_ok=True)
        self.store_url = f"{self.scheme}://127.0.0.1:{self.ports.store}"
        self.am_urls = [f"{self.scheme}://127.0.0.1:{p}" for p in self.ports.am]
        self.vmalert_url = f"http://127.0.0.1:{self.ports.vmalert}"
        self.watcher_url = f"http://127.0.0.1:{self.ports.watcher}"
        self.store = self._store()
        self.inventory = self._inventory()
        self.alertmanagers = [self._alertmanager(i, webhook_url) for i in (0, 1)]
        self.vmalert = self._vmalert()
        self.watcher = self._watcher()

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def _write_yaml(self, name: str, data: dict) -> str:
        with open(self._path(name), "w", encoding="utf-8") as handle:
            yaml.safe_dump(data, handle, sort_keys=False)
        return self._path(name)

    def _store(self) -> Proc:
        scrape = self._write_yaml("store-scrape.yml", {
            "global": {"scrape_interval": duration(self.interval_s)},
            "scrape_configs": [{"job_name": "edgechat-fleet-inventory",
                                "static_configs": [{"targets": [f"127.0.0.1:{self.ports.inventory}"]}],
                                "metric_relabel_configs": [{"source_labels": ["__name__"],
                                                            "regex": EXPECTED_METRIC, "action": "keep"}]}]})
        cmd = [binary("victoria-metrics"), f"-storageDataPath={self._path('store-data')}",
               f"-httpListenAddr=127.0.0.1:{self.ports.store}", "-retentionPeriod=1y", "-loggerLevel=WARN",
               f"-promscrape.config={scrape}", "-envflag.enable",
               # samples become visible after this delay (default 30 s); the rules run every interval
               f"-search.latencyOffset={duration(max(self.interval_s, 1.0))}"]
        env = dict(os.environ)
        if self.creds:
            cmd += ["-tls", f"-tlsCertFile={self.creds.cert_file}", f"-tlsKeyFile={self.creds.key_file}",
                    f"-httpAuth.username={self.creds.username}"]
            env["httpAuth_password"] = self.creds.password  # from the environment, not the command line
        return Proc("victoria-metrics", cmd, self._path("store.log"), env=env, ports=(self.ports.store,))

    def _inventory(self) -> Proc:
        cmd = [binary("prometheus-node-exporter", "node_exporter"), f"--web.listen-address=127.0.0.1:{self.ports.inventory}",
               "--collector.disable-defaults", "--collector.textfile",
               f"--collector.textfile.directory={self.inventory_dir}", "--log.level=warn"]
        return Proc("expected-devices exporter", cmd, self._path("inventory.log"), ports=(self.ports.inventory,))

    def _alertmanager(self, i: int, webhook_url: str) -> Proc:
        workdir = self._path(f"alertmanager-{i}")
        os.makedirs(workdir, exist_ok=True)
        config = os.path.join(workdir, "alertmanager.yml")
        alertmanager.write(config, alertmanager.render(webhook_url, template=alertmanager.FLEET_TEMPLATE))
        other = self.ports.cluster[1 - i]
        cmd = [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={config}",
               f"--storage.path={os.path.join(workdir, 'data')}", f"--web.listen-address=127.0.0.1:{self.ports.am[i]}",
               f"--cluster.listen-address=127.0.0.1:{self.ports.cluster[i]}", f"--cluster.peer=127.0.0.1:{other}",
               "--log.level=warn"]
        if self.creds:
            cmd.append(f"--web.config.file={self._write_yaml(f'alertmanager-{i}-web.yml', web_config(self.creds))}")
        return Proc(f"alertmanager-{i}", cmd, os.path.join(workdir, "alertmanager.log"),
                    ports=(self.ports.am[i], self.ports.cluster[i]))

    def _vmalert(self) -> Proc:
        interval = duration(self.interval_s)
        cmd = [binary("vmalert"), f"-rule={os.path.join(self.rules_dir, fleet_rules.FLEET_FILE)}",
               f"-datasource.url={self.store_url}", f"-remoteWrite.url={self.store_url}",
               f"-evaluationInterval={interval}", f"-httpListenAddr=127.0.0.1:{self.ports.vmalert}",
               "-loggerLevel=WARN", f"-rule.resendDelay={self.resend}"]
        for url in self.am_urls:
            cmd.append(f"-notifier.url={url}")
        if self.creds:
            c = self.creds
            cmd += [f"-datasource.tlsCAFile={c.ca_file}", f"-datasource.basicAuth.username={c.username}",
                    f"-datasource.basicAuth.passwordFile={c.password_file}",
                    f"-remoteWrite.tlsCAFile={c.ca_file}", f"-remoteWrite.basicAuth.username={c.username}",
                    f"-remoteWrite.basicAuth.passwordFile={c.password_file}"]
            for _ in self.am_urls:  # array flags: one value per notifier, in order
                cmd += [f"-notifier.tlsCAFile={c.ca_file}", f"-notifier.basicAuth.username={c.username}",
                        f"-notifier.basicAuth.passwordFile={c.password_file}"]
        return Proc("vmalert", cmd, self._path("vmalert.log"), ports=(self.ports.vmalert,))

    def _watcher(self) -> Proc:
        t, c = self.thresholds, self.creds
        secure = ({"scheme": "https", "tls_config": {"ca_file": c.ca_file},
                   "basic_auth": {"username": c.username, "password_file": c.password_file}} if c else {})
        config = {
            "global": {"scrape_interval": duration(self.interval_s), "evaluation_interval": duration(self.interval_s),
                       "scrape_timeout": duration(min(self.interval_s, 10.0))},
            "rule_files": [os.path.join(self.rules_dir, fleet_rules.CENTRAL_FILE)],
            "alerting": {"alertmanagers": [{**secure, "static_configs": [
                {"targets": [f"127.0.0.1:{p}" for p in self.ports.am]}]}]},
            "scrape_configs": [
                {"job_name": t.central_store_job, **secure,
                 "static_configs": [{"targets": [f"127.0.0.1:{self.ports.store}"]}]},
                {"job_name": t.fleet_rules_job, "static_configs": [{"targets": [f"127.0.0.1:{self.ports.vmalert}"]}]},
            ]}
        path = self._write_yaml("watcher.yml", config)
        cmd = [binary("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={self._path('watcher-data')}",
               f"--web.listen-address=127.0.0.1:{self.ports.watcher}", "--log.level=warn",
               f"--rules.alert.resend-delay={self.resend}"]
        return Proc("watcher", cmd, self._path("watcher.log"), ports=(self.ports.watcher,))

    def _ready(self, proc: Proc, url: str, secure: bool) -> None:
        if secure and self.creds:
            proc.wait_http(url, 60, self.creds.ca_file, self.creds.auth)
        else:
            proc.wait_http(url, 60)

    def start_store(self) -> None:
        """Start (or restart) the central store and wait until it answers."""
        self.store.start()
        self._ready(self.store, f"{self.store_url}/health", True)

    def start(self, expected: list[tuple[str, str]]) -> None:
        """Start everything, store first; the expected-devices file lists `expected`."""
        write_expected(self.inventory_dir, expected)
        self.start_store()
        self.inventory.start()
        self._ready(self.inventory, f"http://127.0.0.1:{self.ports.inventory}/metrics", False)
        for proc, url in zip(self.alertmanagers, self.am_urls):
            proc.start()
        for proc, url in zip(self.alertmanagers, self.am_urls):
            self._ready(proc, f"{url}/-/ready", True)
        self.vmalert.start()
        self._ready(self.vmalert, f"{self.vmalert_url}/health", False)
        self.watcher.start()
        self._ready(self.watcher, f"{self.watcher_url}/-/ready", False)

    def procs(self) -> list[Proc]:
        """Every central process, in start order."""
        return [self.store, self.inventory, *self.alertmanagers, self.vmalert, self.watcher]

    def stop(self) -> None:
        """Stop everything, the senders first."""
        for proc in reversed(self.procs()):
            proc.stop()
