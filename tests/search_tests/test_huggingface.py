"""Hugging Face's `Trainer` as a trial (`search.integrations.huggingface`), with real
transformers and PEFT: examples/hf_finetune through `hpsearch run --workers 2`, a worker killed
mid-trial and its retry resumed from `Trainer`'s checkpoint; a pruned trial and `hpsearch
stop` stopping `Trainer` at one evaluation; the callback under a trial of two processes.

Nothing downloads (HF_HUB_OFFLINE=1): the example builds its tokenizer and its model here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from transformers import TrainerState, TrainingArguments

from search import Trial
from search.integrations import huggingface
from tests.search_tests.studies import run_killing_a_worker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_finetune"
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
NAME = "hf-finetune"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PARAMS = {"hidden": 32, "batch_size": 32, "train_size": 800, "held_out_size": 200,
          "lr": 0.02, "lora_rank": 4, "warmup_ratio": 0.1, "weight_decay": 0.0}
STEPS_PER_EPOCH = 800 // 32


@pytest.fixture
def project(tmp_path) -> Path:
    """The example as a user has it, with a budget a test affords."""
    folder = tmp_path / "hf_finetune"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(
        "checkpoints", "retrain-*", "*.db*", "__pycache__"))
    return folder


def edit_study(project: Path, **changes: object) -> None:
    study = yaml.safe_load((project / "study.yaml").read_text())
    study.update(changes)
    (project / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))


@pytest.fixture
def fit(monkeypatch):
    """The example's `fit`, imported as its study imports it (from the example's folder)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hf_finetune import finetune

    return finetune.fit


def checkpoints(folder: Path) -> list[str]:
    """The trial's whole checkpoints (Trainer writes trainer_state.json last)."""
    return sorted(p.parent.name for p in (folder / huggingface.FOLDER).glob(
        f"checkpoint-*/{huggingface.TRAINER_STATE_NAME}"))


# ------------------------------------------------------------------ the callback, in-process


def test_a_trial_without_a_folder_reports_each_epoch_once(fit, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainer's own output_dir then: ./trainer_output
    trial = Trial(number=0, study_name=NAME, params=PARAMS, epochs=2, threads=1)
    result = fit(dict(PARAMS), trial)
    assert [r["epoch"] for r in trial.history] == [1, 2]
    assert all({"eval_loss", "eval_accuracy", "train_loss"} <= set(r) for r in trial.history)
    assert not any(k.endswith(("_runtime", "_per_second")) for r in trial.history for k in r)
    # The evaluate() after train() returned its result and was not reported again.
    assert result["eval_accuracy"] == trial.history[-1]["eval_accuracy"]
    assert not [r for r in caplog.records if "reported already" in r.getMessage()]
    assert trial.stopped is None


def test_a_pruned_trial_stops_at_that_evaluation_and_saves_no_checkpoint(fit, tmp_path):
    folder = tmp_path / "trial-0"
    trial = Trial(number=0, study_name=NAME, params=PARAMS, epochs=4, threads=1,
                  checkpoint_dir=folder,
                  on_report=lambda epoch, _: f"pruned at epoch {epoch}" if epoch == 2 else None)
    result = fit(dict(PARAMS), trial)  # no exception out of Trainer: the trial knows
    assert trial.stopped == "pruned at epoch 2"
    assert [r["epoch"] for r in trial.history] == [1, 2]
    assert result["epoch"] == 2.0  # Trainer ran no step of epoch 3
    assert checkpoints(folder) == [f"checkpoint-{STEPS_PER_EPOCH}"]  # epoch 1's alone


def test_hpsearch_stop_ends_training_right_after_a_checkpoint(fit, tmp_path):
    folder = tmp_path / "trial-0"
    trial = Trial(number=0, study_name=NAME, params=PARAMS, epochs=4, threads=1,
                  checkpoint_dir=folder, stop=lambda: True)
    result = fit(dict(PARAMS), trial)
    assert trial.stop_requested and result["epoch"] == 1.0
    assert checkpoints(folder) == [f"checkpoint-{STEPS_PER_EPOCH}"]
    assert (folder / "hpsearch-history.json").is_file()  # the reports, beside it, for the retry


def test_a_checkpoint_cut_short_by_a_kill_is_passed_over(tmp_path):
    folder = tmp_path / "trial-0" / huggingface.FOLDER
    for step, whole in ((25, True), (50, True), (75, False)):  # killed as 75 was written
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
        if whole:
            (folder / f"checkpoint-{step}" / huggingface.TRAINER_STATE_NAME).write_text("{}")
    (folder / "checkpoint-notes").mkdir()
    trial = Trial(number=0, study_name=NAME, params={}, checkpoint_dir=tmp_path / "trial-0")
    assert huggingface.HpsearchCallback(trial).resume_from == str(folder / "checkpoint-50")
    shutil.rmtree(folder)
    assert huggingface.HpsearchCallback(trial).resume_from is None
    assert huggingface.HpsearchCallback(Trial(number=0, study_name=NAME, params={})
                                        ).resume_from is None


@pytest.mark.parametrize("strategy, every, step, expected", [
    ("epoch", None, 75, 3),      # state.epoch 3.0
    ("steps", 30, 60, 2),
    ("steps", 30, 100, 3),       # past the last multiple: the last index again
    ("steps", 0.25, 50, 2),      # a quarter of 100 steps: every 25
])
def test_an_evaluations_index(strategy, every, step, expected, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy=strategy,
                             **({"eval_steps": every} if every is not None else {}))
    state = TrainerState(global_step=step, max_steps=100, epoch=step / 25)
    assert huggingface._evaluation(args, state) == expected


# ------------------------------------------------------------------ through hpsearch run


@pytest.mark.serial
@pytest.mark.slow
def test_the_example_resumes_a_killed_trial_from_trainers_checkpoint(project):
    # The example as shipped (its budget: the search, its best beating chance, in a minute),
    # with a quick heartbeat so that the dead worker's trial is retried within seconds.
    study = yaml.safe_load((project / "study.yaml").read_text())
    trials, epochs = study["budget"]["trials"], study["budget"]["epochs"]
    edit_study(project, run={"heartbeat_interval": 1, "grace_period": 3})
    def ready(number: int, last: int | None) -> bool:  # a whole checkpoint, an epoch to go
        folder = project / "checkpoints" / NAME / f"trial-{number}"
        return last is not None and last < epochs - 1 and bool(checkpoints(folder))

    killed, code, out = run_killing_a_worker(project, ready, env=ENV)
    assert code == 0, out
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{project / 'hpsearch.db'}")
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == trials, out
    assert [t.number for t in study.get_trials(states=(TrialState.FAIL,))] == [killed], out
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retried_from") == killed)
    assert retry.user_attrs["resumed_from_epoch"] >= 1, out  # from Trainer's checkpoint
    history = [r["epoch"] for r in retry.user_attrs["history"]]
    assert history == list(range(1, len(history) + 1))
    # The search's best beats chance (50%) by 20 points on the held-out sentences.
    assert study.best_value >= 0.70, out
    assert not list((project / "checkpoints" / NAME).glob("trial-*/trainer"))  # cleared


@pytest.mark.serial
@pytest.mark.slow
def test_two_processes_a_trial_report_and_stop_at_the_same_evaluation(project):
    """`resources: {processes: 2}`: Trainer runs DDP over the trial's two ranks. A good config
    first, then a bad one the median pruner stops at epoch 2: both ranks stop there (a rank
    that trained on would hang the other in DDP's all-reduce), the trial ends PRUNED."""
    edit_study(project, resources={"processes": 2}, budget={"trials": 2, "epochs": 3},
               fixed={"hidden": 32, "batch_size": 32, "train_size": 1200, "held_out_size": 200},
               pruner={"type": "median", "options": {"n_startup_trials": 1,
                                                     "n_warmup_steps": 2}},
               enqueue=[{"lr": 0.02, "lora_rank": 4, "warmup_ratio": 0.1, "weight_decay": 0},
                        {"lr": 0.001, "lora_rank": 2, "warmup_ratio": 0, "weight_decay": 0}])
    done = subprocess.run([HPSEARCH, "run", "study.yaml", "--workers", "1", "--gpus", "none"],
                          cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{project / 'hpsearch.db'}")
    good, bad = study.get_trials()
    assert good.state == TrialState.COMPLETE and good.value >= 0.65, done.stdout
    assert bad.state == TrialState.PRUNED, done.stdout
    assert [r["epoch"] for r in bad.user_attrs["history"]] == [1, 2]
