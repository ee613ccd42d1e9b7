"""Small functions that turn thresholds into PromQL and rule-file text, shared by the rule modules."""
from __future__ import annotations

import dataclasses

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def duration(seconds: float) -> str:
    """Render seconds as a Prometheus duration ("1h30m", "36s", "600ms"); refuses what rounds to 0 ms."""
    ms = round(seconds * 1000)
    if seconds == 0:
        return "0s"
    if ms < 1:
        raise ValueError(f"duration {seconds!r}s is not a positive multiple of Prometheus's 1 ms resolution")
    parts = []
    for unit, size in _UNITS:
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def number(value: float) -> str:
    """Render a PromQL number literal without float noise (14400, 144, 0.05)."""
    return f"{value:.12g}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One recording or alerting rule: the mapping Prometheus reads, plus a YAML comment above it."""

    comment: str
    body: dict


@dataclasses.dataclass(frozen=True)
class Group:
    """A rule group as it appears in a rule file."""

    name: str
    rules: list[Rule]
    interval: float = 0          # seconds between evaluations; 0 = Prometheus's evaluation_interval
