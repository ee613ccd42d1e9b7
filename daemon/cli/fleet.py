"""`edgechat fleet`: a simulated fleet on one machine (loopback only), to see device and cohort alerting work.

Real daemons on builtin:tiny (the first with leak_mode=history) and light simulated devices, each
group behind its own Prometheus and vmagent; VictoriaMetrics, vmalert, two clustered Alertmanagers
and a local webhook sink that prints every notification. All from Debian's packages; see docs/fleet.md.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time

from ..fleet.procs import binary
from .alertsink import AlertSink, describe

NEEDED = (("prometheus", ("prometheus",)), ("prometheus-alertmanager", ("prometheus-alertmanager", "alertmanager")),
          ("victoria-metrics", ("victoria-metrics",)), ("victoria-metrics (vmagent)", ("vmagent",)),
          ("victoria-metrics (vmalert)", ("vmalert",)),
          ("prometheus-node-exporter", ("prometheus-node-exporter", "node_exporter")), ("openssl", ("openssl",)))


def missing_binaries() -> list[str]:
    """Debian packages whose executables are not installed."""
    return [package for package, names in NEEDED if binary(*names) is None]


def add_parsers(sub) -> None:
    """Register `fleet`."""
    p = sub.add_parser("fleet", help="run a simulated fleet on loopback (Ctrl-C stops)",
                       description="Start real daemons and simulated devices with their device-side "
                                   "Prometheus and vmagent, the central store (VictoriaMetrics), vmalert, "
                                   "two clustered Alertmanagers and a webhook sink that prints alerts.")
    p.add_argument("--real", type=int, default=3, help="real daemons on builtin:tiny (default: %(default)s)")
    p.add_argument("--sims", type=int, default=50, help="simulated devices (default: %(default)s)")
    p.add_argument("--time-scale", type=float, default=0.05, metavar="F",
                   help="rule windows and simulated time run 1/F times faster (default: %(default)s)")
    p.add_argument("--interval", type=float, default=1.5, metavar="S",
                   help="scrape and evaluation interval, seconds (default: %(default)s: 30 s nominal at 0.05)")
    p.add_argument("--no-tls", action="store_true", help="plain HTTP, no basic auth on the uplinks")
    p.add_argument("--webhook-url", help="send notifications here instead of the printing sink")
    p.add_argument("--silent-after", type=float, default=120.0, metavar="S",
                   help="seconds after start at which the `silent` devices go dark (default: %(default)s)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0: run until Ctrl-C)")
    p.add_argument("--cache-dir", help="model cache for the real daemons (default: the daemon's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, TSDBs) at exit")
    p.set_defaults(func=run)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(ns: argparse.Namespace) -> int:
    """Start the fleet, print where everything is, print notifications until stopped."""
    # imported here: the simulated devices load prometheus_client, which `edgechat serve`'s master
    # must not have imported before it prepares the multiprocess folder
    from ..fleet.topology import Fleet, default_layout
    missing = missing_binaries()
    if missing:
        _say(f"edgechat fleet: not installed: {', '.join(missing)} (apt-get install prometheus "
             "prometheus-alertmanager victoria-metrics prometheus-node-exporter openssl)")
        return 2
    workdir = tempfile.mkdtemp(prefix="edgechat-fleet-")
    sink = None if ns.webhook_url else AlertSink(on_notification=lambda n: [print(line, flush=True)
                                                                             for line in describe(n)]).start()
    layout = default_layout(ns.real, ns.sims, ns.time_scale)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    fleet = None
    try:
        fleet = Fleet(workdir, layout, ns.webhook_url or sink.url, ns.time_scale, ns.interval,
                      tls=not ns.no_tls, cache_dir=ns.cache_dir)
        _say(f"starting {ns.real} daemons, {ns.sims} simulated devices and the central side in {workdir} ...")
        fleet.start()
        c = fleet.central
        _say(f"\ncentral store   {c.store_url}  (vmui: {c.store_url}/vmui)\n"
             f"alertmanagers   {c.am_urls[0]}  {c.am_urls[1]}\n"
             f"vmalert         {c.vmalert_url}/vmalert/groups\nwatcher         {c.watcher_url}/alerts")
        for station in fleet.stations:
            _say(f"{station.name:22} prometheus {station.prom_url}  vmagent {station.vmagent_url}")
        if fleet.creds:
            _say(f"credentials     user {fleet.creds.username}, password in {fleet.creds.password_file}, "
                 f"CA {fleet.creds.ca_file}")
        _say("Ctrl-C stops everything.")
        silent = [s.name for s in layout.sims if s.shape == "silent"]
        started = time.monotonic()
        while not ns.duration or time.monotonic() - started < ns.duration:
            if silent and time.monotonic() - started >= ns.silent_after:
                for name in silent:
                    fleet.silence(name)
                    _say(f"{name} went dark")
                silent = []
            dead = [p for p in [*c.procs(), *(p for s in fleet.stations for p in s.procs())] if not p.alive()]
            if dead:
                _say(f"edgechat fleet: {dead[0].name} exited:\n{dead[0].log_tail()}")
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        _say("\nstopping ...")
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:  # a part failed to start (CredentialsError too)
        _say(f"edgechat fleet: {exc}")
        return 1
    finally:
        if fleet is not None:
            fleet.stop()
        if sink is not None:
            sink.stop()
        signal.signal(signal.SIGTERM, previous)
        if ns.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
