"""Storage URLs as text: the default, $HPSEARCH_STORAGE, the schemes served, hidden passwords.

Light to import (no Optuna, no SQLAlchemy): the CLI names and redacts URLs before anything heavy
loads. Opening a storage is `search.storage`'s.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from search._errors import SpecError

DEFAULT_URL = "sqlite:///hpsearch.db"
ENV_VAR = "HPSEARCH_STORAGE"
SCHEMES = ("sqlite", "postgresql", "mysql", "grpc", "grpcs")

_PASSWORD = re.compile(r"(?P<head>[a-z0-9+.-]+://[^:/@\s]+:)(?P<pw>[^@\s]*)(?P<tail>@)", re.I)


def resolve_url(url: str | None) -> str:
    """The storage URL to use: the one given, else $HPSEARCH_STORAGE, else ./hpsearch.db."""
    url = url or os.environ.get(ENV_VAR) or DEFAULT_URL
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if "://" not in url or scheme not in SCHEMES:
        raise SpecError(
            f"--storage: expected a URL such as sqlite:///hpsearch.db, "
            f"postgresql+psycopg2://user@host/db, mysql+pymysql://user@host/db or "
            f"grpc://host:port (grpcs:// over TLS), got {redact(url)!r}"
        )
    return url


def is_proxy(url: str) -> bool:
    """Whether `url` names `hpsearch storage-proxy` (grpc://, or grpcs:// over TLS)."""
    return url.startswith(("grpc://", "grpcs://"))


def redact(text: str) -> str:
    """Replace any password inside URLs in `text` with ***."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite URL (None for in-memory or other schemes)."""
    if not url.startswith("sqlite:"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        return None
    return Path(path)
