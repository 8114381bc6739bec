"""Hugging Face's `Trainer` as a trial: `HpsearchCallback` reports each evaluation, stops the
training loop when the trial is pruned, and keeps `Trainer`'s checkpoints in the trial's folder
so that a dead trial's retry resumes from them.

```python
from search.integrations.huggingface import HpsearchCallback

def fit(params, trial):
    hp = HpsearchCallback(trial)
    args = TrainingArguments(output_dir=hp.output_dir, eval_strategy="epoch",
                             save_strategy="epoch", save_total_limit=1,
                             num_train_epochs=trial.epochs, learning_rate=params["lr"],
                             use_cpu=trial.device == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      compute_metrics=accuracy, callbacks=[hp])
    trainer.train(resume_from_checkpoint=hp.resume_from)
    return trainer.evaluate()  # {"eval_loss": …, "eval_accuracy": …}: the objective's value
```

The study's objective names a metric as `Trainer` names it (`eval_loss`, `eval_accuracy`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from search.trial import Pruned, StopRequested, Trial

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # pragma: no cover - the extra is in every test environment
    raise ImportError("search.integrations.huggingface needs Hugging Face Transformers: "
                      "pip install 'hpsearch[huggingface]'") from e

# Numbers `Trainer` adds to an evaluation's metrics that are not about the model.
_NOT_METRICS = re.compile(r"^epoch$|_runtime$|_per_second$")
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's: a checkpoint's last file
FOLDER = "trainer"  # in the trial's folder: Trainer's output_dir, its checkpoint-<step>s


class HpsearchCallback(TrainerCallback):
    """Reports each evaluation `Trainer.train()` runs to `trial` and acts on the answer.

    - The step of a report is the evaluation's index: the epoch (1, 2, …) under
      `eval_strategy="epoch"`, else `global_step // eval_steps`. Its metrics are the
      evaluation's numbers (`eval_loss`, whatever `compute_metrics` returns) and `train_loss`,
      the last training loss `Trainer` logged before it. Evaluations outside `train()` (a
      `trainer.evaluate()` after it) are not reported: return their result instead.
    - Pruned (or diverged): training stops at once, no checkpoint is written for that
      evaluation, and the trial ends PRUNED; `train()` returns normally, nothing to catch.
    - `Trainer`'s `output_dir` becomes `<trial folder>/trainer`, so its checkpoints are the
      trial's: a retry of a trial whose worker died finds them, and `resume_from` names the
      last one. After `hpsearch stop` training stops right after the next checkpoint and the
      trial is queued again to resume from it. A final `trainer.save_model()` without a path
      lands there too (and is deleted with the trial's folder): give it a path of your own.
    - Under a trial of several processes (`resources`), every rank's `Trainer` reports and
      every rank stops at the same evaluation.
    """

    def __init__(self, trial: Trial) -> None:
        self.trial = trial
        self.training = False
        self.stopped = False  # pruned, diverged or stopped on request: nothing more to report
        self.reported_step = 0  # the global step of the last report (for train_loss)

    @property
    def output_dir(self) -> str | None:
        """Where `Trainer` writes its checkpoints: `<trial folder>/trainer`, or None when the
        trial has no folder. Give it to `TrainingArguments(output_dir=…)`; the callback sets
        it on `Trainer`'s arguments anyway, but `Trainer` creates its output_dir before."""
        directory = self.trial.checkpoint_dir
        return None if directory is None else str(directory / FOLDER)

    @property
    def resume_from(self) -> str | None:
        """The last whole checkpoint of this trial (the dead trial's, for a retry), or None:
        give it to `trainer.train(resume_from_checkpoint=…)`. `Trainer` writes a checkpoint's
        files in place, its `trainer_state.json` last: a worker killed while it wrote one
        leaves a folder without it, which is passed over for the one before."""
        folder = self.output_dir
        if folder is None or not Path(folder).is_dir():
            return None
        whole = sorted((int(match.group(1)), path) for path in Path(folder).iterdir()
                       if (match := _CHECKPOINT.fullmatch(path.name))
                       and (path / TRAINER_STATE_NAME).is_file())
        return str(whole[-1][1]) if whole else None

    # ------------------------------------------------------------------ Trainer's events

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.output_dir is not None:
            args.output_dir = self.output_dir

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = True
        self.reported_step = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training = False

    def on_evaluate(self, args: Any, state: Any, control: Any,
                    metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self.training or self.stopped:
            return
        values = {name: float(value) for name, value in (metrics or {}).items()
                  if _is_number(value) and not _NOT_METRICS.search(name)}
        loss = _train_loss(state.log_history, self.reported_step)
        if loss is not None:
            values.setdefault("train_loss", loss)
        self.reported_step = state.global_step
        try:
            self.trial.report(_evaluation(args, state), **values)
        except StopRequested:  # never checkpointed yet: stop after this evaluation's
            control.should_training_stop = True
        except Pruned:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = False  # a pruned trial's checkpoints are deleted anyway

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped or self.output_dir is None:
            return
        try:
            self.trial.checkpointed()
        except StopRequested:
            self.stopped = True
            control.should_training_stop = True


def _evaluation(args: Any, state: Any) -> int:
    """The index of the evaluation `Trainer` just ran: its epoch under eval_strategy "epoch",
    else how many eval_steps intervals the global step has passed."""
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "epoch":
        return max(1, round(state.epoch or 0))
    every = args.eval_steps or args.logging_steps
    if every < 1:  # a fraction of the run's steps
        every = math.ceil(state.max_steps * every)
    return max(1, state.global_step // int(every))


def _train_loss(log_history: list[dict[str, Any]], since_step: int) -> float | None:
    """The last training loss `Trainer` logged after `since_step`, or None."""
    for entry in reversed(log_history):
        if entry.get("step", 0) <= since_step:
            return None
        if _is_number(entry.get("loss")):
            return float(entry["loss"])
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
