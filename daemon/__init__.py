"""edgechat: a chat inference daemon for edge devices that tells Prometheus when it starts to leak."""

__version__ = "0.1.0"


def create_app(config=None):
    """Build the Flask app (see daemon.app); imported lazily so the gunicorn master loads no torch or metrics."""
    from .app import create_app as _create_app
    return _create_app(config)
