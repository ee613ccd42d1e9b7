"""Uplink credentials for a fleet on loopback: a self-signed certificate (openssl) and a basic-auth user."""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import warnings


class CredentialsError(RuntimeError):
    """openssl or a bcrypt implementation is missing, or openssl failed."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What the uplinks carry: TLS (a CA the clients trust) and one basic-auth user."""

    cert_file: str
    key_file: str
    username: str
    password: str
    password_file: str
    bcrypt_hash: str

    @property
    def ca_file(self) -> str:
        """Self-signed: the certificate is its own CA."""
        return self.cert_file

    @property
    def auth(self) -> tuple[str, str]:
        """(username, password) for HTTP clients."""
        return self.username, self.password


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for Alertmanager's web config: glibc's crypt(3) via Python, else `htpasswd -B`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # crypt leaves the stdlib in 3.13
            import crypt
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        if hashed and hashed.startswith("$2"):
            return hashed
    except (ImportError, ValueError):  # Python >= 3.13, or a libc without bcrypt
        pass
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise CredentialsError("no bcrypt: Python's crypt module lacks it and htpasswd (apache2-utils) is missing")
    out = subprocess.run([htpasswd, "-nbBC", "10", "u", password], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(":", 1)[1]


def make(directory: str, username: str = "fleet", days: int = 7) -> Credentials:
    """A fresh self-signed certificate for 127.0.0.1/localhost and a random password, under directory."""
    os.makedirs(directory, exist_ok=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CredentialsError("openssl not found (apt-get install openssl)")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", str(days), "-subj", "/CN=edgechat-fleet",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, text=True)
    if result.returncode != 0:
        raise CredentialsError(f"openssl req failed: {result.stderr.strip()}")
    password = secrets.token_urlsafe(18)
    password_file = os.path.join(directory, "password")
    with open(password_file, "w", encoding="utf-8") as handle:
        handle.write(password)
    os.chmod(password_file, 0o600)
    os.chmod(key, 0o600)
    return Credentials(cert, key, username, password, password_file, bcrypt_hash(password))


def web_config(creds: Credentials) -> dict:
    """Alertmanager/Prometheus --web.config.file: TLS with the certificate, one basic-auth user."""
    return {"tls_server_config": {"cert_file": creds.cert_file, "key_file": creds.key_file},
            "basic_auth_users": {creds.username: creds.bcrypt_hash}}
