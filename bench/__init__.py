"""Benchmarks that print ratios against a same-run baseline (not tests; see docs/benchmarks.md)."""
