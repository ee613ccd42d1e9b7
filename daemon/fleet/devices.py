"""Fleet devices: a real daemon, or a group of simulated ones, behind its own Prometheus, vmagent and uplinks."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sys
import time
import urllib.request

from ..monitoring import rules, shipping
from ..telemetry.multiproc import MULTIPROC_ENV
from .central import Central
from .link import Link
from .procs import Proc, binary, free_port
from .simdevice import DeviceSpec

REAL_MODEL = "builtin:tiny"
# The disk vmagent may use per device for an outage backlog (docs/fleet.md: ~24 h of the budgeted
# series at 30 s scrapes fits in a few MB; the cap is what a 16 GB SD card can always spare).
VMAGENT_MAX_DISK = "500MB"


def installed_version() -> str:
    """The edgechat version this checkout reports in edgechat_build_info."""
    try:
        return importlib.metadata.version("edgechat")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclasses.dataclass(frozen=True)
class RealDevice:
    """A real `edgechat serve` on builtin:tiny."""

    name: str
    site: str
    leak_mode: str = "off"


class Station:
    """One device-side Prometheus (the shipped rules, evaluated locally), its vmagent and its uplinks:
    one link to the central store (vmagent's) and one to each Alertmanager (Prometheus's alerts)."""

    def __init__(self, name: str, workdir: str, central: Central, site: str, version: str, model: str,
                 time_scale: float, device: str | None = None, targets=(), file_sd: str | None = None):
        self.name, self.workdir, self.central, self.site = name, workdir, central, site
        os.makedirs(workdir, exist_ok=True)
        self.store_link = Link(f"{name}-store", ("127.0.0.1", central.ports.store))
        self.am_links = [Link(f"{name}-am{i}", ("127.0.0.1", port)) for i, port in enumerate(central.ports.am)]
        self.vmagent_port, self.prom_port = free_port(), free_port()
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        self.vmagent_url = f"http://127.0.0.1:{self.vmagent_port}"
        creds = central.creds
        rule_files = rules.write(os.path.join(workdir, "rules"), time_scale)
        config = shipping.device_prometheus_config(
            shipping.Device(site=site, version=version, model=model, device=device, targets=tuple(targets),
                            file_sd=file_sd, vmagent_url=f"{self.vmagent_url}/api/v1/write",
                            rule_files=tuple(rule_files), scrape_interval_s=central.interval_s,
                            evaluation_interval_s=central.interval_s),
            shipping.Uplink(tuple(link.address for link in self.am_links),
                            ca_file=creds.ca_file if creds else None, username=creds.username if creds else None,
                            password_file=creds.password_file if creds else None))
        path = os.path.join(workdir, "prometheus.yml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(shipping.dump(config))
        self.prometheus = Proc(f"{name}-prometheus", [
            binary("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
            f"--web.listen-address=127.0.0.1:{self.prom_port}", "--log.level=warn",
            f"--rules.alert.resend-delay={central.resend}"], os.path.join(workdir, "prometheus.log"),
            ports=(self.prom_port,))
        cmd = [binary("vmagent"), f"-httpListenAddr=127.0.0.1:{self.vmagent_port}",
               f"-remoteWrite.url={central.scheme}://{self.store_link.address}/api/v1/write",
               f"-remoteWrite.tmpDataPath={os.path.join(workdir, 'vmagent-queue')}",
               f"-remoteWrite.maxDiskUsagePerURL={VMAGENT_MAX_DISK}", "-loggerLevel=WARN"]
        if creds:
            cmd += [f"-remoteWrite.tlsCAFile={creds.ca_file}", f"-remoteWrite.basicAuth.username={creds.username}",
                    f"-remoteWrite.basicAuth.passwordFile={creds.password_file}"]
        self.vmagent = Proc(f"{name}-vmagent", cmd, os.path.join(workdir, "vmagent.log"), ports=(self.vmagent_port,))

    def links(self) -> list[Link]:
        """Every uplink of this station."""
        return [self.store_link, *self.am_links]

    def start(self) -> None:
        """Start the uplinks, vmagent, then Prometheus."""
        for link in self.links():
            link.start()
        self.vmagent.start()
        self.vmagent.wait_http(f"{self.vmagent_url}/health", 60)
        self.prometheus.start()
        self.prometheus.wait_http(f"{self.prom_url}/-/ready", 60)

    def cut_alert_uplink(self) -> None:
        """The device can no longer reach either Alertmanager."""
        for link in self.am_links:
            link.cut()

    def restore_alert_uplink(self) -> None:
        """The device reaches the Alertmanagers again."""
        for link in self.am_links:
            link.restore()

    def procs(self) -> list[Proc]:
        """This station's processes, in start order."""
        return [self.vmagent, self.prometheus]

    def stop(self) -> None:
        """Stop Prometheus, vmagent and the uplinks."""
        for proc in reversed(self.procs()):
            proc.stop()
        for link in self.links():
            link.close()


class RealStation(Station):
    """A real daemon on builtin:tiny with its own Prometheus (the device label is an external label)."""

    def __init__(self, spec: RealDevice, workdir: str, central: Central, time_scale: float, cache_dir: str | None):
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = f"127.0.0.1:{self.port}"
        super().__init__(spec.name, workdir, central, spec.site, installed_version(), REAL_MODEL, time_scale,
                         device=spec.name, targets=[(self.instance, None)])
        cmd = [sys.executable, "-m", "daemon", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--model", REAL_MODEL, "--state-dir", os.path.join(workdir, "state"),
               "--metrics-dir", os.path.join(workdir, "metrics"), "--threads", "1", "--no-warmup",
               "--metrics-refresh-s", "1",
               "--max-new-tokens", "16", "--leak-mode", spec.leak_mode]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECHAT_") and k != MULTIPROC_ENV}
        self.daemon = Proc(f"{spec.name}-edgechat", cmd, os.path.join(workdir, "edgechat.log"), env=env,
                           ports=(self.port,))

    def start_daemon(self) -> None:
        """Start the daemon without waiting (model loads overlap with the rest of the fleet starting)."""
        self.daemon.start()

    def start(self) -> None:
        """Wait for the daemon, then start its Prometheus side."""
        self.daemon.wait_http(f"{self.url}/readyz", 600)
        super().start()

    def procs(self) -> list[Proc]:
        return [self.daemon, *super().procs()]


class SimStation(Station):
    """Simulated devices of one cohort (site and version) in one light process, scraped by one Prometheus
    through file_sd, each target carrying its device label."""

    def __init__(self, site: str, version: str, specs: list[DeviceSpec], workdir: str, central: Central,
                 time_scale: float):
        self.specs = {s.name: s for s in specs}
        self.active = set(self.specs)
        self.ports: dict[str, int] = {}
        os.makedirs(workdir, exist_ok=True)
        self.sd_path = os.path.join(workdir, "targets.json")
        self.ports_path = os.path.join(workdir, "ports.json")
        self._write_targets()
        models = {s.model for s in specs}
        if len(models) != 1:
            raise ValueError(f"one simulated cohort serves one model, got {sorted(models)}")
        super().__init__(f"sim-{site}-{version}", workdir, central, site, version, models.pop(), time_scale,
                         file_sd=self.sd_path)
        spec_path = os.path.join(workdir, "devices.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            json.dump([dataclasses.asdict(s) for s in specs], handle)
        self.sim = Proc(f"{self.name}-devices", [sys.executable, "-m", "daemon.fleet.simdevice", spec_path,
                                                 self.ports_path], os.path.join(workdir, "devices.log"))

    def _write_targets(self) -> None:
        targets = shipping.file_sd_targets([(f"127.0.0.1:{port}", name) for name, port in sorted(self.ports.items())
                                            if name in self.active])
        tmp = self.sd_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(targets, handle)
        os.replace(tmp, self.sd_path)

    def start(self) -> None:
        """Start the simulated devices, wait for each, then the Prometheus side."""
        self.sim.start()
        deadline = time.monotonic() + 60
        while not os.path.exists(self.ports_path):
            if not self.sim.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.sim.name} did not start its devices:\n{self.sim.log_tail()}")
            time.sleep(0.2)
        with open(self.ports_path, encoding="utf-8") as handle:
            self.ports = json.load(handle)
        for port in self.ports.values():
            self.sim.wait_http(f"http://127.0.0.1:{port}/metrics", 60)
        self._write_targets()
        super().start()

    def silence(self, name: str) -> None:
        """The device goes dark: it stops answering and its Prometheus target goes away (a box powered off)."""
        self.active.discard(name)
        self._write_targets()
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[name]}/-/silence", method="POST")
        with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback
            pass

    def procs(self) -> list[Proc]:
        return [self.sim, *super().procs()]
