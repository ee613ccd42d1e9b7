"""A whole fleet on loopback: its layout, start and stop in order, and the queries and faults tests use."""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import ssl
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from . import certs
from .central import Central, write_expected
from .devices import RealDevice, RealStation, SimStation, Station
from .simdevice import LEAKING_SHAPES, DeviceSpec

SITES = ("north", "south")
STEADY_VERSION = "1.3.2"   # simulated release that does not leak (a few odd devices aside)
LEAKY_VERSION = "1.4.0"    # simulated release that leaks on 40 % of its devices
SIM_MODEL = "qwen2.5-0.5b-instruct"
# shapes of the leaky release, cycled: 2 of every 5 devices leak (per request, per token)
LEAKY_CYCLE = ("leak_request", "healthy", "leak_token", "healthy", "healthy")
# the steady release: one device of each odd shape, the rest healthy
STEADY_ODD = ("swap_hidden", "restarting", "silent")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which devices the fleet has: real daemons and simulated devices (each with its port)."""

    real: tuple[RealDevice, ...]
    sims: tuple[DeviceSpec, ...]

    def expected(self) -> list[tuple[str, str]]:
        """(device, site) of every device: the expected-devices list the operator would keep."""
        return [(r.name, r.site) for r in self.real] + [(s.name, _site(s)) for s in self.sims]

    def unhealthy(self) -> set[str]:
        """Devices whose shape (or leak mode) may raise warning or critical alerts."""
        return ({r.name for r in self.real if r.leak_mode != "off"}
                | {s.name for s in self.sims if s.shape in (*LEAKING_SHAPES, "silent")})


def _site(spec: DeviceSpec) -> str:
    return spec.name.split("-")[1]


def default_layout(real: int = 3, sims: int = 50, time_scale: float = 0.05) -> Layout:
    """`real` daemons (the first with leak_mode=history) and `sims` simulated devices over two sites,
    half on a steady release, half on a leaky one."""
    reals = tuple(RealDevice(f"real-{i + 1}", SITES[i % 2], "history" if i == 0 else "off") for i in range(real))
    specs = []
    for i in range(sims):
        leaky = i % 2 == 1
        k = i // 2
        shape = LEAKY_CYCLE[k % len(LEAKY_CYCLE)] if leaky else (STEADY_ODD[k] if k < len(STEADY_ODD) else "healthy")
        site = SITES[k % 2]
        specs.append(DeviceSpec(name=f"sim-{site}-{i + 1:03d}", port=0, shape=shape,
                                version=LEAKY_VERSION if leaky else STEADY_VERSION, model=SIM_MODEL,
                                time_scale=time_scale, seed=i + 1))
    return Layout(reals, tuple(specs))


class Fleet:
    """Every process of the fleet; start() brings it up (stop() on failure), stop() takes it down."""

    def __init__(self, workdir: str, layout: Layout, webhook_url: str, time_scale: float = 0.05,
                 interval_s: float = 1.5, tls: bool = True, cache_dir: str | None = None):
        self.workdir, self.layout, self.time_scale = workdir, layout, time_scale
        os.makedirs(workdir, exist_ok=True)
        self.creds = certs.make(os.path.join(workdir, "credentials")) if tls else None
        self.central = Central(os.path.join(workdir, "central"), self.creds, webhook_url, time_scale, interval_s)
        self.reals = [RealStation(r, os.path.join(workdir, r.name), self.central, time_scale, cache_dir)
                      for r in layout.real]
        cohorts: dict[tuple[str, str], list[DeviceSpec]] = {}
        for spec in layout.sims:
            cohorts.setdefault((_site(spec), spec.version), []).append(spec)
        self.sims = [SimStation(site, version, specs, os.path.join(workdir, f"sim-{site}-{version}"),
                                self.central, time_scale) for (site, version), specs in sorted(cohorts.items())]
        self._context = ssl.create_default_context(cafile=self.creds.ca_file) if self.creds else None
        self.started_at: float | None = None

    @property
    def stations(self) -> list[Station]:
        """Every device-side Prometheus."""
        return [*self.reals, *self.sims]

    def sim_url(self, device: str) -> str:
        """Where a simulated device serves /metrics."""
        station = self.station_of(device)
        return f"http://127.0.0.1:{station.ports[device]}"

    def station_of(self, device: str) -> Station:
        """The station whose Prometheus scrapes `device`."""
        for station in self.reals:
            if station.spec.name == device:
                return station
        for station in self.sims:
            if device in station.specs:
                return station
        raise KeyError(device)

    def start(self) -> "Fleet":
        """Start the daemons (they load in the background), the central side, then every station."""
        try:
            for station in self.reals:
                station.start_daemon()
            self.central.start(self.layout.expected())
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda s: s.start(), self.stations))
        except BaseException:
            self.stop()
            raise
        self.started_at = time.time()
        return self

    def stop(self) -> None:
        """Stop every station, then the central side (whatever started)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda s: s.stop(), self.stations))
        self.central.stop()

    # --- faults ------------------------------------------------------------------------------------
    def set_expected(self, devices: list[tuple[str, str]]) -> None:
        """Rewrite the operator's expected-devices list."""
        write_expected(self.central.inventory_dir, devices)

    def silence(self, device: str) -> None:
        """A simulated device goes dark."""
        station = self.station_of(device)
        if not isinstance(station, SimStation):
            raise ValueError(f"{device} is not a simulated device")
        station.silence(device)

    # --- queries -----------------------------------------------------------------------------------
    def _get(self, url: str, params: dict | None = None, secure: bool = False, lines: bool = False):
        """GET JSON (or, with lines=True, JSON lines) from a fleet component."""
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        request = urllib.request.Request(url)
        context = None
        if secure and self.creds:
            token = base64.b64encode(f"{self.creds.username}:{self.creds.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
            context = self._context
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:  # noqa: S310 - loopback
            body = resp.read()
        if lines:
            return [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        return json.loads(body)

    def central_query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query on the central store."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
        return self._get(f"{self.central.store_url}/api/v1/query", params, secure=True)["data"]["result"]

    def central_samples(self, selector: str, start: float, end: float) -> dict[str, list[int]]:
        """Raw sample timestamps (ms) per series between start and end, as the central store holds them."""
        out = self._get(f"{self.central.store_url}/api/v1/export",
                        {"match[]": selector, "start": f"{start:.3f}", "end": f"{end:.3f}"}, secure=True, lines=True)
        series = {}
        for item in out:
            key = json.dumps(dict(sorted(item["metric"].items())))
            series[key] = sorted(item["timestamps"])
        return series

    def device_query(self, station: Station, expr: str) -> list[dict]:
        """An instant query on a device's own Prometheus."""
        return self._get(f"{station.prom_url}/api/v1/query", {"query": expr})["data"]["result"]

    def device_samples(self, station: Station, selector: str, start: float, end: float) -> list[int]:
        """Raw sample timestamps (ms) of one series between start and end, as the device's TSDB holds them."""
        window = max(math.ceil(end - start), 1)  # whole seconds, rounded up: nothing after `start` is cut
        [result] = self.device_query_at(station, f"{selector}[{window}s]", end)
        return [round(float(t) * 1000) for t, _ in result["values"] if float(t) >= start]

    def device_query_at(self, station: Station, expr: str, at: float) -> list[dict]:
        """An instant query on a device's Prometheus at time `at`."""
        return self._get(f"{station.prom_url}/api/v1/query", {"query": expr, "time": f"{at:.3f}"})["data"]["result"]

    def alertmanager_alerts(self, i: int) -> list[dict]:
        """Alerts Alertmanager i holds (active, silenced and inhibited)."""
        return self._get(f"{self.central.am_urls[i]}/api/v2/alerts", secure=True)

    def vmalert_alerts(self) -> list[dict]:
        """vmalert's pending and firing alerts."""
        return self._get(f"{self.central.vmalert_url}/api/v1/alerts")["data"]["alerts"] or []

    def uplink_bytes(self) -> dict[str, int]:
        """Bytes each station sent up its store uplink so far (TLS and HTTP included)."""
        return {station.name: station.store_link.bytes_up for station in self.stations}
