"""Soak results: the per-turn CSV format, the before/after markdown table, and the plot."""
from __future__ import annotations

import csv
from dataclasses import dataclass

from .memsample import MB

FIELDS = ("label", "turn", "session", "session_turn", "outcome", "latency_s", "prompt_tokens",
          "completion_tokens", "history_messages", "rss_bytes", "uss_bytes", "service_bytes",
          "limit_bytes", "pids", "elapsed_s")
LATENCY_AT = 20     # "mean latency at turn 20"
MEMORY_AFTER = 30   # "memory after 30 turns"


class MissingMatplotlib(RuntimeError):
    """The plot needs matplotlib, an optional extra."""


@dataclass(frozen=True)
class Run:
    """One soak run: its label and its rows (row 0 is the sample before the first turn)."""

    label: str
    rows: list[dict]

    @property
    def sessions(self) -> int:
        """How many conversations the turns went round-robin over."""
        return max([int(r["session"]) for r in self.rows] + [1])

    def turns(self) -> list[dict]:
        """The rows of real turns (without the initial sample)."""
        return [r for r in self.rows if int(r["turn"]) > 0]


def read_csv(path: str) -> Run:
    """Load a CSV written by `edgechat soak`."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "rss_bytes" not in rows[0]:
        raise ValueError(f"{path} is not a soak CSV (no rows or no rss_bytes column)")
    return Run(rows[0]["label"], rows)


def _num(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def _mem(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / MB / 1024:.2f} GB" if value >= 1024 * MB else f"{value / MB:.0f} MB"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def memory_after(run: Run, turns: int = MEMORY_AFTER) -> tuple[float | None, int]:
    """RSS after `turns` turns of every conversation (or after the last turn); returns (bytes, turns done)."""
    target = turns * run.sessions
    rows = [r for r in run.turns() if int(r["turn"]) <= target and _num(r["rss_bytes"]) is not None]
    if not rows:
        return None, 0
    return _num(rows[-1]["rss_bytes"]), int(rows[-1]["turn"]) // run.sessions


def at_turn(run: Run, column: str, session_turn: int = LATENCY_AT) -> float | None:
    """Mean of a column over the conversations' turn number `session_turn` (successful turns only)."""
    return _mean([v for r in run.turns() if int(r["session_turn"]) == session_turn and r["outcome"] == "ok"
                  and (v := _num(r[column])) is not None])


def verdict(run: Run) -> str:
    """Whether the daemon crashed (went down, lost sessions, workers replaced) or degraded (rejections, errors)."""
    problems = []
    down = [r for r in run.turns() if r["outcome"] in ("down", "lost")]
    pids = [r["pids"] for r in run.rows if r["pids"]]
    restarted = next((r for r, prev in zip(run.rows[1:], run.rows) if r["pids"] and prev["pids"]
                      and r["pids"] != prev["pids"]), None)
    if down or restarted is not None:
        first = min([int(r["turn"]) for r in down] + ([int(restarted["turn"])] if restarted else []))
        problems.append(f"crashed at turn {first} (" + ("worker restarted" if restarted is not None and
                                                        int(restarted["turn"]) == first else "daemon down") + ")")
    bad = [r for r in run.turns() if r["outcome"] in ("rejected", "error")]
    if bad:
        problems.append(f"degraded: {len(bad)} turn(s) rejected or failed")
    if not pids and not problems:
        return "unknown (no memory samples)"
    return "; ".join(problems) or "no"


def _limit(runs: list[Run]) -> str:
    limits = {int(float(r["limit_bytes"])) for run in runs for r in run.rows if r["limit_bytes"]}
    return "limit " + "/".join(_mem(v) for v in sorted(limits)) if limits else "limit unknown"


def markdown_table(runs: list[Run]) -> str:
    """The before/after table for these runs, one column per run."""
    header = "| measure | " + " | ".join(run.label for run in runs) + " |"
    rows = [header, "|" + " --- |" * (len(runs) + 1)]

    def add(name: str, cells: list[str]) -> None:
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    add("initial memory (RSS)", [_mem(_num(run.rows[0]["rss_bytes"])) for run in runs])
    cells = []
    for run in runs:
        value, done = memory_after(run)
        cells.append(_mem(value) + ("" if done >= MEMORY_AFTER else f" (after {done})"))
    add(f"memory after {MEMORY_AFTER} turns", cells)
    add("peak memory", [_mem(max((v for r in run.rows if (v := _num(r["rss_bytes"])) is not None),
                                 default=None)) for run in runs])
    add(f"mean latency at turn {LATENCY_AT}",
        [("n/a" if (v := at_turn(run, "latency_s")) is None else f"{v:.2f} s") for run in runs])
    add(f"prompt tokens at turn {LATENCY_AT}",
        [("n/a" if (v := at_turn(run, "prompt_tokens")) is None else f"{v:.0f}") for run in runs])
    add(f"crashed or degraded ({_limit(runs)})", [verdict(run) for run in runs])
    return "\n".join(rows) + "\n"


def require_matplotlib():
    """Import matplotlib with a headless backend, or explain how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("the plot needs matplotlib: pip install 'edgechat[soak]' "
                                "(or pip install matplotlib), or leave out --png") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(runs: list[Run], path: str) -> None:
    """RSS, latency and prompt tokens against turn, every run on the same axes."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    panels = (("rss_bytes", "RSS (MB)", 1 / MB), ("latency_s", "turn latency (s)", 1.0),
              ("prompt_tokens", "prompt tokens", 1.0))
    for ax, (column, title, scale) in zip(axes, panels):
        for run in runs:
            points = [(int(r["turn"]), v * scale) for r in run.rows if (v := _num(r[column])) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=run.label)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    axes[0].set_title("edgechat soak: " + " vs ".join(run.label for run in runs) + f" ({_limit(runs)})")
    axes[-1].set_xlabel("turn")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
