"""`edgechat stack`: daemon + Prometheus + Alertmanager (Debian packages) on loopback, to see the whole system.

Temporary data folders, the repository's configs (rules rendered, Alertmanager config rendered with
its webhook pointed at a local sink that prints notifications), URLs printed, Ctrl-C stops it all.
The process starters here are what the end-to-end test starts its Prometheus and Alertmanager with.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import yaml

from ..fleet.procs import Proc, binary
from ..monitoring import alertmanager, rules
from ..monitoring.promql import duration
from ..monitoring.thresholds import Thresholds
from ..telemetry.multiproc import MULTIPROC_ENV
from .alertsink import AlertSink, describe

PROMETHEUS_YML = os.path.join(alertmanager.REPO_ROOT, "prometheus", "prometheus.yml")


def prometheus_config(daemon_targets: list[str], alertmanager_target: str, rule_files: list[str],
                      scrape_interval_s: float | None = None, evaluation_interval_s: float | None = None,
                      base: str = PROMETHEUS_YML) -> dict:
    """The repository's prometheus.yml with its targets, rule files and (optionally) intervals replaced."""
    with open(base, encoding="utf-8") as handle:
        cfg = yaml.safe_load(handle)
    glob = cfg.setdefault("global", {})
    if scrape_interval_s:
        glob["scrape_interval"] = duration(scrape_interval_s)
        # a scrape must end before the next one starts (Prometheus refuses the config otherwise)
        glob["scrape_timeout"] = duration(min(scrape_interval_s, 10.0))
    if evaluation_interval_s:
        glob["evaluation_interval"] = duration(evaluation_interval_s)
    cfg["rule_files"] = [os.path.abspath(path) for path in rule_files]
    cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_target]}]}]}
    jobs = [job for job in cfg.get("scrape_configs", []) if job.get("job_name") == Thresholds.job]
    if not jobs:
        raise ValueError(f"{base} has no scrape job {Thresholds.job!r} to point at the daemon")
    jobs[0]["static_configs"] = [{"targets": list(daemon_targets)}]
    return cfg


def prometheus_proc(workdir: str, config: dict, port: int, exe: str | None = None) -> Proc:
    """Prometheus on 127.0.0.1:port with this config, its TSDB under workdir (not started)."""
    path = os.path.join(workdir, "prometheus.yml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    cmd = [exe or binary("prometheus"), f"--config.file={path}",
           f"--storage.tsdb.path={os.path.join(workdir, 'prometheus-data')}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    return Proc("prometheus", cmd, os.path.join(workdir, "prometheus.log"))


def alertmanager_proc(workdir: str, config_text: str, port: int, exe: str | None = None) -> Proc:
    """Alertmanager on 127.0.0.1:port, clustering off, its storage under workdir (not started)."""
    path = os.path.join(workdir, "alertmanager.yml")
    alertmanager.write(path, config_text)
    cmd = [exe or binary("prometheus-alertmanager", "alertmanager"), f"--config.file={path}",
           f"--storage.path={os.path.join(workdir, 'alertmanager-data')}",
           f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]
    return Proc("alertmanager", cmd, os.path.join(workdir, "alertmanager.log"))


def daemon_proc(workdir: str, port: int, serve_args: list[str]) -> Proc:
    """`edgechat serve` on 127.0.0.1:port with state and metrics folders under workdir (not started)."""
    cmd = [sys.executable, "-m", "daemon", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--state-dir", os.path.join(workdir, "state"), "--metrics-dir", os.path.join(workdir, "metrics")]
    if not any(arg == "--model" or arg.startswith("--model=") for arg in serve_args):
        cmd += ["--model", "builtin:tiny"]
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    return Proc("edgechat", cmd + serve_args, os.path.join(workdir, "edgechat.log"), env=env)


def add_parsers(sub) -> None:
    """Register `stack`."""
    p = sub.add_parser("stack", help="run daemon + Prometheus + Alertmanager on loopback (Ctrl-C stops)",
                       description="Start edgechat serve, Prometheus and Alertmanager (Debian's packages) on "
                                   "127.0.0.1 with temporary data folders and this repository's configs; "
                                   "alerts go to a local sink that prints them. Arguments after `--` go to "
                                   "`edgechat serve` (default model builtin:tiny), e.g. "
                                   "`edgechat stack --time-scale 0.02 -- --leak-mode history`.")
    p.add_argument("--port", type=int, default=8000, help="daemon port (default: %(default)s)")
    p.add_argument("--prometheus-port", type=int, default=9090, help="(default: %(default)s)")
    p.add_argument("--alertmanager-port", type=int, default=9093, help="(default: %(default)s)")
    p.add_argument("--sink-port", type=int, default=9095, help="local webhook sink port (default: %(default)s)")
    p.add_argument("--webhook-url", help="send notifications here instead of the local sink")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="F",
                   help="shrink every rule window, `for` and guard by F to see alerts in minutes (default: 1)")
    p.add_argument("--scrape-interval", type=float, default=5.0, metavar="S",
                   help="scrape and rule evaluation interval, seconds (default: %(default)s; the "
                        "device config uses 30)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, TSDB) at exit")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then flags for edgechat serve")
    p.set_defaults(func=run)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(ns: argparse.Namespace) -> int:
    """Start everything, print the URLs, wait for Ctrl-C (or a child dying), stop everything."""
    missing = [n for n, exe in (("prometheus", binary("prometheus")),
                                ("prometheus-alertmanager", binary("prometheus-alertmanager", "alertmanager")))
               if exe is None]
    if missing:
        _say(f"edgechat stack: {', '.join(missing)} not found (apt-get install prometheus prometheus-alertmanager)")
        return 2
    serve_args = ns.serve_args[1:] if ns.serve_args[:1] == ["--"] else ns.serve_args
    workdir = tempfile.mkdtemp(prefix="edgechat-stack-")
    procs: list[Proc] = []
    sink = None
    # SIGTERM stops the stack as Ctrl-C does (systemd, `kill`, a test); SIGINT is set too, since a
    # process started in the background of a script inherits SIGINT ignored
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, _interrupt)
    try:
        if ns.webhook_url:
            url = ns.webhook_url
        else:
            sink = AlertSink("127.0.0.1", ns.sink_port, on_notification=_print_alerts).start()
            url = sink.url
        rule_files = rules.write(os.path.join(workdir, "rules"), ns.time_scale)
        am = alertmanager_proc(workdir, alertmanager.render(url), ns.alertmanager_port)
        prom = prometheus_proc(workdir, prometheus_config(
            [f"127.0.0.1:{ns.port}"], f"127.0.0.1:{ns.alertmanager_port}", rule_files,
            ns.scrape_interval, ns.scrape_interval), ns.prometheus_port)
        daemon = daemon_proc(workdir, ns.port, serve_args)
        for proc, ready in ((am, f"http://127.0.0.1:{ns.alertmanager_port}/-/ready"),
                            (prom, f"http://127.0.0.1:{ns.prometheus_port}/-/ready"),
                            (daemon, f"http://127.0.0.1:{ns.port}/readyz")):
            procs.append(proc.start())
            _say(f"starting {proc.name} (log {proc.log_path}) ...")
            proc.wait_http(ready, timeout=600 if proc is daemon else 60)
        _say(f"\nedgechat      http://127.0.0.1:{ns.port}   (try: edgechat chat --url http://127.0.0.1:{ns.port})\n"
             f"metrics       http://127.0.0.1:{ns.port}/metrics\n"
             f"prometheus    http://127.0.0.1:{ns.prometheus_port}/alerts\n"
             f"alertmanager  http://127.0.0.1:{ns.alertmanager_port}\n"
             f"alerts to     {url}" + (" (printed here)" if sink else "") +
             f"\nfolder        {workdir}\nCtrl-C stops everything.")
        while all(proc.alive() for proc in procs):
            time.sleep(0.5)
        dead = next(proc for proc in procs if not proc.alive())
        _say(f"edgechat stack: {dead.name} exited ({dead.popen.returncode}):\n{dead.log_tail()}")
        return 1
    except KeyboardInterrupt:
        _say("\nstopping ...")
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:  # a part failed to start
        _say(f"edgechat stack: {exc}")
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        if sink is not None:
            sink.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if ns.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _print_alerts(notification: dict) -> None:
    for line in describe(notification):
        print(line, flush=True)
