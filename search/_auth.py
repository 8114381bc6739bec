"""Who may reach a served study: the token, the TLS files, and the stored spec's signature.

`hpsearch storage-proxy` and `hpsearch dashboard` serving beyond this machine need TLS and a
token (`serving`): without them they exit 2, unless `--insecure`, which warns on every start.
A client sends the token it finds in $HPSEARCH_TOKEN and checks the server's certificate
against $HPSEARCH_TLS_CA (a private CA) or the system's. A study created or run while a token
is set stores an HMAC of its spec made with the token (`spec_signature`), which workers holding
the token check before they run anything the spec names.

A token is compared in constant time (`same_token`) and is never printed, stored in a study or
put in an error message: only its signatures are.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from search._errors import SpecError
from search._log import logger

LOG = logger("security")
TOKEN_ENV = "HPSEARCH_TOKEN"
CA_ENV = "HPSEARCH_TLS_CA"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def client_token() -> str | None:
    """The token this process holds ($HPSEARCH_TOKEN), if any."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def client_ca() -> bytes | None:
    """The private CA a client checks a TLS server against ($HPSEARCH_TLS_CA), if any."""
    path = os.environ.get(CA_ENV, "").strip()
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SpecError(f"${CA_ENV}: cannot read {path} ({e.strerror or e})") from e


def same_token(given: str | bytes | None, expected: str) -> bool:
    """Whether `given` is the token, compared in constant time."""
    if given is None:
        return False
    given = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(given, expected.encode())


def derived(token: str, purpose: str) -> str:
    """A value made from the token for one purpose (a dashboard cookie): it proves the token
    was given without being the token."""
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def spec_signature(token: str, name: str, spec_json: str) -> str:
    """The HMAC of a study's stored spec, bound to the study's name: a signed spec copied into
    another study does not verify there."""
    return hmac.new(token.encode(), b"hpsearch-spec\0" + name.encode() + b"\0"
                    + spec_json.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Serving:
    """How a command serves: on which host, with which TLS files and token."""

    host: str
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    cert_path: str | None = None  # (the files, for servers that load them by name)
    key_path: str | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None


def _read(flag: str, path: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SpecError(f"{flag}: cannot read {path} ({e.strerror or e})") from e
    if not data.strip():
        raise SpecError(f"{flag}: {path} is empty")
    return data


def serving(host: str, *, tls_cert: str | None, tls_key: str | None,
            token_file: str | None, insecure: bool, what: str) -> Serving:
    """The TLS files and token `what` is served with; SpecError (exit 2) for a host beyond
    this machine without both, unless `insecure` (then a warning, every start)."""
    if (tls_cert is None) != (tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if tls_cert else ("--tls-key", "--tls-cert")
        raise SpecError(f"{given} needs {missing} too (the certificate and its private key, "
                        "PEM)")
    cert = _read("--tls-cert", tls_cert) if tls_cert else None
    key = _read("--tls-key", tls_key) if tls_key else None
    token = _read("--token-file", token_file).decode().strip() if token_file \
        else client_token()
    if host not in LOOPBACK:
        missing_parts = [part for part, ok in (("TLS (--tls-cert CERT.pem --tls-key KEY.pem)",
                                                cert is not None),
                                               (f"a token (--token-file FILE or ${TOKEN_ENV})",
                                                token is not None)) if not ok]
        if missing_parts and not insecure:
            raise SpecError(f"--host {host}: serving {what} beyond this machine needs "
                            f"{' and '.join(missing_parts)}; --insecure serves without them "
                            "(see docs/security.md)")
        if missing_parts:
            LOG.warning(f"--insecure: {what} on {host} without "
                        f"{' and '.join(p.split(' (')[0] for p in missing_parts)}: anyone who "
                        "reaches this port can read and change every study it serves")
    return Serving(host=host, cert=cert, key=key, token=token, cert_path=tls_cert,
                   key_path=tls_key)
