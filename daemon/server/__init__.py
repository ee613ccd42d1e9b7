"""Running under gunicorn: the options (shared by `edgechat serve` and deploy/gunicorn.conf.py), hooks, logging.

May import: config, telemetry.multiproc. Runs in the gunicorn master too, so nothing here imports
torch or prometheus_client at module level.
"""
