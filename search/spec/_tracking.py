"""The study file's `tracking:` section: where each trial is logged besides the study storage.

Any of three trackers, together or alone (`search.tracking` logs to them):

    tracking:
      mlflow: {uri: http://127.0.0.1:5000, experiment: fashion}  # experiment: the study's name
      tensorboard: runs/                                          # one event folder per trial
      wandb: {project: fashion, mode: offline}                   # one run per trial
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any

from pydantic import Field, PlainValidator, StrictInt, StrictStr, field_validator, model_validator

from search.spec._model import SpecModel, show, spec_error

WANDB_MODES = ("online", "offline")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise spec_error(f"expected a non-empty string, got {show(value)}")
    return value


Text = Annotated[str, PlainValidator(_text)]


class MlflowSpec(SpecModel):
    """A tracking server (or a local `file:` / `sqlite:` store): the study is a parent run,
    each trial a nested run."""

    uri: Text  # http(s)://host:port, databricks, file:/path or sqlite:///path
    experiment: Text | None = None  # None: the study's name
    # Seconds one request to the server may take; retried `retries` times before the trial is
    # left unlogged (MLflow's own defaults wait minutes on a server that is down).
    timeout: StrictInt = Field(5, gt=0)
    retries: StrictInt = Field(2, ge=0)


class WandbSpec(SpecModel):
    """Weights & Biases: a run per trial, grouped by study."""

    project: Text | None = None  # None: the study's name
    entity: Text | None = None
    mode: StrictStr = "online"
    dir: Text | None = None  # where runs are written first (offline: where they stay)

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in WANDB_MODES:
            raise spec_error(f"expected one of: {', '.join(WANDB_MODES)}, got {show(value)}")
        return value


class TrackingSpec(SpecModel):
    """`tracking:`: the trackers each trial is logged to besides the study storage (one or
    several; `search.tracking` logs to them)."""

    mlflow: MlflowSpec | None = None
    tensorboard: Text | None = None  # a folder: <folder>/<study>/trial-<n> per trial
    wandb: WandbSpec | None = None

    @model_validator(mode="after")
    def _some(self) -> TrackingSpec:
        if self.mlflow is None and self.tensorboard is None and self.wandb is None:
            raise spec_error("expected at least one of: mlflow, tensorboard, wandb "
                             "(leave tracking: out to log nowhere but the study storage)")
        return self

    @model_validator(mode="after")
    def _installed(self) -> TrackingSpec:
        # Checked where the file is validated and where each worker loads the study: a
        # worker that could not log would otherwise warn on every trial.
        for name in self.names:
            if importlib.util.find_spec(name) is None:
                raise spec_error(f"needs the {name} package, not installed here: pip install "
                                 f"'hpsearch[{name}]'", key=name)
        return self

    @property
    def names(self) -> list[str]:
        """The trackers configured, in a fixed order."""
        return [name for name in ("mlflow", "tensorboard", "wandb")
                if getattr(self, name) is not None]
