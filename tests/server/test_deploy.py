"""Deployment files: gunicorn config (parsed and served by real gunicorn), systemd unit (systemd-analyze),
Dockerfile and compose (structure, mounted paths, scrape targets, promtool), and the local stack."""
from __future__ import annotations

import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from daemon.server.options import gunicorn_options
from daemon.config import Config
from daemon.monitoring.thresholds import Thresholds
from support import REPO_ROOT
from support.processes import track
from support.servers import free_port, wait_for, wait_http

ROOT = str(REPO_ROOT)
DEPLOY = os.path.join(ROOT, "deploy")
GUNICORN_CONF = os.path.join(DEPLOY, "gunicorn.conf.py")
UNIT = os.path.join(DEPLOY, "edgechat.service")
VENV_BIN = os.path.dirname(sys.executable)
HOOKS = ("on_starting", "when_ready", "post_fork", "child_exit", "worker_int")


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGECHAT_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(extra)
    return env


# --- gunicorn ------------------------------------------------------------------------------------

def test_gunicorn_conf_gives_gunicorn_what_edgechat_serve_gives(monkeypatch):
    for key in [k for k in os.environ if k.startswith("EDGECHAT_")]:
        monkeypatch.delenv(key)
    env = {"EDGECHAT_PORT": "9123", "EDGECHAT_WORKERS": "2", "EDGECHAT_WORKER_THREADS": "3",
           "EDGECHAT_GENERATION_TIMEOUT_S": "300", "EDGECHAT_MAX_REQUESTS": "500",
           "EDGECHAT_MAX_REQUESTS_JITTER": "50", "EDGECHAT_LOG_LEVEL": "WARNING"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    conf = runpy.run_path(GUNICORN_CONF)
    expected = gunicorn_options(Config.from_env())
    assert conf["wsgi_app"] == "daemon:create_app()"
    assert conf["worker_class"] == "daemon.server.worker.EdgeWorker"  # reads requests under deadlines
    settings = Config.from_env()  # a thread for each turn the model holds (batch + line), worker_threads more
    assert conf["threads"] == settings.worker_threads + settings.queue_limit + settings.max_batch
    assert conf["timeout"] > 300, "the worker timeout must cover the longest generation"
    assert (conf["max_requests"], conf["max_requests_jitter"]) == (500, 50)
    for key, value in expected.items():
        if key in conf or value is not None:  # accesslog=None is gunicorn's default, left out of the file
            assert conf[key] == value, key
    from daemon.server import hooks as server_hooks
    for hook in HOOKS:
        assert conf[hook] is getattr(server_hooks, hook)
    assert not conf.get("preload_app"), "the master must not load the model (fork after torch hangs)"


def test_gunicorns_own_loader_accepts_the_config(monkeypatch, tmp_path):
    from gunicorn.app.wsgiapp import WSGIApplication
    for key in [k for k in os.environ if k.startswith("EDGECHAT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EDGECHAT_PORT", "9124")
    monkeypatch.setattr(sys, "argv", ["gunicorn", "-c", GUNICORN_CONF])
    cfg = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]").cfg  # reads and validates, loads no app
    assert cfg.address == [("127.0.0.1", 9124)]
    assert cfg.worker_class_str == "daemon.server.worker.EdgeWorker"
    from daemon.server.worker import EdgeWorker
    assert cfg.worker_class is EdgeWorker  # gunicorn resolves it (in the master: no torch imported)
    assert cfg.settings["wsgi_app"].get() == "daemon:create_app()"
    assert cfg.control_socket_disable is True
    from daemon.server import hooks as server_hooks
    for hook in HOOKS:
        assert getattr(cfg, hook) is getattr(server_hooks, hook), hook


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_gunicorn_conf_serves_the_daemon_and_stops_cleanly(tmp_path, cache_dir):
    port = free_port()
    env = _clean_env(EDGECHAT_MODEL="builtin:tiny", EDGECHAT_PORT=str(port), EDGECHAT_CACHE_DIR=cache_dir,
                     EDGECHAT_STATE_DIR=str(tmp_path / "state"), EDGECHAT_METRICS_DIR=str(tmp_path / "metrics"),
                     EDGECHAT_THREADS="1", EDGECHAT_WORKERS="2", EDGECHAT_WARMUP="false")
    with open(tmp_path / "gunicorn.log", "wb") as log:
        proc = track(subprocess.Popen([os.path.join(VENV_BIN, "gunicorn"), "-c", GUNICORN_CONF], env=env,
                                      cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", 180, proc)
            turn = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert turn.status_code == 200
            # the hooks ran: multiprocess metrics in the configured folder, one memory series per worker
            assert os.listdir(tmp_path / "metrics")
            pids = set()
            for _ in range(120):  # the second worker may still be loading its model
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                pids = set(re.findall(r'^edgechat_process_resident_memory_bytes\{pid="(\d+)"\}', text, re.M))
                if len(pids) == 2:
                    break
                assert proc.poll() is None, "gunicorn exited"
                time.sleep(0.5)
            assert len(pids) == 2, text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(90) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# --- systemd --------------------------------------------------------------------------------------

def parse_unit(path: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit file -> {section: [(key, value), ...]} (keys may repeat, as Environment= does)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), [])
                continue
            key, sep, value = line.partition("=")
            assert sep and current is not None, f"not a key=value line in a section: {line!r}"
            current.append((key.strip(), value.strip()))
    return sections


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def test_systemd_unit_is_valid_for_systemd(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (the structural test still runs)")
    # verify checks that ExecStart exists: point it at this venv's edgechat instead of /opt/edgechat
    text = open(UNIT, encoding="utf-8").read()
    assert "ExecStart=/opt/edgechat/.venv/bin/edgechat serve" in text
    copy = tmp_path / "edgechat.service"
    copy.write_text(text.replace("/opt/edgechat/.venv/bin/edgechat", os.path.join(VENV_BIN, "edgechat")))
    out = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # systemd only warns about unknown keys or unparsable values; both would silently drop a setting
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 0 and complaints == [], complaints


def test_systemd_unit_has_the_edge_device_settings():
    unit = parse_unit(UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    one = {k: v for k, v in service}
    env = dict(v.split("=", 1) for k, v in service if k == "Environment")
    assert one["User"] not in ("root", "0") and one["User"] == one["Group"]
    assert one["EnvironmentFile"] == "/etc/edgechat/edgechat.env"
    assert one["ExecStart"].endswith("/.venv/bin/edgechat serve")
    assert (one["StateDirectory"], one["CacheDirectory"], one["RuntimeDirectory"]) == ("edgechat",) * 3
    assert env["EDGECHAT_STATE_DIR"] == "%S/edgechat" and env["EDGECHAT_CACHE_DIR"] == "%C/edgechat"
    assert env["HF_HOME"].startswith("%C/edgechat/"), "the model cache lives in the CacheDirectory"
    assert env["EDGECHAT_METRICS_DIR"].startswith("%t/edgechat/"), "metrics files live in the RuntimeDirectory"
    fields = {f"EDGECHAT_{name.upper()}" for name in Config.__dataclass_fields__}
    assert {k for k in env if k.startswith("EDGECHAT_")} <= fields
    assert _size(one["MemoryHigh"]) < _size(one["MemoryMax"]) <= 2 << 30
    assert one["Restart"] == "on-failure"
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "ProtectKernelTunables": "yes", "RestrictSUIDSGID": "yes"}.items():
        assert one.get(key) == value, key
    # stop: in-flight turns get the daemon's graceful timeout before systemd kills
    assert int(one["TimeoutStopSec"]) > Config.__dataclass_fields__["graceful_timeout_s"].default
    assert one["KillMode"] == "mixed"
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"


# --- Docker ---------------------------------------------------------------------------------------

def _dockerfile() -> list[list[tuple[str, str]]]:
    """deploy/Dockerfile as stages (each from its FROM), each a list of (instruction, argument)."""
    text = open(os.path.join(DEPLOY, "Dockerfile"), encoding="utf-8").read().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            op, arg = line.strip().split(None, 1)
            if op == "FROM":
                stages.append([])
            stages[-1].append((op, arg))
    return stages


COMPILERS = {"g++", "gcc", "c++", "clang", "clang++", "build-essential", "cpp"}


def _compilers(runs: str) -> set[str]:
    return COMPILERS & set(runs.split())


def test_dockerfile_builds_the_wheel_with_a_compiler_and_runs_it_without():
    builder, image = _dockerfile()
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert image[0] == ("FROM", "python:3.11-slim"), "the same base: the wheel's Python and glibc"
    built = " ".join(arg for op, arg in builder if op == "RUN")
    assert "apt-get install" in built and _compilers(built)
    assert re.search(r"pip wheel .*--no-deps .*--wheel-dir /wheels \.$", built), built
    # the builder gets every file the wheel is built from (the sdist's own list: MANIFEST.in, setup.py)
    copied = {src.rstrip("/") for op, arg in builder if op == "COPY" for src in arg.split()[:-1]}
    assert copied == {"pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "daemon"}
    runs = " ".join(arg for op, arg in image if op == "RUN")
    assert not _compilers(runs) and "apt-get" not in runs, "no compiler in the image"
    assert ("COPY", "--from=builder /wheels /tmp/wheels") in image
    assert "pip install /tmp/wheels/edgechat-*.whl" in runs
    # the build fails unless the packaged kernels load in the image
    assert "kernels.load(" in runs and "'packaged'" in runs


def test_dockerfile_structure():
    steps = _dockerfile()[-1]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    args = dict(arg.split("=", 1) for op, arg in steps if op == "ARG")
    pinned = re.search(r"torch==([\w.]+)", open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8").read()).group(1)
    assert args["TORCH_VERSION"] == pinned, "the image's torch must be setup.cfg's pin"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs and "torch==${TORCH_VERSION}" in runs
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [op for op, _ in steps].index("USER") > max(i for i, (op, _) in enumerate(steps) if op == "RUN")
    assert dict(steps)["CMD"] == '["edgechat", "serve"]'
    assert "EDGECHAT_HOST=0.0.0.0" in " ".join(arg for op, arg in steps if op == "ENV")
    ignore = open(os.path.join(DEPLOY, "Dockerfile.dockerignore"), encoding="utf-8").read().split()
    assert "**/*.so" in ignore, "a library built in a checkout must not enter the image"
    for stage in _dockerfile():
        for op, arg in stage:
            if op == "COPY" and not arg.startswith("--from="):
                for src in arg.split()[:-1]:
                    assert os.path.exists(os.path.join(ROOT, src)), src
                    assert f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], f"{src} is excluded from the context"


def _compose() -> dict:
    with open(os.path.join(DEPLOY, "docker-compose.yml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_compose_services_and_every_mounted_path_exist():
    compose = _compose()
    services = compose["services"]
    assert {"edgechat", "prometheus", "alertmanager", "grafana", "node-exporter"} <= set(services)
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert os.path.exists(os.path.join(DEPLOY, source)), f"{name}: {source} missing"
            elif source.startswith("/"):
                assert name == "node-exporter", f"{name} mounts host path {source}"
            else:
                assert source in named, f"{name}: volume {source} not declared"
        build = svc.get("build")
        if build:
            assert os.path.isfile(os.path.join(DEPLOY, build["context"], build["dockerfile"]))
        for dep in svc.get("depends_on", {}):
            assert dep in services
    # the renderer reads the template from the mounted folder
    renderer = services["alertmanager-config"]
    assert "/templates/alertmanager.yml.tmpl" in " ".join(renderer["command"])
    assert os.path.isfile(os.path.join(DEPLOY, "alertmanager", "alertmanager.yml.tmpl"))
    assert services["grafana"]["environment"]["PROMETHEUS_URL"] == "http://prometheus:9090"


def test_compose_scrape_targets_name_compose_services(tmp_path):
    services = _compose()["services"]
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    in_container = config_flag.split("=", 1)[1]
    source = next(v.split(":")[0] for v in services["prometheus"]["volumes"] if v.split(":")[1] == in_container)
    scrape_file = os.path.join(DEPLOY, source)
    with open(scrape_file, encoding="utf-8") as handle:
        cfg = yaml.safe_load(handle)
    targets = [t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    targets += [t for am in cfg["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    for target in targets:
        host = target.split(":")[0]
        assert host in services, f"{target} is not a compose service"
    assert Thresholds().job in [job["job_name"] for job in cfg["scrape_configs"]]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    # as mounted: the file at /etc/prometheus/prometheus.yml, the repo's rules beside it
    shutil.copy(scrape_file, tmp_path / "prometheus.yml")
    shutil.copytree(os.path.join(ROOT, "prometheus", "rules"), tmp_path / "rules")
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- local stack ----------------------------------------------------------------------------------

def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_stack_starts_and_stops_cleanly_on_ctrl_c(tmp_path, cache_dir):
    from support.stack import ALERTMANAGER, PROMETHEUS
    if PROMETHEUS is None or ALERTMANAGER is None:
        pytest.skip("needs Debian's prometheus and prometheus-alertmanager")
    ports = {name: free_port() for name in ("port", "prometheus-port", "alertmanager-port", "sink-port")}
    cmd = [sys.executable, "-m", "daemon", "stack", "--time-scale", "0.01", "--scrape-interval", "1"]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    cmd += ["--", "--cache-dir", cache_dir, "--threads", "1", "--no-warmup"]
    err = open(tmp_path / "stack.err", "w+")
    proc = track(subprocess.Popen(cmd, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=err,
                                  start_new_session=True))
    try:
        wait_http(f"http://127.0.0.1:{ports['port']}/readyz", 180, proc)
        prom = f"http://127.0.0.1:{ports['prometheus-port']}"
        for _ in range(120):  # the first scrape comes within a scrape interval (1 s) of start
            targets = requests.get(prom + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            if [t["health"] for t in targets] == ["up"]:
                break
            assert proc.poll() is None, "edgechat stack exited"
            time.sleep(0.5)
        assert [t["labels"]["instance"] for t in targets] == [f"127.0.0.1:{ports['port']}"]
        assert [t["health"] for t in targets] == ["up"]
        ams = requests.get(prom + "/api/v1/alertmanagers", timeout=5).json()["data"]["activeAlertmanagers"]
        assert [a["url"] for a in ams] == [f"http://127.0.0.1:{ports['alertmanager-port']}/api/v2/alerts"]
        # the stack's own readiness checks may finish after ours: Ctrl-C once it says it is up
        wait_for(lambda: "Ctrl-C stops everything" in (tmp_path / "stack.err").read_text(), 120,
                 "the stack's banner")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    err.seek(0)
    log = err.read()
    assert "Ctrl-C stops everything" in log and "stopping" in log
    folder = re.search(r"^folder\s+(\S+)", log, re.M).group(1)
    assert not os.path.exists(folder), "the temporary folder was left behind"
    assert not [name for name, port in ports.items() if _port_open(port)], "a part of the stack still listens"
