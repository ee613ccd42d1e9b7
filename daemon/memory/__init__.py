"""Memory protection and leak diagnostics for one worker.

budget.py owns the memory budget (limit, usage against it, soft and hard levels; cgroup.py finds the
cgroup), watchdog.py frees and refuses turns under pressure, hygiene.py gives freed memory back after
each turn, census.py counts live objects and tensor bytes, tracing.py runs tracemalloc on demand.

May import: telemetry.labels and telemetry.process (readers), nothing else of the daemon. It reports
through listener Protocols (PressureListener, CensusListener) that telemetry.listeners implements.
"""
