"""Telemetry, a leaf: label value sets, metric definitions, the listeners that feed them, the sampler.

labels.py (bounded label values, imported by sessions, model and memory), metrics.py (every metric,
defined once), listeners.py (Recorder: implements the producers' listener Protocols), sampler.py (process,
memory, GC and tracemalloc gauges on a timer), process.py and gcstats.py (readers), multiproc.py (the
prometheus_client multiprocess folder under gunicorn).

Imports nothing of the daemon but its own modules: the memory budget is handed to the sampler as a
callable, never imported from memory/. Nothing here imports torch.
"""
