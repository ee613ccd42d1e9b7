"""GET /: the built-in chat page, shipped in the package and working offline (nothing fetched elsewhere).

The page's script and stylesheet live in daemon/static/ and are served by Flask's own static route:
the app is `Flask("daemon")`, rooted at the package, so `/static/<path>` maps to daemon/static/.
The page is public (it holds no data; the API key a person types stays in their browser), and its
Content-Security-Policy lets it load and call only this daemon.
"""
from __future__ import annotations

import os

from flask import Blueprint, send_from_directory

bp = Blueprint("ui", __name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
# 'self' only: scripts, styles, fetches and frames cannot reach another origin, even if injected
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@bp.get("/")
def index():
    """The chat page; revalidated on every load so an upgraded daemon serves its own script."""
    resp = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-cache"
    return resp
