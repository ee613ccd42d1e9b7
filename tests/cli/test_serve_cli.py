"""`edgechat serve` for an operator: --help with real defaults, --version, secrets from files, a
fast failure offline, the torch wheel index reaching pip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

from daemon.config import Config, to_env
from support import REPO_ROOT

ROOT = REPO_ROOT


def test_help_shows_real_defaults_choices_booleans_and_groups(runner):
    code, out, _ = runner("serve", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "TCP port to listen on. (default: 8000;" in flat
    assert "(default: None" not in flat
    assert "--log-format {text,json}" in flat and "--dtype {auto,float32,bfloat16}" in flat
    assert "--warmup, --no-warmup" in flat
    for group in ("model settings:", "server settings:", "security settings:", "observability settings:"):
        assert group in out


def test_version(runner):
    from daemon import __version__
    code, out, _ = runner("--version")
    assert code == 0 and out.strip() == f"edgechat {__version__}"


def test_boolean_flags(runner, monkeypatch):
    import argparse

    from daemon.cli import flags
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    assert flags.from_args(parser.parse_args(["--no-warmup"]), {}).warmup is False
    assert flags.from_args(parser.parse_args([]), {"EDGECHAT_WARMUP": "false"}).warmup is False
    assert flags.from_args(parser.parse_args(["--warmup"]), {"EDGECHAT_WARMUP": "false"}).warmup


def test_secrets_from_files_and_credentials_directory(tmp_path):
    (tmp_path / "keys").write_text("k1\nk2\n")
    (tmp_path / "admin").write_text("s3cret\n")
    cfg = Config.from_env({"EDGECHAT_API_KEYS_FILE": str(tmp_path / "keys"),
                           "EDGECHAT_ADMIN_KEY_FILE": str(tmp_path / "admin")})
    assert cfg.api_keys == ("k1", "k2") and cfg.admin_key == "s3cret"
    env = to_env(cfg)
    assert "EDGECHAT_API_KEYS" not in env and "EDGECHAT_ADMIN_KEY" not in env
    assert "k1" not in json.dumps(env) and "s3cret" not in json.dumps(env)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_keys").write_text("from-systemd")
    assert Config.from_env({"CREDENTIALS_DIRECTORY": str(creds)}).api_keys == ("from-systemd",)
    with pytest.raises(ValueError, match="api_keys and api_keys_file"):
        Config.from_env({"EDGECHAT_API_KEYS": "a", "EDGECHAT_API_KEYS_FILE": str(tmp_path / "keys")})
    with pytest.raises(ValueError, match="admin_key_file"):
        Config.from_env({"EDGECHAT_ADMIN_KEY_FILE": str(tmp_path / "missing")})


def test_every_secret_has_a_file_setting():
    import dataclasses

    from daemon.config import SECRETS
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(SECRETS) >= {"api_keys", "admin_key"}
    assert all(name + "_file" in names for name in SECRETS)


def test_offline_without_the_model_fails_fast(tmp_path):
    """Not cached, hub unreachable: the existing message, at once (a closed local port stands in
    for the hub, so the test never waits for DNS)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGECHAT_", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed}",
               EDGECHAT_LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "daemon", "serve", "--model", "someorg/some-model",
                           "--cache-dir", str(tmp_path / "cache")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert any("cannot be reached" in line["msg"] and "builtin:tiny" in line["msg"] for line in lines)


@pytest.mark.parametrize("index", ["", "http://wheels.invalid/cpu"])
def test_torch_index_reaches_pip(tmp_path, index):
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "venv", f"VENV={tmp_path}/venv",
                          f"TORCH_INDEX={index}"], capture_output=True, text=True, check=True).stdout
    pip_lines = [line for line in out.splitlines() if "/bin/pip install" in line]
    if index:
        assert f"--index-url {index} 'torch==" in pip_lines[0]
    else:
        assert not any("--index-url" in line for line in pip_lines)
    assert "-e '.[test,soak]'" in pip_lines[-1]
