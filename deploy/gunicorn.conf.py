"""gunicorn settings for running edgechat without `edgechat serve`: `gunicorn -c deploy/gunicorn.conf.py`.

The options are the ones `edgechat serve` uses (daemon/server/options.py owns them), computed from
the same EDGECHAT_* settings the daemon reads, so one env file configures both. Nothing here imports
torch: this file runs in the master, which must not run a torch operation before it forks.
"""
from daemon.config import Config
from daemon.server.options import WSGI_APP, gunicorn_options

# EDGECHAT_* from the environment (systemd EnvironmentFile=, docker --env-file); gunicorn reads
# every setting and server hook from this module's globals.
globals().update(gunicorn_options(Config.from_env()))
wsgi_app = WSGI_APP
