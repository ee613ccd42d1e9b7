"""Device traces (traces.py) written out: OpenMetrics for a TSDB backfill, promtool's input series."""
from __future__ import annotations

import numpy as np
from simulate import INSTANCE, JOB, STALE, STEP, encode
from traces import TIME_VALUED, Trace


def openmetrics(trace: Trace, t0: int, labels: dict[str, str] | None = None):
    """The trace as OpenMetrics sample lines, one string per series (no `# EOF`), for
    `promtool tsdb create-blocks-from openmetrics`; `t0` is the Unix time of its first scrape."""
    base = {"job": JOB, "instance": INSTANCE, "device": trace.truth.device, **(labels or {})}
    for s in trace.series:
        head = s.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted({**base, **s.labels}.items())) + "} "
        keep = ~np.isnan(s.values)
        stamps = t0 + (s.at + np.flatnonzero(keep)) * STEP
        values = s.values[keep] + (t0 if s.name in TIME_VALUED else 0)
        yield "".join(f"{head}{v:.0f} {ts}\n" for v, ts in zip(values.tolist(), stamps.tolist()))


def promtool_series(trace: Trace, steps: int | None = None) -> list[dict]:
    """The trace's first `steps` scrapes as promtool input_series (its time starts at 0): a staleness
    marker where a scrape has no sample after one that had, as Prometheus writes for a failed scrape."""
    n = min(steps or trace.steps, trace.steps)
    out = []
    for s in trace.series:
        values: list = [None] * n
        seen = False
        for k in range(s.at, min(n, s.at + len(s.values))):
            v = s.values[k - s.at]
            if np.isnan(v):
                values[k] = STALE if seen else None
                seen = False
            else:
                values[k], seen = float(v), True
        if s.at + len(s.values) < n and seen:
            values[s.at + len(s.values)] = STALE
        if not any(v is not None and v != STALE for v in values):
            continue
        labels = {"job": JOB, "instance": INSTANCE, "device": trace.truth.device, **s.labels}
        key = s.name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        out.append({"series": key, "values": encode(values)})
    return out
