"""Everything hpsearch keeps in the study storage, and the only package that touches Optuna's
tables or private names.

Opening storages (`open_storage`, URLs, passwords redacted), studies as stored (`open_study`, the
attributes kept on a study), the global budget (`Counts`, `admit`, `budget_of`), the worker's
view that starts a trial in one transaction (`worker_study`), fast writes and the two-query
trial reader, locks, retries, heartbeats and the artifact store. Optuna's private names are
reached through `_compat` alone, which turns every fast path off (with one warning) on an Optuna
release they are not tested against.
"""

from __future__ import annotations

from search._urls import DEFAULT_URL, ENV_VAR, redact, resolve_url, sqlite_path
from search.storage._artifact_store import (
    ARTIFACT_STORE,
    artifact_location,
    checkpoint_location,
    is_remote,
    open_artifact_store,
    storage_url_of,
    store_files,
)
from search.storage._budget import (
    BUDGET_ATTR,
    BudgetReached,
    Counts,
    admit,
    budget_of,
    count_trials,
    counts_of,
)
from search.storage._compat import (
    backend_of,
    constraint_attrs,
    fast_paths,
    quiet_experimental,
    quiet_optuna_warnings,
    storage_of,
    tell_trial,
    trial_id_of,
)
from search.storage._control import (
    INTERRUPTED,
    STOP_ATTR,
    clear_stop,
    delete_study,
    remove_finished_checkpoints,
    request_stop,
    requeue_interrupted,
    requeue_left,
    stop_requested,
    taken_over,
)
from search.storage._grouped import GroupedPruner
from search.storage._heartbeat import WorkerHeartbeat
from search.storage._locks import DatabaseLock, FileLock, Lock, NullLock, budget_lock
from search.storage._open import open_for_watching, open_storage
from search.storage._proxy_methods import serve_proxy
from search.storage._retry import is_connection_error, storage_error, with_retry
from search.storage._shared import shared_study
from search.storage._studies import (
    LR_FIND_ATTR,
    RETRAIN_ATTR,
    SPEC_ATTR,
    SPEC_SIGNATURE_ATTR,
    TRACKING_ATTR,
    WARM_START_ATTR,
    open_study,
)
from search.storage._tables import (
    close_waiting,
    retried_from,
    retries_of,
    set_user_attrs,
    stored_trial,
)
from search.storage._trial_start import (
    beat_written,
    on_started,
    set_budget,
    with_result,
    worker_study,
    written_attrs,
)
from search.storage._trimmed import with_trimmed_history

__all__ = [
    "ARTIFACT_STORE",
    "INTERRUPTED",
    "STOP_ATTR",
    "clear_stop",
    "constraint_attrs",
    "delete_study",
    "remove_finished_checkpoints",
    "request_stop",
    "requeue_interrupted",
    "requeue_left",
    "stop_requested",
    "taken_over",
    "BUDGET_ATTR",
    "DEFAULT_URL",
    "ENV_VAR",
    "LR_FIND_ATTR",
    "RETRAIN_ATTR",
    "SPEC_ATTR",
    "SPEC_SIGNATURE_ATTR",
    "TRACKING_ATTR",
    "WARM_START_ATTR",
    "BudgetReached",
    "Counts",
    "DatabaseLock",
    "FileLock",
    "GroupedPruner",
    "Lock",
    "NullLock",
    "WorkerHeartbeat",
    "admit",
    "artifact_location",
    "checkpoint_location",
    "backend_of",
    "beat_written",
    "budget_lock",
    "budget_of",
    "close_waiting",
    "count_trials",
    "counts_of",
    "fast_paths",
    "is_connection_error",
    "is_remote",
    "storage_error",
    "on_started",
    "open_study",
    "open_artifact_store",
    "open_for_watching",
    "open_storage",
    "quiet_experimental",
    "quiet_optuna_warnings",
    "redact",
    "resolve_url",
    "retried_from",
    "retries_of",
    "serve_proxy",
    "set_budget",
    "set_user_attrs",
    "shared_study",
    "sqlite_path",
    "storage_of",
    "storage_url_of",
    "store_files",
    "stored_trial",
    "tell_trial",
    "trial_id_of",
    "with_result",
    "with_retry",
    "with_trimmed_history",
    "worker_study",
    "written_attrs",
]
