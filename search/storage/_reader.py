"""Reading a study's trials in two queries, where Optuna's RDB storage takes seven.

The trials, then all five child tables at once (params, values, user and system attributes,
intermediate values) as one `UNION ALL` for the trial ids the first returned (one more per 150
trials), and FrozenTrials built straight from the rows: equal to Optuna's own `_get_trials` and
`get_trial`, trial for trial (tested on SQLite, PostgreSQL and MySQL). A worker reads its trials
about five times a trial (the sampler, the pruner every epoch, the WAITING check), so this is most
of what it asks of its storage; `status`, `best` and `report` read a whole study once, about five
times faster than through Optuna's ORM. `ReadingStorage` is an RDBStorage that reads this way
(`reading` makes one over a storage's engine).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Container, Iterable
from typing import Any

import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search.storage import _compat
from search.storage._compat import backend_of, session

_FINITE, _INF_POS, _INF_NEG, _NAN = "FINITE", "INF_POS", "INF_NEG", "NAN"
_SPECIAL = {_INF_POS: float("inf"), _INF_NEG: float("-inf"), _NAN: float("nan")}
# Row kinds of the children query, in its order.
_PARAM, _VALUE, _USER, _SYSTEM, _INTERMEDIATE = range(5)
# Trials per children query: 5 x 150 bound ids stay under SQLite's oldest limit (999).
CHUNK = 150
MAX_DISTRIBUTIONS = 4096  # parsed distributions kept for reuse

class TrialReader:
    """Builds the two queries once for a storage's tables and reads trials with them."""

    def __init__(self) -> None:
        models = _compat.models
        self.not_found = models.NOT_FOUND_MSG
        self.trials = trials = models.TrialModel.__table__
        self.studies = models.StudyModel.__table__
        params = models.TrialParamModel.__table__
        values = models.TrialValueModel.__table__
        user = models.TrialUserAttributeModel.__table__
        system = models.TrialSystemAttributeModel.__table__
        inter = models.TrialIntermediateValueModel.__table__
        self.trial_columns = (trials.c.trial_id, trials.c.number, trials.c.state,
                              trials.c.datetime_start, trials.c.datetime_complete)
        real = params.c.param_value.type  # the storage's float column type (double precision)
        # A bare NULL (typed for SQLAlchemy only): a UNION takes its type from the other
        # branches, and MySQL has no CAST to a float type.
        no_int = sa.type_coerce(sa.null(), sa.Integer)
        no_real = sa.type_coerce(sa.null(), real)
        no_text = sa.type_coerce(sa.null(), sa.Text)

        def branch(kind: int, table: Any, row_id: Any, name: Any, integer: Any, number: Any,
                   text: Any) -> Any:
            # (kind, trial_id, row id, name, integer, real, text): one shape for all five.
            return sa.select(sa.literal(kind, sa.Integer).label("kind"),
                             table.c.trial_id.label("trial_id"), row_id.label("row_id"),
                             name.label("name"), integer.label("integer"),
                             number.label("real"), text.label("text"))

        # Enum columns (value types) are read as their stored names.
        def enum_name(column: Any) -> Any:
            return sa.cast(column, sa.String)

        self.branches = [
            (branch(_PARAM, params, params.c.param_id, params.c.param_name, no_int,
                    params.c.param_value, params.c.distribution_json), params),
            (branch(_VALUE, values, values.c.trial_value_id, enum_name(values.c.value_type),
                    values.c.objective, values.c.value, no_text), values),
            (branch(_USER, user, user.c.trial_user_attribute_id, user.c.key, no_int, no_real,
                    user.c.value_json), user),
            (branch(_SYSTEM, system, system.c.trial_system_attribute_id, system.c.key, no_int,
                    no_real, system.c.value_json), system),
            (branch(_INTERMEDIATE, inter, inter.c.trial_intermediate_value_id,
                    enum_name(inter.c.intermediate_value_type), inter.c.step,
                    inter.c.intermediate_value,
                    no_text), inter),
        ]
        self._distributions: dict[str, BaseDistribution] = {}

    def read(self, session: Any, study_id: int, states: Container[TrialState] | None,
             included_trial_ids: set[int], trial_id_greater_than: int) -> list[FrozenTrial]:
        """`RDBStorage._get_trials`, in two queries (three when no trial matches)."""

        t = self.trials
        included = {i for i in included_trial_ids if i <= trial_id_greater_than}
        where = [t.c.study_id == study_id]
        if states is not None:
            assert isinstance(states, Iterable)
            where.append(t.c.state.in_(list(states)))
        if included and trial_id_greater_than > -1:
            where.append(sa.or_(t.c.trial_id.in_(sorted(included)),
                                t.c.trial_id > trial_id_greater_than))
        elif trial_id_greater_than > -1:
            where.append(t.c.trial_id > trial_id_greater_than)
        conn = session.connection()
        rows = conn.execute(sa.select(*self.trial_columns).where(*where)
                            .order_by(t.c.trial_id)).all()
        if not rows:
            self._check_study(conn, study_id)
            return []
        return self._build(conn, rows)

    def read_one(self, session: Any, trial_id: int) -> FrozenTrial:
        """`RDBStorage.get_trial`, in two queries."""

        t = self.trials
        conn = session.connection()
        rows = conn.execute(sa.select(*self.trial_columns).where(t.c.trial_id == trial_id)).all()
        if not rows:
            raise KeyError(self.not_found)
        return self._build(conn, rows)[0]

    def _check_study(self, conn: Any, study_id: int) -> None:

        s = self.studies
        if conn.execute(sa.select(s.c.study_id).where(s.c.study_id == study_id)).first() is None:
            raise KeyError(self.not_found)

    def _build(self, conn: Any, rows: list[Any]) -> list[FrozenTrial]:

        parts: dict[int, tuple[dict, dict, dict, dict, dict]] = {
            row[0]: ({}, {}, {}, {}, {}) for row in rows}
        ids = list(parts)
        for start in range(0, len(ids), CHUNK):
            # The ids themselves, not the trials query as a subquery: with a list, each child
            # table is read through its (trial_id, …) index; with a subquery PostgreSQL's
            # planner may hash-join a scan of the whole table, every study's rows.
            chunk = ids[start:start + CHUNK]
            children = sa.union_all(*(select.where(table.c.trial_id.in_(chunk))
                                      for select, table in self.branches))
            self._fill(parts, conn.execute(
                children.order_by(sa.text("kind"), sa.text("row_id"))))
        return [_frozen(row, parts[row[0]]) for row in rows]

    def _fill(self, parts: dict[int, tuple[dict, dict, dict, dict, dict]],
              children: Iterable[Any]) -> None:
        for kind, trial_id, _, name, integer, real, text in children:
            part = parts[trial_id]
            if kind == _PARAM:
                part[_PARAM][name] = (real, self._distribution(text))
            elif kind == _VALUE:
                part[_VALUE][integer] = real if name == _FINITE else _SPECIAL[name]
            elif kind == _INTERMEDIATE:
                part[_INTERMEDIATE][integer] = real if name == _FINITE else _SPECIAL[name]
            else:
                part[kind][name] = json.loads(text)

    def _distribution(self, text: str) -> BaseDistribution:
        # Distributions are immutable values: one object per distinct JSON is shared.
        distribution = self._distributions.get(text)
        if distribution is None:
            if len(self._distributions) >= MAX_DISTRIBUTIONS:  # a space with moving ranges
                self._distributions.clear()
            distribution = self._distributions[text] = json_to_distribution(text)
        return distribution

def _local(utc: datetime.datetime | None) -> datetime.datetime | None:
    # Stored as naive UTC; FrozenTrial carries naive local time (as TrialModel's properties).
    if utc is None:
        return None
    return utc.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)

def _frozen(row: Any, part: tuple[dict, dict, dict, dict, dict]) -> FrozenTrial:
    trial_id, number, state, start, complete = row
    params, values, user, system, intermediate = part
    return FrozenTrial(
        number=number, state=state, value=None,
        values=[values[i] for i in range(len(values))] if values else None,
        datetime_start=_local(start), datetime_complete=_local(complete),
        params={name: d.to_external_repr(v) for name, (v, d) in params.items()},
        distributions={name: d for name, (_, d) in params.items()},
        user_attrs=user, system_attrs=system, intermediate_values=intermediate,
        trial_id=trial_id)

_READER: list[TrialReader | None] = []

def reader_for() -> TrialReader | None:
    """The reader for Optuna's installed RDB models, or None off the fast paths."""
    if not _compat.fast_paths():
        return None
    if not _READER:
        try:
            _READER.append(TrialReader())
        except (AttributeError, ImportError):
            _READER.append(None)
    return _READER[0]


class ReadingStorage(RDBStorage):
    """An RDBStorage whose trial reads take the reader's two queries (Optuna's own where the
    fast paths are off); every write is Optuna's."""

    def _get_trials(self, study_id: int, states: Container[TrialState] | None,
                    included_trial_ids: set[int], trial_id_greater_than: int
                    ) -> list[FrozenTrial]:
        reader = reader_for()
        if reader is None:
            return super()._get_trials(study_id, states, included_trial_ids,
                                       trial_id_greater_than)
        with session(self) as s:
            return reader.read(s, study_id, states, included_trial_ids,
                               trial_id_greater_than)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        # The pruner's read of the running trial, every epoch: two queries, not six.
        reader = reader_for()
        if reader is None:
            return super().get_trial(trial_id)
        with session(self) as s:
            return reader.read_one(s, trial_id)


def reading(storage: Any) -> Any:
    """`storage` reading its trials through the reader: a plain RDBStorage (or Optuna's cache
    over one) becomes a ReadingStorage over the same engine (no new connections); any other
    storage, or any Optuna the fast paths are not tested on, is returned as it is."""
    backend = backend_of(storage)
    if type(backend) is not RDBStorage or not _compat.fast_paths():
        return storage
    # A shallow copy by hand: copy.copy would go through __getstate__, which builds a new engine.
    view = object.__new__(ReadingStorage)
    view.__dict__.update(backend.__dict__)
    return view
