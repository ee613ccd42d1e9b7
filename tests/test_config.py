"""Config: env vars and flags, validation naming the setting, generated docs kept current."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re

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
