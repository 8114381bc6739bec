"""MLflow: the study as a parent run, each trial (each retry, the retrain) a nested run.

The parent run is found by its tag (``hpsearch.study``) or created in the experiment, and its
id kept on the study (`search.storage.TRACKING_ATTR`), so every worker of the study, on any
machine, nests its trials under the same run. A trial's run carries its params, every metric
per epoch (step = epoch), its final value(s) as ``objective.<metric>``, and tags linking back:
``hpsearch.study``, ``hpsearch.trial``, ``hpsearch.state``, ``hpsearch.pruned_at_epoch``,
``hpsearch.retry_of``. Requests are short: the client's timeout and retries are the study
file's (`tracking.mlflow.timeout`, `.retries`), not MLflow's minutes-long defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from search._urls import redact

if TYPE_CHECKING:
    from search.spec import MlflowSpec
    from search.tracking._record import TrialRecord

STUDY_TAG = "hpsearch.study"
KIND_TAG = "hpsearch.kind"  # "study" on the parent run
_BATCH = 1000  # MLflow's limit on the metrics of one log_batch (params and tags: 100)
_TEXT = 5000  # a param or tag value is cut here (MLflow's limits are 6000 and 8000)


def _client_settings(spec: MlflowSpec) -> None:
    """MLflow's client reads its timeout and retries from the environment at each request:
    set them, where the user has not, for this process (a worker, or `hpsearch retrain`)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(spec.timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(spec.retries))
    # Retried at once: a server that stays down is asked again by the tracker 30 s on
    # (`search.tracking._tracker`), not slept on here (MLflow's backoff sleeps 2 s, 4 s, ...).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    # Not "View run … at …" on standard output for each trial (and one request less).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class MlflowBackend:
    """Logs finished trials to one MLflow tracking server (or a local store)."""

    name = "mlflow"

    def __init__(self, spec: MlflowSpec, study: str, parent: dict[str, Any] | None,
                 on_parent: Callable[[dict[str, Any]], None],
                 settings: dict[str, str] | None = None) -> None:
        """`parent`: the study's parent run as kept on the study, if it is; `on_parent` keeps
        a parent run this backend created, with `settings` (the study's) as its params."""
        self.spec, self.study, self.settings = spec, study, settings or {}
        self.where = redact(spec.uri)
        self.experiment = spec.experiment or study
        self._parent = parent if parent and parent.get("uri") == spec.uri else None
        self._on_parent = on_parent
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            _client_settings(self.spec)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.spec.uri)
        return self._client

    def parent_run(self) -> str:
        """The study's parent run id: kept, found by tag, or created (and kept)."""
        if self._parent is not None:
            return str(self._parent["run_id"])
        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = client.create_experiment(self.experiment)
            except MlflowException:  # another worker created it meanwhile
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        run_id = self._oldest_parent(experiment_id)
        if run_id is None:
            created = client.create_run(experiment_id, run_name=self.study, tags={
                STUDY_TAG: self.study, KIND_TAG: "study"}).info.run_id
            # Workers starting together may each have created one: all keep the oldest.
            run_id = self._oldest_parent(experiment_id) or created
            if run_id != created:
                client.delete_run(created)
            else:
                self._log(run_id, params=self.settings)
        self._parent = {"uri": self.spec.uri, "experiment_id": experiment_id, "run_id": run_id}
        self._on_parent(self._parent)
        return run_id

    def _oldest_parent(self, experiment_id: str) -> str | None:
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{self.study}' and "
                                           f"tags.`{KIND_TAG}` = 'study'",
            order_by=["attributes.start_time ASC", "attributes.run_id ASC"], max_results=1)
        return found[0].info.run_id if found else None

    def start(self) -> None:
        """The study's parent run, found or created as the worker starts."""
        self.parent_run()

    def _log(self, run_id: str, *, params: dict[str, Any], metrics: list[Any] = ()) -> None:
        """Params and metrics in batches of MLflow's limits (100 params, 1000 metrics)."""
        from mlflow.entities import Param

        listed = [Param(key, str(value)[:_TEXT]) for key, value in params.items()]
        for i in range(0, len(listed), 100):
            self.client.log_batch(run_id, params=listed[i:i + 100])
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + _BATCH])

    def study_done(self, best: TrialRecord | None) -> None:
        """The budget is met: the parent run FINISHED, with the best (feasible) trial's values
        as ``best.<metric>`` and its number as ``hpsearch.best_trial``."""
        from mlflow.entities import Metric

        parent = self.parent_run()
        if best is not None:
            end = best.millis(best.end) or 0
            self._log(parent, params={}, metrics=[
                Metric(f"best.{key}", value, end, 0) for key, value in best.values.items()])
            self.client.set_tag(parent, "hpsearch.best_trial", str(best.number))
        self.client.set_terminated(parent, status="FINISHED")

    def log_trial(self, record: TrialRecord) -> None:
        from mlflow.entities import Metric

        client = self.client
        parent = self.parent_run()
        tags = {"mlflow.parentRunId": parent, STUDY_TAG: record.study,
                "hpsearch.trial": str(record.number), "hpsearch.state": record.state,
                KIND_TAG: record.kind}
        if record.pruned_at is not None:
            tags["hpsearch.pruned_at_epoch"] = str(record.pruned_at)
        if record.retry_of is not None:
            tags["hpsearch.retry_of"] = str(record.retry_of)
        if record.reason:
            tags["hpsearch.ended"] = record.reason[:_TEXT]
        run = client.create_run(str(self._parent["experiment_id"]),  # type: ignore[index]
                                start_time=record.millis(record.start), tags=tags,
                                run_name=record.run_name)
        run_id = run.info.run_id
        end = record.millis(record.end) or record.millis(record.start) or 0
        metrics = [Metric(key, value, end, epoch)
                   for epoch, values in record.epochs for key, value in values.items()]
        metrics += [Metric(f"objective.{key}", value, end, record.epochs[-1][0]
                           if record.epochs else 0) for key, value in record.values.items()]
        self._log(run_id, params=record.params, metrics=metrics)
        # A pruned trial ended as the pruner meant it to: FINISHED, with hpsearch.state PRUNED.
        client.set_terminated(run_id, status="FAILED" if record.state == "FAIL" else "FINISHED",
                              end_time=record.millis(record.end))

    def close(self) -> None:
        """Nothing is buffered: each trial's run is written as it is logged."""
