"""The one door to Optuna's internals: the tested release, and every private name hpsearch uses.

hpsearch's fast paths (a trial created with its budget check and first heartbeat, the two-query
trial reader, batched attribute and artifact-link writes, the one-query state count) work on
Optuna's RDB tables through the private names imported here, and nowhere else. They are taken
only on the Optuna release they are tested against (`TESTED`); on any other release, or where a
name is missing or a table lacks a column, `fast_paths()` is False, one warning line says so,
and every caller takes Optuna's public path. `HPSEARCH_FAST_PATHS=0` turns them off by hand.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import RDBStorage

from search._log import logger

LOG = logger("storage")
TESTED = (5, 0)  # the Optuna minor release the fast paths are written and tested against
FAST_PATHS_ENV = "HPSEARCH_FAST_PATHS"
# Set once the warning is printed: worker processes started after it do not repeat it.
WARNED_ENV = "HPSEARCH_FAST_PATHS_WARNED"

# Private names, each used only through this module. None where the installed Optuna lacks it.
try:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError:  # pragma: no cover - another Optuna; fast_paths() says why
    models = None
    _create_scoped_session = None
try:
    from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, DEFAULT_MIME_TYPE, ArtifactMeta
except ImportError:  # pragma: no cover
    ARTIFACTS_ATTR_PREFIX = DEFAULT_MIME_TYPE = ArtifactMeta = None
try:
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
except ImportError:  # pragma: no cover
    is_heartbeat_enabled = None
    BaseHeartbeat = object  # a proxy client then has heartbeats only by its own methods
try:
    from optuna.storages._cached_storage import _CachedStorage
except ImportError:  # pragma: no cover
    _CachedStorage = None
try:
    from optuna.study._tell import _tell_with_warning
except ImportError:  # pragma: no cover
    _tell_with_warning = None
try:
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
except ImportError:  # pragma: no cover - the prefix `Trial.set_constraint` writes in Optuna 5
    _CONSTRAINTS_KEY = "constraints"

# The columns the fast paths read and write, table by table.
COLUMNS = {
    "StudyModel": ("study_id",),
    "TrialModel": ("trial_id", "number", "study_id", "state", "datetime_start",
                   "datetime_complete"),
    "TrialParamModel": ("trial_id", "param_name", "param_value", "distribution_json"),
    "TrialValueModel": ("trial_id", "objective", "value", "value_type"),
    "TrialUserAttributeModel": ("trial_id", "key", "value_json"),
    "TrialSystemAttributeModel": ("trial_id", "key", "value_json"),
    "TrialIntermediateValueModel": ("trial_id", "step", "intermediate_value",
                                    "intermediate_value_type"),
    "TrialHeartbeatModel": ("trial_id", "heartbeat"),
}
# Private methods of RDBStorage and Study that search.storage calls or overrides.
METHODS = {
    RDBStorage: ("_create_new_trial", "_get_prepared_new_trial", "_get_trials",
                 "_set_trial_param", "_set_trial_param_without_commit",
                 "_set_trial_value_without_commit", "check_trial_is_updatable"),
    optuna.Study: ("_pop_waiting_trial_id",),
    **({_CachedStorage: ("_read_trials_from_remote_storage",)} if _CachedStorage else {}),
}

_STATE: list[str | None] = []  # [] unchecked; [None] fast paths on; [reason] off


def version() -> tuple[int, int]:
    major, minor = optuna.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def missing() -> str | None:
    """Why the fast paths cannot run on the installed Optuna, or None when they can."""
    if os.environ.get(FAST_PATHS_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return f"{FAST_PATHS_ENV}={os.environ[FAST_PATHS_ENV]}"
    if version() != TESTED:
        return f"Optuna {optuna.__version__} is not the tested {TESTED[0]}.{TESTED[1]}"
    if (models is None or _create_scoped_session is None or ArtifactMeta is None
            or _tell_with_warning is None or _CachedStorage is None):
        return "a private module of Optuna moved"
    for model, columns in COLUMNS.items():
        table = getattr(getattr(models, model, None), "__table__", None)
        if table is None:
            return f"optuna.storages._rdb.models.{model} is missing"
        lacking = [c for c in columns if c not in table.c]
        if lacking:
            return f"{model} lacks the columns {', '.join(lacking)}"
    for cls, names in METHODS.items():
        lacking = [n for n in names if not callable(getattr(cls, n, None))]
        if lacking:
            return f"{cls.__name__} lacks {', '.join(lacking)}"
    return None


def fast_paths() -> bool:
    """Whether the installed Optuna is the one the fast paths are tested against (checked once,
    with one warning line when it is not)."""
    if not _STATE:
        reason = missing()
        _STATE.append(reason)
        if reason is not None and not os.environ.get(WARNED_ENV):
            LOG.warning(f"hpsearch uses Optuna's public storage API ({reason}): correct, "
                        "but slower per trial")
            os.environ[WARNED_ENV] = "1"
    return _STATE[0] is None


def reset() -> None:
    """Check again, and warn again, at the next `fast_paths()` (tests change the environment)."""
    _STATE.clear()
    os.environ.pop(WARNED_ENV, None)


def backend_of(storage: Any) -> Any:
    """The storage behind Optuna's cache wrapper (the storage itself when it has none)."""
    return getattr(storage, "_backend", storage)


def rdb_backend(storage: Any) -> RDBStorage | None:
    """The RDBStorage behind `storage` when the fast paths may use it; None: the public path."""
    backend = backend_of(storage)
    return backend if isinstance(backend, RDBStorage) and fast_paths() else None


def storage_of(study: optuna.Study) -> Any:
    """The storage a study reads and writes through (Optuna's cached wrapper)."""
    return study._storage


def study_id_of(study: optuna.Study) -> int:
    return study._study_id


def trial_id_of(trial: Any) -> int:
    """The storage id of a Trial or FrozenTrial (not its number)."""
    return trial._trial_id


def cached_frozen(trial: optuna.Trial) -> Any:
    """The FrozenTrial a running Trial fetched when it started, or None."""
    return getattr(trial, "_cached_frozen_trial", None)


def join_sessions(backends: list[RDBStorage], joined: Any) -> Callable[[], None]:
    """This thread's sessions of `backends` (Optuna's scoped sessions: every storage call and
    `session` takes the thread's) replaced by the SQLAlchemy session `joined`, so their calls
    run in its transaction, until the callable returned puts the old ones back."""
    saved = []
    for backend in backends:
        registry = backend.scoped_session.registry
        saved.append((registry, registry() if registry.has() else None))
        registry.set(joined)

    def restore() -> None:
        for registry, previous in reversed(saved):
            if previous is None:
                registry.clear()
            else:
                registry.set(previous)
    return restore


@contextmanager
def session(backend: RDBStorage, *, ignore_integrity_error: bool = False) -> Iterator[Any]:
    """A transaction on the backend's sessions, committed on exit, as Optuna's own methods run
    (storage errors wrapped in StorageInternalError; connection errors kept for retries)."""
    with _create_scoped_session(backend.scoped_session, ignore_integrity_error) as s:
        yield s


def tell_trial(study: optuna.Study, trial: optuna.Trial, values: list[float] | None,
               state: Any) -> None:
    """`study.tell(trial, values, state=state, skip_if_finished=True)` without reading the
    trial back afterwards for a copy nobody uses (`Study.tell` does: one more query a trial,
    as `study.optimize` never did). Optuna's public tell where the fast paths are off."""
    if fast_paths():
        _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state,
                           skip_if_finished=True)
    else:
        study.tell(trial, values, state=state, skip_if_finished=True)


def constraint_attrs(values: dict[str, float]) -> dict[str, float]:
    """Constraint values as the system attrs `Trial.set_constraint` writes (``constraints:<key>``,
    read back as `FrozenTrial.constraints`): written with a trial's result, in its transaction,
    where `set_constraint` would take one a constraint."""
    return {f"{_CONSTRAINTS_KEY}:{key}": float(value) for key, value in values.items()}


def heartbeat_enabled(storage: Any) -> bool:
    if is_heartbeat_enabled is not None:
        return is_heartbeat_enabled(storage)
    return getattr(backend_of(storage), "heartbeat_interval", None) is not None


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna's experimental features that hpsearch uses (heartbeats, retries, metric names),
    used without their ExperimentalWarning: ours to know, not the user's. The warning filters
    are as they were after the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def quiet_optuna_warnings() -> None:
    """Optuna's INFO lines and experimental-feature warnings hidden, for the whole process:
    the command line's (and the tests'), never the library's: a program's Optuna logging is
    its own (`search.tune` leaves it as it finds it)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("optuna").setLevel(logging.WARNING)


# --- the gRPC storage proxy with TLS and a token (search.storage._proxy) ---------------------
# Optuna's `run_grpc_proxy_server` adds an insecure port and `GrpcStorageProxy` builds an
# insecure channel; a proxy with TLS and a token is put together from their parts, named here.
GRPC_SERVICE = "optuna.StorageService"  # the service Optuna's api.proto defines
GRPC_PARTS = ("optuna.storages._grpc.servicer:OptunaStorageProxyService",
              "optuna.storages._grpc.auto_generated.api_pb2_grpc:"
              "add_StorageServiceServicer_to_server",
              "optuna.storages._grpc.auto_generated.api_pb2_grpc:StorageServiceStub",
              "optuna.storages._grpc.auto_generated.api_pb2:GetStudyIdFromNameRequest",
              "optuna.storages._grpc.client:GrpcClientCache",
              "optuna.storages._grpc.servicer:_to_proto_trial",
              "optuna.storages._grpc.auto_generated.api_pb2:GetTrialsReply")


def _grpc_part(index: int) -> Any:
    import importlib

    module, _, name = GRPC_PARTS[index].partition(":")
    return getattr(importlib.import_module(module), name)


def add_storage_service(server: Any, storage: Any) -> None:
    """Optuna's storage service for `storage`, added to the gRPC `server`; its GetTrials
    converts a trial to its message once, not once a call (below)."""
    _grpc_part(1)(_storage_service_class()(storage), server)


def _storage_service_class() -> type:
    import grpc

    to_proto, reply = _grpc_part(5), _grpc_part(6)

    class StorageService(_grpc_part(0)):  # type: ignore[misc]
        """Optuna's service, whose GetTrials keeps each trial's message while the trial is
        unchanged. A worker's client asks again for every trial still running at each read
        (its cache's rule), so with W workers each call converted W trials, W calls over: the
        storage proxy's largest cost at hundreds of workers. The answer is Optuna's own."""

        def __init__(self, storage: Any) -> None:
            super().__init__(storage)
            self._messages: dict[int, tuple[Any, Any]] = {}  # trial id → (trial, its message)

        def _message(self, trial: Any) -> Any:
            kept = self._messages.get(trial._trial_id)
            if kept is not None and (kept[0] is trial or _same_trial(kept[0], trial)):
                return kept[1]
            message = to_proto(trial)
            self._messages[trial._trial_id] = (trial, message)
            return message

        def GetTrials(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
            included, after = set(request.included_trial_ids), request.trial_id_greater_than
            try:
                trials = self._backend.get_all_trials(request.study_id, deepcopy=False)
            except KeyError as e:
                context.abort(code=grpc.StatusCode.NOT_FOUND, details=str(e))
            return reply(trials=[self._message(t) for t in trials
                                 if t._trial_id > after or t._trial_id in included])

    return StorageService


def _same_trial(a: Any, b: Any) -> bool:
    """FrozenTrial's `==`, field by field through its properties. Its own `__eq__` compares the
    two objects' `__dict__`s, and on CPython 3.11 asking for an object's `__dict__` while other
    threads do too can leave two dicts over one array of attribute values (the dict is made in
    an allocation that may run the garbage collector, and so other threads, before the object
    records it): the first dict freed frees the array under the other. The storage proxy
    crashed so (SIGSEGV in the collector, a FrozenTrial's attributes overwritten) with 1,000
    workers."""
    return (a.number == b.number and a.state == b.state and a.values == b.values
            and a.datetime_start == b.datetime_start
            and a.datetime_complete == b.datetime_complete and a.params == b.params
            and a.distributions == b.distributions and a.user_attrs == b.user_attrs
            and a.system_attrs == b.system_attrs
            and a.intermediate_values == b.intermediate_values)


def storage_service_methods() -> list[str]:
    """Every method of Optuna's storage service, by name."""
    from optuna.storages._grpc.auto_generated import api_pb2

    return list(api_pb2.DESCRIPTOR.services_by_name["StorageService"].methods_by_name)


def grpc_proxy_client(host: str, port: int, channel: Any, *, mixin: type | None = None) -> Any:
    """Optuna's `GrpcStorageProxy` talking over `channel` (a function of no arguments that
    makes the channel: TLS, the token), instead of its own insecure one; with the methods of
    `mixin` (hpsearch's worker methods: search.storage._proxy_client) before Optuna's."""
    from optuna.storages import GrpcStorageProxy

    class Proxy(*((mixin,) if mixin else ()), GrpcStorageProxy):  # type: ignore[misc]
        def _setup(self) -> None:
            self._channel = channel()
            self._stub = _grpc_part(2)(self._channel)
            self._cache = _grpc_part(4)(self._stub)

    with quiet_experimental():
        return Proxy(host=host, port=port)


def ping_proxy(proxy: Any, timeout: float) -> None:
    """One call to the proxy, answered or raised as gRPC raises it (an unknown study name is an
    answer: the server is there and let the call in)."""
    import grpc

    try:
        proxy._stub.GetStudyIdFromName(_grpc_part(3)(study_name="hpsearch ping: no study"),
                                       timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def proxy_channel(proxy: Any) -> Any:
    """The gRPC channel a proxy client made (`grpc_proxy_client`): hpsearch's own methods use
    it too, so a worker holds one connection to the proxy."""
    return proxy._channel


def stale_trial_ids(storage: Any, study_id: int) -> list[int]:
    """The RUNNING trials of a study whose last heartbeat is older than the storage's grace
    period (Optuna's own query)."""
    return storage._get_stale_trial_ids(study_id)


def cache_started_trial(storage: Any, study_id: int, trial: Any) -> None:
    """Record `trial`, started by hpsearch beside Optuna's cache wrapper `storage` (the proxy's
    storage), as the wrapper's own `create_new_trial` records one it created: its later
    `set_trial_param` looks the trial up there. Nothing for a storage without that cache."""
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    if not isinstance(storage, _CachedStorage):
        return
    with storage._lock:
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, [trial])


def shared_reads_cache(backend: RDBStorage) -> Any:
    """Optuna's cache over `backend`, as `optuna.storages.get_storage` makes it, except that
    concurrent calls share their re-reads of a study (the storage proxy's, whose every thread
    re-reads the study's unfinished trials for each worker's read: with W workers, W trials
    read W times over).

    A call needs the trials as they were when it came in. Optuna's cache reads them under its
    lock, one call at a time; here a call that comes in while the study is being read waits for
    that read to end, then either a read that began after it came in has ended too (it takes
    that read's trials: they hold every write it could have seen) or it reads itself. No call
    sees older trials than it would alone. On another Optuna: `get_storage`'s own cache."""
    if not fast_paths():
        return optuna.storages.get_storage(backend)

    class SharedReads(_CachedStorage):
        def __init__(self, backend: RDBStorage) -> None:
            super().__init__(backend)
            self._reads = threading.Condition()
            self._begun: dict[int, int] = {}  # a study's reads begun so far, and the number
            self._ended: dict[int, int] = {}  # of the last one ended
            self._reading: set[int] = set()  # studies with a read in flight

        def _read_trials_from_remote_storage(self, study_id: int) -> None:
            with self._reads:
                came_in = self._begun.get(study_id, 0)  # reads numbered after it begin later
                while study_id in self._reading:
                    self._reads.wait()
                    if self._ended.get(study_id, 0) > came_in:
                        return  # read since this call came in: its trials are in the cache
                number = self._begun[study_id] = self._begun.get(study_id, 0) + 1
                self._reading.add(study_id)
            ended = False
            try:
                super()._read_trials_from_remote_storage(study_id)
                ended = True
            finally:
                with self._reads:
                    self._reading.discard(study_id)
                    if ended:
                        self._ended[study_id] = number
                    self._reads.notify_all()

    return SharedReads(backend)
