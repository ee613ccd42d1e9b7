"""The HTTP API, one blueprint per route family; the only layer that calls sessions, the model and telemetry.

completions.py (OpenAI chat completions), sessions.py (server-side conversations), turns.py (running one
generation for a view: queue errors, SSE, metrics), stats.py (the web page's side panel), health.py,
admin.py (/debug/memory), exposition.py (/metrics and per-request HTTP metrics), ui.py (the page),
auth.py, validate.py and errors.py (OpenAI-shaped errors). Everything comes from `get_services()`.
"""
