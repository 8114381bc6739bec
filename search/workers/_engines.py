"""What every cluster launcher (Ray, Slurm) checks before placing a worker on another machine.

Workers on other nodes meet only in the storage, so it must be a server they can all reach.
Light to import: the launchers refuse bad input before Ray, submitit or torch load.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from search._errors import SpecError
from search._urls import redact, resolve_url, sqlite_path

INSTALL_HINTS = {
    "ray": "pip install 'hpsearch[ray]'",
    "submitit": "pip install 'hpsearch[slurm]'",
}


def shared_storage(url: str | None, launcher: str) -> str:
    """The resolved storage URL, refused when other machines cannot share it (SQLite)."""
    resolved = resolve_url(url)
    if resolved.startswith("sqlite:"):
        where = sqlite_path(resolved)
        what = f"the SQLite file {str(where)!r}" if where else "an in-memory SQLite storage"
        raise SpecError(
            f"{launcher}: workers on other machines cannot share {what} "
            f"({redact(resolved)}); use a server they all reach: --storage "
            f"postgresql+psycopg2://user@host/db (or mysql+pymysql://…), or the gRPC proxy "
            f"(`hpsearch storage-proxy`, then --storage grpc://host:13000)"
        )
    return resolved


def import_engine(module: str, launcher: str) -> ModuleType:
    """Import a cluster engine's package, or refuse with how to install it (exit 2)."""
    try:
        return import_module(module)
    except ImportError as e:
        how = INSTALL_HINTS.get(module, f"pip install {module}")
        raise SpecError(f"{launcher}: needs the {module!r} package, not installed here "
                        f"({e}); install it with: {how}") from None
