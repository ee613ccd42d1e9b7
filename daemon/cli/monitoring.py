"""`edgechat render-rules` and `edgechat render-alertmanager`: monitoring config rendered at deploy time."""
from __future__ import annotations

import argparse
import os
import sys

from ..monitoring import alertmanager, fleet_rules, rules, shipping


def add_parsers(sub) -> None:
    """Register `render-rules` and `render-alertmanager`."""
    p = sub.add_parser("render-rules", help="render Prometheus recording and alert rules",
                       description="Render edgechat's Prometheus rule files from "
                                   "daemon/monitoring/thresholds.py.")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="F",
                   help="multiply every range window, `for` and guard by F (e.g. 0.01 for an "
                        "end-to-end test); 1 for production (default: %(default)s)")
    p.add_argument("--out", default=rules.RULES_DIR, metavar="DIR",
                   help="folder to write the device rule files to (default: %(default)s)")
    p.add_argument("--fleet-out", default=fleet_rules.FLEET_DIR, metavar="DIR",
                   help="folder to write the central fleet rule files to (vmalert's and the watcher's; "
                        "default: %(default)s)")
    p.set_defaults(func=run_rules)

    p = sub.add_parser("render-alertmanager", help="render the Alertmanager config with the webhook URL",
                       description="Fill the webhook URL into deploy/alertmanager/alertmanager.yml.tmpl "
                                   f"(Alertmanager 0.25 reads no environment). URL from the flags, else "
                                   f"${alertmanager.URL_ENV}, else the file named by ${alertmanager.URL_FILE_ENV}.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--webhook-url", metavar="URL", help="the receiver's webhook URL")
    source.add_argument("--webhook-url-file", metavar="PATH", help="a file holding the webhook URL")
    p.add_argument("--heartbeat-url", metavar="URL", default=os.environ.get(alertmanager.HEARTBEAT_URL_ENV),
                   help=f"heartbeat URL for the EdgechatHeartbeat alert [env {alertmanager.HEARTBEAT_URL_ENV}] "
                        "(default: a null receiver)")
    p.add_argument("--template", default=None, metavar="PATH",
                   help=f"template to render (default: {os.path.relpath(alertmanager.TEMPLATE, alertmanager.REPO_ROOT)}"
                        f", or {os.path.relpath(alertmanager.FLEET_TEMPLATE, alertmanager.REPO_ROOT)} with --fleet)")
    p.add_argument("--fleet", action="store_true",
                   help="the fleet's config, for the clustered Alertmanager pair (docs/fleet.md)")
    p.add_argument("--out", metavar="FILE", help="write here (mode 0640, atomically) instead of stdout")
    p.set_defaults(func=run_alertmanager)
    add_device_parser(sub)


def add_device_parser(sub) -> None:
    """Register `render-device-prometheus`."""
    p = sub.add_parser("render-device-prometheus", help="render a fleet device's prometheus.yml",
                       description="Render the Prometheus config of one fleet device (docs/fleet.md): the "
                                   "shipped rules evaluated locally, alerts to both central Alertmanagers, "
                                   "the series budget remote-written to the local vmagent, labelled with the "
                                   "device, its site and its cohort (version, model).")
    p.add_argument("--device", required=True, help="the device's name (its `device` label)")
    p.add_argument("--site", required=True, help="the device's site (its `site` label)")
    p.add_argument("--model", required=True, help="the served model name (EDGECHAT_MODEL)")
    p.add_argument("--version", help="the edgechat version (default: the installed one)")
    p.add_argument("--alertmanager", action="append", required=True, metavar="HOST:PORT",
                   help="a central Alertmanager (give both of the pair)")
    p.add_argument("--ca-file", help="CA of the Alertmanagers' TLS certificate (TLS when given)")
    p.add_argument("--username", help="basic-auth user for the Alertmanagers")
    p.add_argument("--password-file", help="file holding that user's password")
    p.add_argument("--vmagent-url", default="http://127.0.0.1:8429/api/v1/write",
                   help="the local vmagent's remote-write URL (default: %(default)s)")
    p.add_argument("--metrics-key-file", help="bearer token file for the daemon's /metrics, when it has a key")
    p.add_argument("--rules-dir", default="/etc/prometheus/rules", help="where the rule files are installed "
                                                                         "(default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=run_device)


def run_device(ns: argparse.Namespace) -> int:
    """Print or write a device's prometheus.yml."""
    import importlib.metadata
    version = ns.version
    if not version:
        try:
            version = importlib.metadata.version("edgechat")
        except importlib.metadata.PackageNotFoundError:
            print("edgechat render-device-prometheus: edgechat is not installed: pass --version", file=sys.stderr)
            return 2
    try:
        config = shipping.device_prometheus_config(
            shipping.Device(site=ns.site, version=version, model=ns.model, device=ns.device,
                            vmagent_url=ns.vmagent_url, metrics_key_file=ns.metrics_key_file,
                            rule_files=tuple(os.path.join(ns.rules_dir, name)
                                             for name in (rules.RECORDING_FILE, rules.ALERTS_FILE))),
            shipping.Uplink(tuple(ns.alertmanager), ns.ca_file, ns.username, ns.password_file))
    except ValueError as exc:  # basic auth without a password file
        print(f"edgechat render-device-prometheus: {exc}", file=sys.stderr)
        return 2
    text = "# Generated by `edgechat render-device-prometheus` (docs/fleet.md); do not edit.\n" + shipping.dump(config)
    if ns.out:
        with open(ns.out, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(ns.out)
    else:
        sys.stdout.write(text)
    return 0


def run_rules(ns: argparse.Namespace) -> int:
    """Write the rule files and list them."""
    try:
        paths = rules.write(ns.out, ns.time_scale) + fleet_rules.write(ns.fleet_out, ns.time_scale)
    except ValueError as exc:  # a time scale of 0 or one shrinking a window below 1 ms
        print(f"edgechat render-rules: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def run_alertmanager(ns: argparse.Namespace) -> int:
    """Render the Alertmanager config to a file or stdout."""
    try:
        url = alertmanager.resolve_url(ns.webhook_url, ns.webhook_url_file)
        template = ns.template or (alertmanager.FLEET_TEMPLATE if ns.fleet else alertmanager.TEMPLATE)
        text = alertmanager.render(url, ns.heartbeat_url, template)
    except alertmanager.WebhookURLError as exc:
        print(f"edgechat render-alertmanager: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the template is missing (installed without the repository's deploy/)
        print(f"edgechat render-alertmanager: cannot read template {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return 2
    if ns.out:
        alertmanager.write(ns.out, text)
        print(ns.out)
    else:
        sys.stdout.write(text)
    return 0
