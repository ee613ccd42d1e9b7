"""The fleet stage of bench.alert_quality: the fleet rules replayed by vmalert over a fleet's days, and
whether a leaking release pages once, counted at the Alertmanager webhook.

1. What the central store would have received from each fleet device (its device Prometheus ships
   it): `up` for every scrape (0 when it failed), `edgechat_build_info` with the device's version, the
   device's own firing alerts (`ALERTS`, from the device stage's replay) and the operator's expected-
   devices list, imported into VictoriaMetrics with their timestamps.
2. `vmalert -replay` evaluates the shipped fleet rules (cohort, silent device) over those days.
3. Every alert that would reach the fleet's Alertmanager (the device alerts, warning and above, and
   vmalert's) is sent to a real Alertmanager running the fleet's config, time compressed: each
   sender re-sends firing alerts every minute with Prometheus's 4-interval validity and resolved ones
   for 15 minutes, and every duration of the config (group_wait, group_interval, repeat_interval,
   resolve_timeout) is shrunk by the same factor. The webhook counts the notifications.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "prometheus", "tests")]
import traces  # noqa: E402

from bench.alert_pager import Alert, Pager, iso, pages, post  # noqa: E402
from daemon.fleet.procs import Proc, binary, free_port  # noqa: E402
from daemon.monitoring import fleet_rules  # noqa: E402
from daemon.monitoring.fleet_rules import EXPECTED_METRIC  # noqa: E402

STEP, DAY = 30, 86400
SITES = ("north", "south")
MODEL = "qwen2.5-0.5b-instruct"
LEAKY = "1.4.0"
MAX_POINTS = 50_000         # per series and query: 14 days at 30 s is 40,320


def _site(device: str) -> str:
    return SITES[zlib.crc32(device.encode()) % 2]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _version(spec, t: float) -> str:
    return spec.version if spec.deploy_at is None or t < spec.deploy_at else LEAKY


def device_alerts(specs, offsets: dict, episodes: list, window: float) -> list[Alert]:
    """The warning and critical alerts of fleet devices, as their Prometheus sends and ships them."""
    by_name = {s.name: s for s in specs}
    out = []
    for e in episodes:
        labels = dict(e.labels)
        spec = by_name.get(labels.get("device"))
        if spec is None or e.severity not in ("warning", "critical"):
            continue
        t0 = offsets[spec.name]
        fired = e.fired_at - t0
        if fired >= window:
            continue
        resolved = None if e.resolved_at is None else min(e.resolved_at - t0, window)
        interval = 300.0 if labels.get("window") in ("6h", "1d") else 30.0
        labels.update(alertname=e.alertname, site=_site(spec.name), version=_version(spec, fired), model=MODEL)
        out.append(Alert(labels, fired, resolved, interval))
    return out


def _series(metric: dict, stamps: np.ndarray, values) -> str:
    vals = values.tolist() if isinstance(values, np.ndarray) else [values] * len(stamps)
    return json.dumps({"metric": metric, "values": vals, "timestamps": stamps.tolist()}) + "\n"


def import_lines(specs, truths: dict, alerts: list[Alert], f0: int, window: float):
    """VictoriaMetrics /api/v1/import lines: per device `up`, build info, the expected list, ALERTS."""
    for s in specs:
        trace = traces.build(s.name, s.shape, s.seed, s.days, s.deploy_at)
        n = min(trace.steps, int(window // STEP))
        sampled = ~np.isnan(trace.series[1].values[:n])          # the limit: present in every scrape
        offline = np.zeros(n, bool)
        for a, b in trace.truth.offline:
            offline[int(a // STEP):int(b // STEP) + 1] = True
        k = np.arange(n)
        stamps = (f0 + k * STEP) * 1000
        site = _site(s.name)
        base = {"job": "edgechat", "instance": "127.0.0.1:8000", "device": s.name, "site": site}
        yield _series({"__name__": EXPECTED_METRIC, "device": s.name, "site": site}, stamps, 1)
        scraped = ~offline
        yield _series({"__name__": "up", **base}, stamps[scraped], sampled[scraped].astype(int))
        for version in sorted({_version(s, t) for t in k[sampled] * STEP}):
            keep = sampled & np.array([_version(s, t) == version for t in k * STEP])
            yield _series({"__name__": "edgechat_build_info", **base, "version": version}, stamps[keep], 1)
    for a in alerts:
        end = a.resolved if a.resolved is not None else window
        ticks = np.arange(a.fired, end, a.interval)
        yield _series({"__name__": "ALERTS", "alertstate": "firing", **a.labels},
                      ((f0 + ticks) * 1000).astype(np.int64), 1)


@dataclasses.dataclass
class FleetReport:
    devices: int
    versions: dict
    leaking_in_cohort: int
    cohort_episodes: dict          # version -> [(start h, end h)]
    silent: tuple[int, int]        # (during an offline window, outside one)
    pages: dict                    # what reached the critical receiver: kind -> (incidents, notifications)
    warnings: int
    seconds: float

    def text(self) -> str:
        lines = [f"{self.devices} devices ({', '.join(f'{v}: {n}' for v, n in sorted(self.versions.items()))}); "
                 f"{self.leaking_in_cohort} of the 1.4.0 cohort leak from its rollout. Stage took {self.seconds:.0f} s."]
        for version, eps in sorted(self.cohort_episodes.items()):
            spans = ", ".join(f"{a:.1f}-{'end' if b is None else f'{b:.1f}'} h" for a, b in eps)
            lines.append(f"- EdgechatCohortLeaking {version}: fired {len(eps)} time(s) ({spans})")
        lines.append(f"- EdgechatDeviceSilent: {self.silent[0]} in scripted offline windows, {self.silent[1]} outside")
        lines.append("- at the webhook, critical receiver: " + ("; ".join(
            f"{kind}: {i} page(s) ({n} notifications with reminders)" for kind, (i, n) in self.pages.items())
            or "nothing"))
        lines.append(f"- warning notifications: {self.warnings}")
        return "\n".join(lines)


class Central:
    """VictoriaMetrics and the replaying vmalert, on loopback."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = Proc("victoria-metrics", [
            binary("victoria-metrics"), f"-storageDataPath={os.path.join(workdir, 'store')}",
            f"-httpListenAddr=127.0.0.1:{self.port}", "-retentionPeriod=100y", "-search.disableCache",
            f"-search.maxPointsPerTimeseries={MAX_POINTS}",
            "-loggerLevel=WARN"], os.path.join(workdir, "store.log"), ports=(self.port,))

    def start(self) -> "Central":
        self.store.start()
        self.store.wait_http(f"{self.url}/health", 60)
        return self

    def stop(self) -> None:
        self.store.stop()

    def load(self, lines) -> None:
        batch = []
        for line in lines:
            batch.append(line)
            if len(batch) >= 200:
                post(f"{self.url}/api/v1/import", "".join(batch).encode())
                batch = []
        if batch:
            post(f"{self.url}/api/v1/import", "".join(batch).encode())
        self.flush()

    def flush(self) -> None:
        """Make everything written so far searchable."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=60) as resp:  # noqa: S310
            resp.read()

    def replay_rules(self, f0: float, window: float) -> None:
        rules = os.path.join(self.workdir, fleet_rules.FLEET_FILE)
        with open(rules, "w", encoding="utf-8") as handle:
            handle.write(fleet_rules.render()[fleet_rules.FLEET_FILE])
        run = subprocess.run([
            binary("vmalert"), f"-rule={rules}", f"-datasource.url={self.url}", f"-remoteWrite.url={self.url}",
            # the replay's range queries step at -datasource.queryStep (5 min by default), and it resets
            # a pending alert at any gap over the evaluation interval: step at that interval; and it
            # starts every request afresh (an alert pending again for `for` every 1000 points by
            # default): one request covers the whole window
            "-evaluationInterval=30s", "-datasource.queryStep=30s", f"-replay.maxDatapointsPerQuery={MAX_POINTS}",
            f"-replay.timeFrom={iso(f0)}", f"-replay.timeTo={iso(f0 + window)}",
            "-replay.rulesDelay=15s", "-remoteWrite.flushInterval=1s", "-replay.disableProgressBar",
            "-loggerLevel=WARN"],
            capture_output=True, text=True, timeout=3600)
        if run.returncode:
            raise RuntimeError(f"vmalert -replay failed: {run.stderr[-2000:]}")
        self.flush()
        time.sleep(2)

    def fired(self, f0: float, window: float) -> list[tuple[dict, float, float | None]]:
        """vmalert's firing alerts over the window: (labels, fired, resolved) in fleet seconds."""
        q = urllib.parse.urlencode({"query": 'ALERTS{alertstate="firing"}', "start": f0, "end": f0 + window,
                                    "step": STEP})
        out = []
        for series in _get(f"{self.url}/api/v1/query_range?{q}")["data"]["result"]:
            labels = {k: v for k, v in series["metric"].items() if k not in ("__name__", "alertstate")}
            if labels.get("alertname") not in ("EdgechatCohortLeaking", "EdgechatDeviceSilent"):
                continue
            times = np.array([float(t) for t, _ in series["values"]]) - f0
            breaks = np.flatnonzero(np.diff(times) > 1.5 * STEP)
            for a, b in zip(np.concatenate([[0], breaks + 1]), np.concatenate([breaks, [len(times) - 1]])):
                end = times[b] + STEP
                out.append((labels, float(times[a]), None if end >= window else float(end)))
        return out



def run(specs, truths: dict, offsets: dict, episodes: list, workdir: str, compress: float = 2880) -> FleetReport:
    """The fleet stage over the cohort's days (the fleet devices' traces start together)."""
    began = time.time()
    window = float(max(s.days for s in specs if s.deploy_at is not None) * DAY)
    f0 = int(time.time() // DAY - 30) * DAY            # a month ago: inside VictoriaMetrics's retention
    dev_alerts = device_alerts(specs, offsets, episodes, window)
    central = Central(workdir).start()
    try:
        central.load(import_lines(specs, truths, dev_alerts, f0, window))
        central.replay_rules(f0, window)
        fleet = central.fired(f0, window)
    finally:
        central.stop()
    cohort = collections.defaultdict(list)
    silent = [0, 0]
    for labels, fired, resolved in fleet:
        if labels["alertname"] == "EdgechatCohortLeaking":
            cohort[labels.get("version")].append((fired / 3600, None if resolved is None else resolved / 3600))
        else:
            offline = truths[labels["device"]].offline
            silent[0 if any(a <= fired <= b + 300 for a, b in offline) else 1] += 1
    vmalert = [Alert({**labels, "severity": labels.get("severity", "warning")}, fired, resolved, 30.0)
               for labels, fired, resolved in fleet]
    notes = Pager(os.path.join(workdir, "pager"), compress).run(dev_alerts + vmalert, window)
    healthy = {s.name for s in specs if s.shape in traces.HEALTHY}
    return FleetReport(
        devices=len(specs), versions=dict(collections.Counter(_version(s, window) for s in specs)),
        leaking_in_cohort=sum(1 for s in specs if s.deploy_at is not None and s.shape not in traces.HEALTHY),
        cohort_episodes=dict(cohort), silent=(silent[0], silent[1]), pages=pages(notes, healthy),
        warnings=sum(1 for n in notes if n.get("receiver") == "webhook-warning" and n.get("status") == "firing"),
        seconds=time.time() - began)
