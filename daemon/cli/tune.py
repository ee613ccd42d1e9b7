"""`edgechat tune`: time the decode paths on this CPU again and cache the fastest (serve reads it)."""
from __future__ import annotations

import argparse
import json

from .flags import add_arguments, from_args


def add_parsers(sub) -> None:
    """Register `tune` with serve's flags (the model, dtype, quantize, kernel, threads, cache_dir)."""
    p = sub.add_parser("tune", help="time the decode paths on this CPU and cache the fastest",
                       description="Time every decode path the settings allow (dtype=auto, "
                                   "kernel=auto, quantize=auto widen the choice) for a few decode steps, "
                                   "print the timings and cache the fastest in cache_dir/tune, where "
                                   "`edgechat serve` finds it. Run it after changing the CPU quota.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Tune (never reading the cache), print the choice as JSON."""
    from transformers import AutoConfig

    from ..model.builtin import ensure_built, is_builtin
    from ..model.cpu import set_threads
    from ..model.tune import for_config

    cfg = from_args(args)
    threads = set_threads(cfg.threads)
    path = ensure_built(cfg.model, cfg.cache_dir, log=print) if is_builtin(cfg.model) else cfg.model
    choice = for_config(cfg, path, AutoConfig.from_pretrained(path), threads, print, retune=True)
    print(json.dumps({"dtype": choice.dtype, "quantize": choice.quantize, "kernel": choice.kernel,
                      "chosen": choice.source, "step_ms": choice.step_ms}))
    return 0
