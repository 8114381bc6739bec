"""`hpsearch dashboard`: optuna-dashboard on the study storage, with the trials' artifacts.

The storage is opened for watching (`search.storage.open_for_watching`): the dashboard never
disturbs the workers, and never initialises a database it was pointed at by mistake.
"""

from __future__ import annotations

from search._errors import SearchError
from search._log import logger
from search._urls import redact
from search.storage import artifact_location, open_artifact_store, open_for_watching

LOG = logger("views")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

def serve(url: str, *, host: str, port: int) -> None:
    """Serve optuna-dashboard for the storage at `url` until Ctrl-C."""
    storage = open_for_watching(url)  # refuse what cannot be opened, now
    try:
        from optuna_dashboard import run_server
    except ImportError as e:
        raise SearchError("optuna-dashboard is not installed: pip install "
                          "'hpsearch[dashboard]'") from e
    location = artifact_location(url)
    store = open_artifact_store(location) if location else None
    if host not in LOCAL_HOSTS:
        LOG.warning(f"the dashboard has no authentication; binding {host} lets "
                    "anyone who can reach this machine read and edit the studies")
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    artifacts = f"artifacts from {location}" if location else "artifacts off"
    print(f"optuna-dashboard for {redact(url)} at http://{shown}:{port}/ "
          f"({artifacts}; Ctrl-C stops it)", flush=True)
    run_server(storage, host=host, port=port, artifact_store=store)
