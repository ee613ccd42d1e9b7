"""Renders the Alertmanager config from its template, with the webhook URL supplied at deploy time."""
from __future__ import annotations

import json
import os
import string
import tempfile
import urllib.parse

import yaml

URL_ENV = "EDGECHAT_ALERT_WEBHOOK_URL"
URL_FILE_ENV = "EDGECHAT_ALERT_WEBHOOK_URL_FILE"
HEARTBEAT_URL_ENV = "EDGECHAT_HEARTBEAT_WEBHOOK_URL"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(REPO_ROOT, "deploy", "alertmanager", "alertmanager.yml.tmpl")
EXAMPLE = os.path.join(REPO_ROOT, "deploy", "alertmanager", "alertmanager.example.yml")
# The fleet's config, for the clustered Alertmanager pair (docs/fleet.md).
FLEET_TEMPLATE = os.path.join(REPO_ROOT, "deploy", "fleet", "alertmanager.yml.tmpl")
FLEET_EXAMPLE = os.path.join(REPO_ROOT, "deploy", "fleet", "alertmanager.example.yml")
# The URL the committed example is rendered with (a local receiver, as in the end-to-end test).
EXAMPLE_URL = "http://127.0.0.1:9095/alerts"
WEBHOOK_RECEIVERS = ("webhook-critical", "webhook-warning", "webhook-info")


class WebhookURLError(ValueError):
    """No usable webhook URL was given; the message says where one can come from."""


def _check_url(url: str, origin: str) -> str:
    url = url.strip()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or any(c.isspace() for c in url):
        raise WebhookURLError(f"webhook URL from {origin} is not an http(s) URL: {url!r}")
    return url


def _read_url_file(path: str, origin: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:  # a missing or unreadable file is a deploy mistake to report, not a crash
        raise WebhookURLError(f"cannot read the webhook URL file {path!r} ({origin}): {exc.strerror}") from exc
    if not text.strip():
        raise WebhookURLError(f"the webhook URL file {path!r} ({origin}) is empty")
    return _check_url(text, f"file {path}")


def resolve_url(url: str | None = None, url_file: str | None = None, env: dict | None = None) -> str:
    """The webhook URL: argument, then file argument, then $EDGECHAT_ALERT_WEBHOOK_URL, then its _FILE."""
    env = os.environ if env is None else env
    if url:
        return _check_url(url, "--webhook-url")
    if url_file:
        return _read_url_file(url_file, "--webhook-url-file")
    if env.get(URL_ENV, "").strip():
        return _check_url(env[URL_ENV], f"${URL_ENV}")
    if env.get(URL_FILE_ENV, "").strip():
        return _read_url_file(env[URL_FILE_ENV], f"${URL_FILE_ENV}")
    raise WebhookURLError(f"no webhook URL: set {URL_ENV} (or {URL_FILE_ENV} to a file holding it), "
                          "or pass --webhook-url URL / --webhook-url-file PATH")


def render(webhook_url: str, heartbeat_url: str | None = None, template: str = TEMPLATE) -> str:
    """The Alertmanager config text for this webhook URL (and optional EdgechatHeartbeat heartbeat URL)."""
    url = _check_url(webhook_url, "the caller")
    heartbeat_configs = ""
    if heartbeat_url:
        heartbeat = _check_url(heartbeat_url, "the heartbeat URL")
        heartbeat_configs = f"webhook_configs: [{{url: {json.dumps(heartbeat)}, send_resolved: false}}]"
    with open(template, encoding="utf-8") as handle:
        text = string.Template(handle.read()).substitute(
            webhook_url=json.dumps(url), heartbeat_webhook_configs=heartbeat_configs)
    _verify(text, url, heartbeat_url)
    return text


def _verify(text: str, url: str, heartbeat_url: str | None) -> None:
    """Re-read the rendered YAML: each webhook receiver must carry exactly the URL given."""
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    for name in WEBHOOK_RECEIVERS:
        urls = [c["url"] for c in receivers[name].get("webhook_configs", [])]
        if urls != [url]:
            raise RuntimeError(f"template rendered receiver {name} with URLs {urls}, expected [{url!r}]")
    heartbeat = [c["url"] for c in receivers["heartbeat"].get("webhook_configs") or []]
    if heartbeat != ([heartbeat_url.strip()] if heartbeat_url else []):
        raise RuntimeError(f"template rendered the heartbeat receiver with URLs {heartbeat}")


def write(path: str, text: str) -> None:
    """Replace `path` atomically, readable by owner and group only (the URL may hold a token)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".alertmanager-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:  # whatever went wrong (even Ctrl-C), leave no partial file behind
        os.unlink(tmp)
        raise
