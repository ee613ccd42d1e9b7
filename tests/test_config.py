"""Config: env vars and flags, validation naming the setting, generated docs kept current."""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from daemon import config as cfgmod
from daemon.cli import flags
from daemon.config import Config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_env_and_flags_flags_win(runner):
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    ns = parser.parse_args(["--port", "9001", "--api-keys", "a,b", "--no-warmup"])
    cfg = flags.from_args(ns, {"EDGECHAT_PORT": "9000", "EDGECHAT_LEAK_MODE": "history",
                                "EDGECHAT_MAX_HISTORY_TURNS": "0"})
    assert cfg.port == 9001 and cfg.api_keys == ("a", "b") and cfg.warmup is False
    assert cfg.leak_mode == "history" and cfg.max_history_turns == 0


def test_every_field_round_trips_through_env():
    cfg = Config(leak_mode="tensors", session_ttl_s=5.5, tracemalloc=True, cors_origins=("a", "b"))
    assert Config.from_env(cfgmod.to_env(cfg)) == cfg


@pytest.mark.parametrize("env,setting", [
    ({"EDGECHAT_DTYPE": "float16"}, "dtype"),
    ({"EDGECHAT_LEAK_MODE": "yes"}, "leak_mode"),
    ({"EDGECHAT_PORT": "http"}, "port"),
    ({"EDGECHAT_PORT": "70000"}, "port"),
    ({"EDGECHAT_WORKERS": "0"}, "workers"),
    ({"EDGECHAT_MAX_HISTORY_TURNS": "-1"}, "max_history_turns"),
    ({"EDGECHAT_SESSION_TTL_S": "soon"}, "session_ttl_s"),
    ({"EDGECHAT_GENERATION_TIMEOUT_S": "0"}, "generation_timeout_s"),
    ({"EDGECHAT_WARMUP": "maybe"}, "warmup"),
    ({"EDGECHAT_LOG_FORMAT": "xml"}, "log_format"),
    ({"EDGECHAT_METRICS_PATH": "metrics"}, "metrics_path"),
    ({"EDGECHAT_MIN_NEW_TOKENS": "600"}, "min_new_tokens"),
    ({"EDGECHAT_API_KEYS": "a b"}, "api_keys"),
])
def test_invalid_values_name_the_setting(env, setting):
    with pytest.raises(ValueError, match=setting):
        Config.from_env(env)


def test_serve_rejects_bad_config_before_starting(runner):
    code, _, err = runner("serve", "--dtype", "float16")
    assert code == 2 and "dtype" in err
    code, _, err = runner("serve", "--model", "/no/such/folder")
    assert code == 2 and "model" in err and "builtin:tiny" in err


def test_defaults_match_the_brief():
    cfg = Config.from_env({})
    assert (cfg.model, cfg.dtype, cfg.host, cfg.port, cfg.workers) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "auto", "127.0.0.1", 8000, 1)
    assert (cfg.max_history_turns, cfg.session_ttl_s, cfg.max_sessions, cfg.max_new_tokens,
            cfg.leak_mode, cfg.api_keys) == (5, 600.0, 1000, 512, "off", ())


def test_every_field_is_documented():
    for f in dataclasses.fields(Config):
        assert f.metadata.get("help"), f.name


def test_readme_config_table_is_current():
    readme = (ROOT / "README.md").read_text()
    table = cfgmod.markdown_table()
    assert table in readme, "README table is stale: python -m daemon.config table"


def test_env_example_lists_every_setting():
    text = (ROOT / "deploy" / "edgechat.env.example").read_text()
    assert text == cfgmod.env_example(), "regenerate: python -m daemon.config env-example"
    names = set(re.findall(r"^#(EDGECHAT_[A-Z_]+)=", text, re.M))
    assert names == {cfgmod.ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("runtime", [True, False])
def test_metrics_folder_default_is_one_per_state_folder(monkeypatch, tmp_path, runtime):
    if runtime:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    a, b = (Config(state_dir=str(tmp_path / name)) for name in ("a", "b"))
    assert a.metrics_dir != b.metrics_dir
    assert Config(state_dir=str(tmp_path / "a")).metrics_dir == a.metrics_dir  # stable
    parent = tmp_path / "run" / "edgechat" if runtime else tmp_path / "a"
    assert os.path.dirname(a.metrics_dir) == str(parent)
    assert Config(state_dir=str(tmp_path / "a"), metrics_dir="/elsewhere").metrics_dir == "/elsewhere"


def test_a_held_metrics_folder_is_refused_naming_both_daemons(tmp_path):
    from daemon.telemetry import multiproc
    folder = tmp_path / "metrics"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from daemon.telemetry.multiproc import claim_dir\n"
        f"claim_dir({str(folder)!r}, 'the first daemon'); print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(multiproc.FolderHeld, match="the first daemon.*the second daemon"):
            multiproc.claim_dir(str(folder), "the second daemon")
    finally:
        holder.stdin.close()
        holder.wait(10)
    multiproc.claim_dir(str(folder), "the second daemon")  # free once the first has gone
    os.close(multiproc._claims.pop(str(folder.resolve())))
