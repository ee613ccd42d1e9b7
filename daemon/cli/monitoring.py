"""`edgechat render-rules` and `edgechat render-alertmanager`: monitoring config rendered at deploy time."""
from __future__ import annotations

import argparse
import os
import sys

from ..monitoring import alertmanager, fleet_rules, rules


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
