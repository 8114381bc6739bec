"""Every key of the study file refuses its bad values with one line naming the key path.

`BAD` holds at least one bad value for every key of the schema (each field of `StudySpec` and
of the models under it, and a key that none of them has); `test_every_key_has_a_bad_value`
walks the pydantic models, so a key added to the schema without a case here fails. The values
of trainer settings (data, model, fixed, space bounds) are tests/trainers_tests/
test_bad_values.py's; the cases here are the study file's own, beside test_spec.py's.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from search._errors import SpecError
from search.spec import StudySpec, parse_spec, spec_from_json, spec_to_json
from search.spec._model import SpecModel

MINIMAL: dict[str, Any] = {
    "name": "x",
    "data": {"dataset": "synthetic"},
    "model": {},
    "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}},
}
LR = MINIMAL["space"]["lr"]
DROP = object()  # a change that removes the key
COMMAND = {"command": ["python", "train.py", "--lr", "{lr}"]}
UNKNOWN = "<unknown>"  # `Model.<unknown>`: a key the model does not have


class Bad(NamedTuple):
    covers: str  # the key it is about: `Model.key` (the key as a study file spells it)
    changes: dict[str, Any]  # to MINIMAL's top level; DROP removes a key
    message: str  # regex of the message from the key path on


def space(**entries: Any) -> dict[str, Any]:
    """Changes that search `entries` besides the lr."""
    return {"space": {"lr": LR, **entries}}


def when(condition: Any) -> dict[str, Any]:
    """Changes that make momentum conditional on `condition` (optimizer is a choice)."""
    return space(optimizer={"choices": ["sgd", "adam"]},
                 momentum={"low": 0.8, "high": 0.9, "when": condition})


def own(trainer: Any, **more: Any) -> dict[str, Any]:
    """Changes that replace the built-in trainer with the user's `trainer`."""
    return {"data": DROP, "model": DROP, "trainer": trainer, **more}


SECTIONS = "expected one of: name, objective, budget, sampler, pruner, trainer, data, model, "
ENTRY = (r"expected a search-space entry: a range \{low, high\}, .* "
         r"\(a constant belongs under fixed\)")
NAME = r"expected a study name of letters, digits, '-', '_' and '\.', got "
METRIC = r"expected a metric name \(letters, digits, '_' and '\.'\), got "
POSITIVE_S = r"expected a positive number of seconds, got "
FUNCTION_ONLY = r"goes with command: \(a function runs inside the worker\)$"
ARGUMENT = r"expected a string or a number \(quote true, false and null\), got "
ENV_NAME = r"trainer\.env: expected variable names, not empty and without '=' or NUL, got "

BAD: list[Bad] = [
    # ------------------------------------------------------------------ top level
    Bad("StudySpec.name", {"name": ""}, rf"name: {NAME}''$"),
    Bad("StudySpec.name", {"name": ["x"]}, rf"name: {NAME}\['x'\]$"),
    Bad("StudySpec.name", {"name": "a\nb"}, rf"name: {NAME}'a\\nb'$"),
    Bad("StudySpec.name", {"name": "x/y"}, rf"name: {NAME}'x/y'$"),
    Bad("StudySpec.<unknown>", {"studyname": "x"},
        rf"studyname: unknown key, did you mean 'name'\? \({SECTIONS}"),
    Bad("StudySpec.<unknown>", {1: "x"}, rf"1: unknown key \({SECTIONS}"),
    # ------------------------------------------------------------------ objective
    Bad("StudySpec.objective", {"objective": "val_loss"},
        r"objective: expected a mapping, got 'val_loss'$"),
    Bad("ObjectiveSpec.metric", {"objective": {"metric": "val loss"}},
        rf"objective\.metric: {METRIC}'val loss'$"),
    Bad("ObjectiveSpec.metric", {"objective": {"metric": 3}}, rf"objective\.metric: {METRIC}3$"),
    Bad("ObjectiveSpec.metric", {"objective": {"metric": "f1"}},
        r"objective\.metric: expected a metric, one of: val_loss, .*; got 'f1' \(or any metric "
        r"your own trainer: reports\)$"),
    Bad("ObjectiveSpec.metric",
        {"objective": {"metric": "val_loss", "metrics": ["val_loss", "epoch_seconds"]}},
        r"objective\.metric: give metric \(one objective\) or metrics \(several\), not both$"),
    Bad("ObjectiveSpec.direction", {"objective": {"direction": "max"}},
        r"objective\.direction: expected one of: minimize, maximize; got 'max'$"),
    Bad("ObjectiveSpec.direction", {"objective": {"direction": 1}},
        r"objective\.direction: expected one of: minimize, maximize; got 1$"),
    Bad("ObjectiveSpec.direction", {"objective": {"direction": "maximize"}},
        r"objective\.direction: expected minimize for val_loss, got 'maximize'$"),
    Bad("ObjectiveSpec.direction",
        {"objective": {"direction": "minimize", "metrics": ["val_loss", "epoch_seconds"]}},
        r"objective\.direction: give direction \(one objective\) or directions \(several\)"),
    Bad("ObjectiveSpec.metrics", {"objective": {"metrics": "val_loss"}},
        r"objective\.metrics: expected a list, got 'val_loss'$"),
    Bad("ObjectiveSpec.metrics", {"objective": {"metrics": ["val_loss"]}},
        r"objective\.metrics: expected two or more distinct metrics, got \['val_loss'\]$"),
    Bad("ObjectiveSpec.metrics", {"objective": {"metrics": []}},
        r"objective\.metrics: expected two or more distinct metrics, got \[\]$"),
    Bad("ObjectiveSpec.metrics", {"objective": {"metrics": ["val_loss", "val_loss"]}},
        r"objective\.metrics: expected two or more distinct metrics, got "
        r"\['val_loss', 'val_loss'\]$"),
    Bad("ObjectiveSpec.metrics", {"objective": {"metrics": ["val_loss", None]}},
        rf"objective\.metrics\[1\]: {METRIC}null$"),
    Bad("ObjectiveSpec.metrics", {"objective": {"metrics": ["val_loss", "val_los"]}},
        r"objective\.metrics\[1\]: expected a metric, one of: .*; got 'val_los', "
        r"did you mean 'val_loss'\?"),
    Bad("ObjectiveSpec.directions", {"objective": {"directions": ["minimize"]}},
        r"objective\.directions: directions go with metrics \(several objectives\); "
        r"use direction$"),
    Bad("ObjectiveSpec.directions",
        {"objective": {"metrics": ["val_loss", "epoch_seconds"], "directions": "minimize"}},
        r"objective\.directions: expected a list, got 'minimize'$"),
    Bad("ObjectiveSpec.directions",
        {"objective": {"metrics": ["val_loss", "epoch_seconds"], "directions": ["min", "up"]}},
        r"objective\.directions\[0\]: expected one of: minimize, maximize; got 'min'$"),
    Bad("ObjectiveSpec.directions",
        {"objective": {"metrics": ["val_loss", "epoch_seconds"],
                       "directions": ["minimize", "maximize"]}},
        r"objective\.directions\[1\]: expected minimize for epoch_seconds, got 'maximize'$"),
    Bad("ObjectiveSpec.<unknown>", {"objective": {"metirc": "val_loss"}},
        r"objective\.metirc: unknown key, did you mean 'metric'\? \(expected one of: metric, "
        r"direction, metrics, directions\)$"),
    # ------------------------------------------------------------------ budget
    Bad("StudySpec.budget", {"budget": 60}, r"budget: expected a mapping, got 60$"),
    Bad("Budget.trials", {"budget": {"trials": 2.5}},
        r"budget\.trials: expected an integer, got 2\.5$"),
    Bad("Budget.trials", {"budget": {"trials": None}},
        r"budget\.trials: expected an integer, got null$"),
    Bad("Budget.trials", {"budget": {"trials": -1}},
        r"budget\.trials: expected at least 1, got -1$"),
    Bad("Budget.epochs", {"budget": {"epochs": 0}}, r"budget\.epochs: expected at least 1, got 0$"),
    Bad("Budget.epochs", {"budget": {"epochs": 2.0}},
        r"budget\.epochs: expected an integer, got 2\.0$"),
    Bad("Budget.epochs", {"budget": {"epochs": "5"}},
        r"budget\.epochs: expected an integer, got '5'$"),
    Bad("Budget.epochs", {"budget": {"epochs": False}},
        r"budget\.epochs: expected an integer, got false$"),
    Bad("Budget.timeout_s", {"budget": {"timeout_s": 0}},
        r"budget\.timeout_s: expected a positive number of seconds or null, got 0$"),
    Bad("Budget.timeout_s", {"budget": {"timeout_s": "1h"}},
        r"budget\.timeout_s: expected a number, got '1h'$"),
    Bad("Budget.timeout_s", {"budget": {"timeout_s": True}},
        r"budget\.timeout_s: expected a number, got true$"),
    Bad("Budget.timeout_s", {"budget": {"timeout_s": math.inf}},
        r"budget\.timeout_s: expected a finite number, got inf$"),
    Bad("Budget.<unknown>", {"budget": {"timeout": 60}},
        r"budget\.timeout: unknown key, did you mean 'timeout_s'\?"),
    # ------------------------------------------------------------------ sampler
    Bad("StudySpec.sampler", {"sampler": "tpe"}, r"sampler: expected a mapping, got 'tpe'$"),
    Bad("SamplerSpec.type", {"sampler": {"type": 1}},
        r"sampler\.type: expected a sampler, one of: tpe, .*; got 1$"),
    Bad("SamplerSpec.type", {"sampler": {"type": None}},
        r"sampler\.type: expected a sampler, one of: tpe, .*; got null$"),
    Bad("SamplerSpec.type", {"sampler": {"type": "TPE"}},
        r"sampler\.type: expected a sampler, one of: .*; got 'TPE'$"),
    Bad("SamplerSpec.seed", {"sampler": {"seed": "0"}},
        r"sampler\.seed: expected an integer, got '0'$"),
    Bad("SamplerSpec.seed", {"sampler": {"seed": 1.5}},
        r"sampler\.seed: expected an integer, got 1\.5$"),
    Bad("SamplerSpec.seed", {"sampler": {"seed": True}},
        r"sampler\.seed: expected an integer, got true$"),
    Bad("SamplerSpec.seed", {"sampler": {"seed": -1}},
        r"sampler\.seed: expected an integer from 0 to 4294967295 or null, got -1$"),
    Bad("SamplerSpec.seed", {"sampler": {"seed": 2**32}},
        r"sampler\.seed: expected an integer from 0 to 4294967295 or null, got 4294967296$"),
    Bad("SamplerSpec.options", {"sampler": {"options": [1]}},
        r"sampler\.options: expected a mapping, got \[1\]$"),
    Bad("SamplerSpec.options", {"sampler": {"options": None}},
        r"sampler\.options: expected a mapping, got null$"),
    Bad("SamplerSpec.options", {"sampler": {"options": {1: 2}}},
        r"sampler\.options: expected string keys, got 1$"),
    Bad("SamplerSpec.options", {"sampler": {"options": {"seed": 1}}},
        r"sampler\.options\.seed: set sampler\.seed instead$"),
    Bad("SamplerSpec.options",
        {"sampler": {"type": "grid", "options": {"search_space": {}}}, "space": {
            "batch_size": {"pow2": [32, 64]}}},
        r"sampler\.options\.search_space: the grid sampler takes its grid from the space$"),
    Bad("SamplerSpec.options", {"sampler": {"type": "random", "options": {"n_startup_trials": 5}}},
        r"sampler\.options\.n_startup_trials: unknown option of RandomSampler \(expected one "
        r"of: none\)$"),
    Bad("SamplerSpec.options", {"sampler": {"type": "nsga2", "options": {"population_size": 1}}},
        r"sampler\.options: `population_size` must be greater than or equal to 2\.$"),
    Bad("SamplerSpec.options", {"sampler": {"type": "qmc", "options": {"qmc_type": "x"}}},
        r"sampler\.options: The `qmc_type='x'` is invalid\."),
    Bad("SamplerSpec.<unknown>", {"sampler": {"type": "tpe", "sed": 1}},
        r"sampler\.sed: unknown key, did you mean 'seed'\?"),
    # ------------------------------------------------------------------ pruner
    Bad("StudySpec.pruner", {"pruner": "none"}, r"pruner: expected a mapping, got 'none'$"),
    Bad("PrunerSpec.type", {"pruner": {"type": 3}},
        r"pruner\.type: expected a pruner, one of: hyperband, asha, median, percentile, none, "
        r"threshold, wilcoxon, patient, or a class by import path \(pkg\.module:Class\); got 3$"),
    Bad("PrunerSpec.type", {"pruner": {"type": "optuna.samplers:TPESampler"}},
        r"pruner\.type: optuna\.samplers:TPESampler: expected a subclass of "
        r"optuna\.pruners\.BasePruner, got a sampler class$"),
    Bad("PrunerSpec.type", {"pruner": {"type": "optuna.pruners:"}},
        r"pruner\.type: expected an import path pkg\.module:Class, got 'optuna\.pruners:'$"),
    Bad("PrunerSpec.type", {"pruner": {"type": None}},
        r"pruner\.type: expected a pruner, one of: .*; got null$"),
    Bad("PrunerSpec.options", {"pruner": {"options": []}},
        r"pruner\.options: expected a mapping, got \[\]$"),
    Bad("PrunerSpec.options", {"pruner": {"type": "median", "options": {"n_warmup_step": 1}}},
        r"pruner\.options\.n_warmup_step: unknown option of MedianPruner, did you mean "
        r"'n_warmup_steps'\? \(expected one of: n_startup_trials, n_warmup_steps, "),
    Bad("PrunerSpec.options", {"pruner": {"type": "none", "options": {"patience": 2}}},
        r"pruner\.options\.patience: unknown option of NopPruner \(expected one of: none\)$"),
    Bad("PrunerSpec.options", {"pruner": {"type": "median", "options": {"n_warmup_steps": -1}}},
        r"pruner\.options: Number of warmup steps cannot be negative, but got "
        r"n_warmup_steps=-1\.$"),
    Bad("PrunerSpec.options", {"pruner": {"type": "percentile", "options": {"percentile": 150}}},
        r"pruner\.options: Percentile must be between 0 and 100 inclusive, but got "
        r"percentile=150\.$"),
    Bad("PrunerSpec.options", {"pruner": {"type": "median", "options": {"n_warmup_steps": "x"}}},
        r"pruner\.options: median does not accept these options \("),
    Bad("PrunerSpec.<unknown>", {"pruner": {"typ": "none"}},
        r"pruner\.typ: unknown key, did you mean 'type'\? \(expected one of: type, options, "
        r"within, wrapped\)$"),
    Bad("PrunerSpec.wrapped", {"pruner": {"type": "patient", "options": {"patience": 2}}},
        r"pruner\.wrapped: required key is missing: the pruner patience defers to, e\.g\. "
        r"wrapped: \{type: median\} \(\{type: none\}: patience alone\)$"),
    Bad("PrunerSpec.wrapped", {"pruner": {"type": "median", "wrapped": {"type": "median"}}},
        r"pruner\.wrapped: goes with type: patient, and the type is 'median'$"),
    Bad("PrunerSpec.wrapped", {"pruner": {"type": "patient", "options": {"patience": 2},
                                          "wrapped": {"type": "median", "within": ["lr"]}}},
        r"pruner\.wrapped\.within: groups trials for the whole pruner: set pruner\.within$"),
    Bad("PrunerSpec.wrapped", {"pruner": {"type": "patient", "options": {"patience": 2},
                                          "wrapped": {"type": "medain"}}},
        r"pruner\.wrapped\.type: expected a pruner, one of: .*; got 'medain', did you mean "
        r"'median'\?$"),
    Bad("PrunerSpec.options", {"pruner": {"type": "patient", "options": {"patience": 2,
                                          "wrapped_pruner": 1}, "wrapped": {"type": "median"}}},
        r"pruner\.options\.wrapped_pruner: set pruner\.wrapped instead$"),
    Bad("PrunerSpec.within", {"pruner": {"within": "optimizer"}},
        r"pruner\.within: expected a list, got 'optimizer'$"),
    Bad("PrunerSpec.within", {"pruner": {"within": [3]}},
        r"pruner\.within\[0\]: expected a string, got 3$"),
    # ------------------------------------------------------------------ run
    Bad("StudySpec.run", {"run": 5}, r"run: expected a mapping, got 5$"),
    Bad("RunSpec.checkpoint_dir", {"run": {"checkpoint_dir": 3}},
        r"run\.checkpoint_dir: expected a string, got 3$"),
    Bad("RunSpec.checkpoint_dir", {"run": {"checkpoint_dir": ["ckpt"]}},
        r"run\.checkpoint_dir: expected a string, got \['ckpt'\]$"),
    Bad("RunSpec.keep_checkpoints", {"run": {"keep_checkpoints": "yes"}},
        r"run\.keep_checkpoints: expected true or false, got 'yes'$"),
    Bad("RunSpec.keep_checkpoints", {"run": {"keep_checkpoints": 1}},
        r"run\.keep_checkpoints: expected true or false, got 1$"),
    Bad("RunSpec.keep_checkpoints", {"run": {"keep_checkpoints": None}},
        r"run\.keep_checkpoints: expected true or false, got null$"),
    Bad("RunSpec.heartbeat_interval", {"run": {"heartbeat_interval": 2.5}},
        r"run\.heartbeat_interval: expected an integer, got 2\.5$"),
    Bad("RunSpec.heartbeat_interval", {"run": {"heartbeat_interval": -1}},
        r"run\.heartbeat_interval: expected a number greater than 0, got -1$"),
    Bad("RunSpec.heartbeat_interval", {"run": {"heartbeat_interval": "10"}},
        r"run\.heartbeat_interval: expected an integer, got '10'$"),
    Bad("RunSpec.grace_period", {"run": {"grace_period": 0}},
        r"run\.grace_period: expected a number greater than 0, got 0$"),
    Bad("RunSpec.grace_period", {"run": {"grace_period": "30"}},
        r"run\.grace_period: expected an integer, got '30'$"),
    Bad("RunSpec.grace_period", {"run": {"grace_period": 5}},
        r"run\.grace_period: expected more than heartbeat_interval \(10\), got 5$"),
    Bad("RunSpec.max_failures_in_row", {"run": {"max_failures_in_row": 0}},
        r"run\.max_failures_in_row: expected a number greater than 0, got 0$"),
    Bad("RunSpec.max_failures_in_row", {"run": {"max_failures_in_row": 1.5}},
        r"run\.max_failures_in_row: expected an integer, got 1\.5$"),
    Bad("RunSpec.max_failures_in_row", {"run": {"max_failures_in_row": None}},
        r"run\.max_failures_in_row: expected an integer, got null$"),
    Bad("RunSpec.pack", {"run": {"pack": 0}},
        r"run\.pack: expected auto or an integer from 1 to 256 \(trials trained at once\), "
        r"got 0$"),
    Bad("RunSpec.pack", {"run": {"pack": "max"}},
        r"run\.pack: expected auto or an integer from 1 to 256 .*, got 'max'$"),
    Bad("StudySpec.resources", {"resources": [2]},
        r"resources: expected a mapping"),
    Bad("Resources.gpus", {"resources": {"gpus": 0}},
        r"resources\.gpus: expected a whole number 1 or more, got 0$"),
    Bad("Resources.gpus", {"resources": {"gpus": True}},
        r"resources\.gpus: expected a whole number 1 or more, got true$"),
    Bad("Resources.processes", {"resources": {"processes": 1.5}},
        r"resources\.processes: expected a whole number 1 or more, got 1\.5$"),
    Bad("Resources.<unknown>", {"resources": {"nodes": 2}},
        r"resources\.nodes: unknown key"),
    Bad("RunSpec.<unknown>", {"run": {"heartbeat": 5}},
        r"run\.heartbeat: unknown key, did you mean 'heartbeat_interval'\?"),
    # ------------------------------------------------------------------ constraints
    Bad("StudySpec.constraints", {"constraints": {"metric": "val_loss", "max": 1}},
        r"constraints: expected a list"),
    Bad("StudySpec.constraints", {"constraints": [{"metric": "val_loss", "max": 1}],
                                  "sampler": {"type": "random"}},
        r"constraints: sampler 'random' ignores constraints; the samplers that use them are "
        r"tpe, nsga2, gp"),
    Bad("Constraint.metric", {"constraints": [{"metric": "val_los", "max": 1}]},
        r"constraints\[0\]\.metric: expected a metric of the built-in trainer, .*got "
        r"'val_los', did you mean 'val_loss'\?"),
    Bad("Constraint.max", {"constraints": [{"metric": "val_loss", "max": "1"}]},
        r"constraints\[0\]\.max: expected a number, got '1'$"),
    Bad("Constraint.min", {"constraints": [{"metric": "val_loss", "min": 2, "max": 1}]},
        r"constraints\[0\]\.min: expected min <= max, got min: 2, max: 1$"),
    Bad("Constraint.<unknown>", {"constraints": [{"metric": "val_loss", "below": 1}]},
        r"constraints\[0\]\.below: unknown key"),
    # ------------------------------------------------------------------ tracking
    Bad("StudySpec.tracking", {"tracking": "mlflow"}, r"tracking: expected a mapping, got "
                                                       r"'mlflow'$"),
    Bad("TrackingSpec.<unknown>", {"tracking": {"tensorbord": "tb"}},
        r"tracking\.tensorbord: unknown key, did you mean 'tensorboard'\?"),
    Bad("TrackingSpec.mlflow", {"tracking": {"mlflow": "http://x"}},
        r"tracking\.mlflow: expected a mapping, got 'http://x'$"),
    Bad("TrackingSpec.tensorboard", {"tracking": {"tensorboard": 3}},
        r"tracking\.tensorboard: expected a non-empty string, got 3$"),
    Bad("TrackingSpec.wandb", {"tracking": {"wandb": "p"}},
        r"tracking\.wandb: expected a mapping, got 'p'$"),
    Bad("MlflowSpec.<unknown>", {"tracking": {"mlflow": {"uri": "http://x", "experimnt": "e"}}},
        r"tracking\.mlflow\.experimnt: unknown key, did you mean 'experiment'\?"),
    Bad("MlflowSpec.uri", {"tracking": {"mlflow": {}}},
        r"tracking\.mlflow\.uri: required key is missing$"),
    Bad("MlflowSpec.experiment", {"tracking": {"mlflow": {"uri": "http://x", "experiment": ""}}},
        r"tracking\.mlflow\.experiment: expected a non-empty string, got ''$"),
    Bad("MlflowSpec.timeout", {"tracking": {"mlflow": {"uri": "http://x", "timeout": 2.5}}},
        r"tracking\.mlflow\.timeout: expected an integer, got 2\.5$"),
    Bad("MlflowSpec.retries", {"tracking": {"mlflow": {"uri": "http://x", "retries": -1}}},
        r"tracking\.mlflow\.retries: expected at least 0, got -1$"),
    Bad("WandbSpec.<unknown>", {"tracking": {"wandb": {"projet": "p"}}},
        r"tracking\.wandb\.projet: unknown key, did you mean 'project'\?"),
    Bad("WandbSpec.project", {"tracking": {"wandb": {"project": ["p"]}}},
        r"tracking\.wandb\.project: expected a non-empty string, got \['p'\]$"),
    Bad("WandbSpec.entity", {"tracking": {"wandb": {"entity": 1}}},
        r"tracking\.wandb\.entity: expected a non-empty string, got 1$"),
    Bad("WandbSpec.mode", {"tracking": {"wandb": {"mode": "cloud"}}},
        r"tracking\.wandb\.mode: expected one of: online, offline, got 'cloud'$"),
    Bad("WandbSpec.dir", {"tracking": {"wandb": {"dir": ""}}},
        r"tracking\.wandb\.dir: expected a non-empty string, got ''$"),
    # ------------------------------------------------------------------ space: the mapping
    Bad("StudySpec.space", {"space": ["lr"]}, r"space: expected a mapping, got \['lr'\]$"),
    Bad("StudySpec.space", {"space": DROP}, r"space: required key is missing$"),
    Bad("StudySpec.space", {"space": {1: LR}}, r"space: expected string keys, got 1$"),
    Bad("StudySpec.space", {"space": {"lr": [1e-3, 0.1]}},
        rf"space\.lr: {ENTRY}, got \[0\.001, 0\.1\]$"),
    Bad("StudySpec.space", {"space": {"lr": None}}, rf"space\.lr: {ENTRY}, got null$"),
    Bad("StudySpec.space", {"space": {"lr": {"auto": True, "low": 1e-3}}},
        rf"space\.lr: {ENTRY}, got \{{auto: true, low: 0\.001\}}$"),
    Bad("StudySpec.space", {"space": {"optimizer": {"choices": ["sgd"], "grid": [1]}}},
        rf"space\.optimizer: {ENTRY}, got \{{choices: \['sgd'\], grid: \[1\]\}}$"),
    # ------------------------------------------------------------------ space: when (any form)
    Bad("Entry.when", when(["optimizer"]),
        r"space\.momentum\.when: expected a mapping, got \['optimizer'\]$"),
    Bad("Entry.when", when("optimizer"),
        r"space\.momentum\.when: expected a mapping, got 'optimizer'$"),
    Bad("Entry.when", when({1: "sgd"}), r"space\.momentum\.when: expected string keys, got 1$"),
    Bad("Entry.when", when({"optimizer": []}),
        r"space\.momentum\.when\.optimizer: expected a value or a list of values, got \[\]$"),
    Bad("Entry.when", when({"optimizer": ["sgd", "nadam"]}),
        r"space\.momentum\.when\.optimizer\[1\]: expected one of \['sgd', 'adam'\] "
        r"\(space\.optimizer\), got 'nadam'$"),
    Bad("Entry.when", space(optimizer={"choices": ["sgd", "adam"], "when": {"optimizer": "sgd"}}),
        r"space\.optimizer\.when: expected conditions without a cycle, got optimizer → optimizer$"),
    Bad("Entry.when", {"space": {"lr": {"auto": True, "when": {"optimizer": "sgd"}}},
                       "fixed": {"optimizer": "adam"}},
        r"space\.lr\.when\.optimizer: never true: fixed\.optimizer is 'adam', got \['sgd'\]$"),
    # ------------------------------------------------------------------ space: range
    Bad("RangeEntry.low", {"space": {"lr": {"low": "a", "high": 0.1}}},
        r"space\.lr\.low: expected a number, got 'a'$"),
    Bad("RangeEntry.low", {"space": {"lr": {"low": True, "high": 0.1}}},
        r"space\.lr\.low: expected a number, got true$"),
    Bad("RangeEntry.low", {"space": {"lr": {"low": None, "high": 0.1}}},
        r"space\.lr\.low: expected a number, got null$"),
    Bad("RangeEntry.low", {"space": {"lr": {"low": math.nan, "high": 0.1}}},
        r"space\.lr\.low: expected a finite number, got nan$"),
    Bad("RangeEntry.low", {"space": {"lr": {"high": 0.1}}},
        r"space\.lr\.low: required key is missing$"),
    Bad("RangeEntry.low", {"space": {"lr": {"low": 0, "high": 0.1, "log": True}}},
        r"space\.lr\.low: expected a positive number for a log range, got 0$"),
    Bad("RangeEntry.high", {"space": {"lr": {"low": 1e-3}}},
        r"space\.lr\.high: required key is missing$"),
    Bad("RangeEntry.high", {"space": {"lr": {"low": 1e-3, "high": "0.1"}}},
        r"space\.lr\.high: expected a number, got '0\.1'$"),
    Bad("RangeEntry.high", {"space": {"lr": {"low": 1e-3, "high": -math.inf}}},
        r"space\.lr\.high: expected a finite number, got -inf$"),
    Bad("RangeEntry.high", {"space": {"lr": {"low": 0.1, "high": 0.1}}},
        r"space\.lr\.high: expected a number greater than low \(0\.1\), got 0\.1; to hold a value "
        r"constant put it under fixed$"),
    Bad("RangeEntry.log", {"space": {"lr": {"low": 1e-3, "high": 0.1, "log": "yes"}}},
        r"space\.lr\.log: expected true or false, got 'yes'$"),
    Bad("RangeEntry.log", {"space": {"lr": {"low": 1e-3, "high": 0.1, "log": 1}}},
        r"space\.lr\.log: expected true or false, got 1$"),
    Bad("RangeEntry.log", {"space": {"lr": {"low": 1e-3, "high": 0.1, "log": None}}},
        r"space\.lr\.log: expected true or false, got null$"),
    Bad("RangeEntry.step", space(dropout={"low": 0.0, "high": 0.5, "step": "0.1"}),
        r"space\.dropout\.step: expected a number, got '0\.1'$"),
    Bad("RangeEntry.step", space(dropout={"low": 0.0, "high": 0.5, "step": 0}),
        r"space\.dropout\.step: expected a positive number, got 0$"),
    Bad("RangeEntry.step", space(dropout={"low": 0.0, "high": 0.5, "step": -0.1}),
        r"space\.dropout\.step: expected a positive number, got -0\.1$"),
    Bad("RangeEntry.step", space(dropout={"low": 0.0, "high": 0.5, "step": True}),
        r"space\.dropout\.step: expected a number, got true$"),
    Bad("RangeEntry.step", {"space": {"lr": {**LR, "step": 0.01}}},
        r"space\.lr\.step: a log range cannot have a step \(Optuna takes one or the other\), "
        r"got 0\.01$"),
    Bad("RangeEntry.step", space(batch_size={"low": 16, "high": 33, "step": 8.5}),
        r"space\.batch_size\.step: expected an integer \(batch_size is one\), got 8\.5$"),
    Bad("RangeEntry.int", space(warmup_epochs={"low": 0, "high": 3, "int": "yes"}),
        r"space\.warmup_epochs\.int: expected true or false, got 'yes'$"),
    Bad("RangeEntry.int", space(warmup_epochs={"low": 0, "high": 3, "int": 1}),
        r"space\.warmup_epochs\.int: expected true or false, got 1$"),
    Bad("RangeEntry.int", space(warmup_epochs={"low": 0.5, "high": 3, "int": True}),
        r"space\.warmup_epochs\.low: expected an integer \(int: true\), got 0\.5$"),
    Bad("RangeEntry.int", space(warmup_epochs={"low": 0, "high": 3, "step": 0.5, "int": True}),
        r"space\.warmup_epochs\.step: expected an integer \(int: true\), got 0\.5$"),
    Bad("RangeEntry.int", space(batch_size={"low": 16, "high": 64, "int": False}),
        r"space\.batch_size\.int: batch_size is an integer setting, got false$"),
    Bad("RangeEntry.per_batch", {"space": {"lr": {**LR, "per_batch": 0}}},
        r"space\.lr\.per_batch: expected at least 1, got 0$"),
    Bad("RangeEntry.per_batch", {"space": {"lr": {**LR, "per_batch": 256.0}}},
        r"space\.lr\.per_batch: expected an integer, got 256\.0$"),
    Bad("RangeEntry.per_batch", {"space": {"lr": {**LR, "per_batch": True}}},
        r"space\.lr\.per_batch: expected an integer, got true$"),
    Bad("RangeEntry.per_batch", space(momentum={"low": 0.8, "high": 0.9, "per_batch": 256}),
        r"space\.momentum\.per_batch: only lr scales with the batch size, got per_batch on "
        r"momentum$"),
    Bad("RangeEntry.per_batch",
        {"space": {"lr": {**LR, "per_batch": 256}}, "fixed": {"optimizer.lr_per_batch": 128}},
        r"space\.lr\.per_batch: also set by fixed\.optimizer\.lr_per_batch; keep one$"),
    Bad("RangeEntry.per_batch", own(COMMAND, space={"lr": {**LR, "per_batch": 256}}),
        r"space\.lr\.per_batch: linear lr scaling is the built-in trainer's; scale the lr in "
        r"your own code$"),
    Bad("RangeEntry.<unknown>", {"space": {"lr": {**LR, "high_": 1}}},
        r"space\.lr\.high_: unknown key, did you mean 'high'\? \(expected one of: when, low, high, "
        r"log, step, int, per_batch\)$"),
    # ------------------------------------------------------------------ space: choices
    Bad("ChoicesEntry.choices", space(optimizer={"choices": []}),
        r"space\.optimizer\.choices: expected at least one choice, got \[\]$"),
    Bad("ChoicesEntry.choices", space(optimizer={"choices": "sgd"}),
        r"space\.optimizer\.choices: expected a list, got 'sgd'$"),
    Bad("ChoicesEntry.choices", space(optimizer={"choices": None}),
        r"space\.optimizer\.choices: expected a list, got null$"),
    Bad("ChoicesEntry.choices", space(optimizer={"choices": ["sgd", {"name": "adam"}]}),
        r"space\.optimizer\.choices\[1\]: expected a string, number, true/false, null or a list "
        r"of those, got \{name: 'adam'\}$"),
    Bad("ChoicesEntry.choices", space(hidden={"choices": [[[32]]]}),
        r"space\.hidden\.choices\[0\]: expected a string, number, .*, got \[\[32\]\]$"),
    Bad("ChoicesEntry.choices", space(optimizer={"choices": ["sgd", "adam", "sgd"]}),
        r"space\.optimizer\.choices\[2\]: expected distinct choices, got 'sgd' twice$"),
    Bad("ChoicesEntry.choices", space(hidden={"choices": [[32, 16], "32,16"]}),
        r"space\.hidden\.choices\[1\]: expected distinct choices, got '32,16' twice$"),
    Bad("ChoicesEntry.<unknown>", space(optimizer={"choices": ["sgd", "adam"], "log": True}),
        r"space\.optimizer\.log: unknown key \(expected one of: when, choices\)$"),
    # ------------------------------------------------------------------ space: grid
    Bad("GridEntry.grid", space(weight_decay={"grid": []}),
        r"space\.weight_decay\.grid: expected at least one number, got \[\]$"),
    Bad("GridEntry.grid", space(weight_decay={"grid": "0, 1e-4"}),
        r"space\.weight_decay\.grid: expected a list, got '0, 1e-4'$"),
    Bad("GridEntry.grid", space(weight_decay={"grid": [0, "1e-4"]}),
        r"space\.weight_decay\.grid\[1\]: expected a number, got '1e-4'$"),
    Bad("GridEntry.grid", space(weight_decay={"grid": [0, True]}),
        r"space\.weight_decay\.grid\[1\]: expected a number, got true$"),
    Bad("GridEntry.grid", space(weight_decay={"grid": [0, math.nan]}),
        r"space\.weight_decay\.grid\[1\]: expected a finite number, got nan$"),
    Bad("GridEntry.grid", space(weight_decay={"grid": [0, -1]}),
        r"space\.weight_decay\.grid\[0\]: expected zero or positive, got -1"),
    Bad("GridEntry.<unknown>", space(weight_decay={"grid": [0, 1e-4], "step": 1e-4}),
        r"space\.weight_decay\.step: unknown key \(expected one of: when, grid\)$"),
    # ------------------------------------------------------------------ space: pow2
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [32]}),
        r"space\.batch_size\.pow2: expected two powers of two \[low, high\], got \[32\]$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [32, 64, 128]}),
        r"space\.batch_size\.pow2: expected two powers of two \[low, high\], got "
        r"\[32, 64, 128\]$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": "32..256"}),
        r"space\.batch_size\.pow2: expected a list, got '32\.\.256'$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [32.0, 256]}),
        r"space\.batch_size\.pow2\[0\]: expected an integer, got 32\.0$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [True, 256]}),
        r"space\.batch_size\.pow2\[0\]: expected an integer, got true$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [0, 256]}),
        r"space\.batch_size\.pow2\[0\]: expected a power of two \(nearest: 1\), got 0$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [-32, 256]}),
        r"space\.batch_size\.pow2\[0\]: expected a power of two \(nearest: 1\), got -32$"),
    Bad("Pow2Entry.pow2", space(batch_size={"pow2": [64, 64]}),
        r"space\.batch_size\.pow2\[1\]: expected a power of two greater than 64, got 64$"),
    Bad("Pow2Entry.pow2", space(optimizer={"pow2": [1, 2]}),
        r"space\.optimizer\.pow2\[0\]: expected a string, got 1$"),
    Bad("Pow2Entry.<unknown>", space(batch_size={"pow2": [32, 256], "int": True}),
        r"space\.batch_size\.int: unknown key \(expected one of: when, pow2\)$"),
    # ------------------------------------------------------------------ space: auto
    Bad("AutoEntry.auto", {"space": {"lr": {"auto": False}}},
        r"space\.lr\.auto: expected true \(to search a range give \{low, high, log: true\}\), "
        r"got false$"),
    Bad("AutoEntry.auto", {"space": {"lr": {"auto": "yes"}}},
        r"space\.lr\.auto: expected true or false, got 'yes'$"),
    Bad("AutoEntry.auto", {"space": {"lr": {"auto": 1}}},
        r"space\.lr\.auto: expected true or false, got 1$"),
    Bad("AutoEntry.auto", {"space": {"lr": {"auto": None}}},
        r"space\.lr\.auto: expected true or false, got null$"),
    Bad("AutoEntry.auto", space(momentum={"auto": True}),
        r"space\.momentum\.auto: only lr can be found by the LR range test; give a range$"),
    Bad("AutoEntry.per_batch", {"space": {"lr": {"auto": True, "per_batch": 0}}},
        r"space\.lr\.per_batch: expected at least 1, got 0$"),
    Bad("AutoEntry.per_batch", {"space": {"lr": {"auto": True, "per_batch": "256"}}},
        r"space\.lr\.per_batch: expected an integer, got '256'$"),
    Bad("AutoEntry.per_batch", {"space": {"lr": {"auto": True, "per_batch": 256}},
                                "fixed": {"optimizer.lr_per_batch": 256}},
        r"space\.lr\.per_batch: also set by fixed\.optimizer\.lr_per_batch; keep one$"),
    Bad("AutoEntry.<unknown>", {"space": {"lr": {"auto": True, "log": True}}},
        r"space\.lr\.log: unknown key \(expected one of: when, auto, per_batch\)$"),
    # ------------------------------------------------------------------ fixed, enqueue
    Bad("StudySpec.fixed", {"fixed": ["init"]}, r"fixed: expected a mapping, got \['init'\]$"),
    Bad("StudySpec.fixed", {"fixed": None}, r"fixed: expected a mapping, got null$"),
    Bad("StudySpec.fixed", {"fixed": {1: 2}}, r"fixed: expected string keys, got 1$"),
    Bad("StudySpec.fixed", {"fixed": {"epochs": 3}},
        r"fixed\.epochs: the number of epochs is budget\.epochs \(the pruners' resource\); set "
        r"it there$"),
    Bad("StudySpec.enqueue", {"enqueue": {"lr": 0.01}},
        r"enqueue: expected a list, got \{lr: 0\.01\}$"),
    Bad("StudySpec.enqueue", {"enqueue": None}, r"enqueue: expected a list, got null$"),
    Bad("StudySpec.enqueue", {"enqueue": ["lr"]}, r"enqueue\[0\]: expected a mapping, got 'lr'$"),
    Bad("StudySpec.enqueue", {"enqueue": [{1: 0.01}]},
        r"enqueue\[0\]: expected string keys, got 1$"),
    Bad("StudySpec.enqueue", {"enqueue": [{"lr": "0.01"}]},
        r"enqueue\[0\]\.lr: expected a number from 0\.001 to 0\.1, got '0\.01'$"),
    Bad("StudySpec.enqueue", {"enqueue": [{"lr": True}]},
        r"enqueue\[0\]\.lr: expected a number from 0\.001 to 0\.1, got true$"),
    # ------------------------------------------------------------------ data, model
    Bad("StudySpec.data", {"data": DROP}, r"data: required key is missing$"),
    Bad("StudySpec.data", {"data": "synthetic"}, r"data: expected a mapping, got 'synthetic'$"),
    Bad("StudySpec.data", {"data": {1: 2}}, r"data: expected string keys, got 1$"),
    Bad("StudySpec.data", {"data": {"dataset": "synthetic", "val_fration": 0.1}},
        r"data\.val_fration: unknown key, did you mean 'val_fraction'\? \(expected one of: "),
    Bad("StudySpec.model", {"model": DROP}, r"model: required key is missing$"),
    Bad("StudySpec.model", {"model": ["mlp"]}, r"model: expected a mapping, got \['mlp'\]$"),
    Bad("StudySpec.model", {"model": {"hiden": [32]}},
        r"model\.hiden: unknown key, did you mean 'hidden'\? \(expected one of: type, "),
    Bad("StudySpec.model", own(COMMAND, model={"type": "mlp"}),
        r"model: goes with the built-in trainer; your trainer \(python train\.py\) reads its own "
        r"data and builds its own model: put their settings under fixed:$"),
    # ------------------------------------------------------------------ trainer
    Bad("StudySpec.trainer", own(3), r"trainer: expected a mapping, got 3$"),
    Bad("StudySpec.trainer", own(["pkg.train:fit"]),
        r"trainer: expected a mapping, got \['pkg\.train:fit'\]$"),
    Bad("StudySpec.trainer", own({}),
        r"trainer: expected a function \(trainer: pkg\.module:fit\) or a command \(trainer: "
        r"\{command: \[python, train\.py, \.\.\.\]\}\), one of them$"),
    Bad("TrainerSpec.function", own(""),
        r"trainer\.function: expected an import path module:function, got ''$"),
    Bad("TrainerSpec.function", own("pkg.train:"),
        r"trainer\.function: expected an import path module:function, got 'pkg\.train:'$"),
    Bad("TrainerSpec.function", own({"function": 3}),
        r"trainer\.function: expected a string, got 3$"),
    Bad("TrainerSpec.command", own({"command": "python train.py"}),
        r"trainer\.command: expected a list, got 'python train\.py'$"),
    Bad("TrainerSpec.command", own({"command": ["python", "train.py", True]}),
        rf"trainer\.command\[2\]: {ARGUMENT}true$"),
    Bad("TrainerSpec.command", own({"command": ["python", "train.py", None]}),
        rf"trainer\.command\[2\]: {ARGUMENT}null$"),
    Bad("TrainerSpec.command", own({"command": ["python", {"lr": "{lr}"}]}),
        rf"trainer\.command\[1\]: {ARGUMENT}\{{lr: '\{{lr\}}'\}}$"),
    Bad("TrainerSpec.command", own({"command": ["python", "train.py", "--seed={sed}"]}),
        r"trainer\.command\[2\]: \{sed\} names no parameter \(expected a key of space or "
        r"fixed, or one of: trial_number, study_name, checkpoint_dir, epochs, device, nproc, "
        r"gpus, master_port\)$"),
    Bad("TrainerSpec.trial_timeout_s", own({**COMMAND, "trial_timeout_s": 0}),
        rf"trainer\.trial_timeout_s: {POSITIVE_S}0$"),
    Bad("TrainerSpec.trial_timeout_s", own({**COMMAND, "trial_timeout_s": "1h"}),
        r"trainer\.trial_timeout_s: expected a number, got '1h'$"),
    Bad("TrainerSpec.trial_timeout_s", own({**COMMAND, "trial_timeout_s": math.inf}),
        r"trainer\.trial_timeout_s: expected a finite number, got inf$"),
    Bad("TrainerSpec.kill_grace_s", own({**COMMAND, "kill_grace_s": 0}),
        rf"trainer\.kill_grace_s: {POSITIVE_S}0$"),
    Bad("TrainerSpec.kill_grace_s", own({**COMMAND, "kill_grace_s": -1}),
        rf"trainer\.kill_grace_s: {POSITIVE_S}-1$"),
    Bad("TrainerSpec.kill_grace_s", own({**COMMAND, "kill_grace_s": None}),
        r"trainer\.kill_grace_s: expected a number, got null$"),
    Bad("TrainerSpec.kill_grace_s", own({**COMMAND, "kill_grace_s": "10s"}),
        r"trainer\.kill_grace_s: expected a number, got '10s'$"),
    Bad("TrainerSpec.kill_grace_s", own({"function": "pkg.train:fit", "kill_grace_s": 30}),
        rf"trainer\.kill_grace_s: {FUNCTION_ONLY}"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": ["OMP_NUM_THREADS=2"]}),
        r"trainer\.env: expected a mapping, got \['OMP_NUM_THREADS=2'\]$"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": {"OMP_NUM_THREADS": 2}}),
        r"trainer\.env\.OMP_NUM_THREADS: expected a string, got 2$"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": {"DEBUG": None}}),
        r"trainer\.env\.DEBUG: expected a string, got null$"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": {1: "a"}}),
        r"trainer\.env: expected string keys, got 1$"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": {"A=B": "1"}}), rf"{ENV_NAME}'A=B'$"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": {"": "1"}}), rf"{ENV_NAME}''$"),
    Bad("TrainerSpec.env", own({**COMMAND, "env": {"A": "a\0b"}}),
        r"trainer\.env\.A: expected a value without NUL characters, got 'a\\x00b'$"),
    Bad("TrainerSpec.env", own({"function": "pkg.train:fit", "env": {"A": "1"}}),
        rf"trainer\.env: {FUNCTION_ONLY}"),
    Bad("TrainerSpec.<unknown>", own({**COMMAND, "timeout": 60}),
        r"trainer\.timeout: unknown key, did you mean 'trial_timeout_s'\? \(expected one of: "
        r"function, command, trial_timeout_s, kill_grace_s, env\)$"),
]

# `Model.key` → why no value of it is bad. Empty: every key has a bad value in BAD.
EVERY_VALUE_IS_VALID: dict[str, str] = {}


def _study(changes: dict[str, Any]) -> dict[str, Any]:
    data = {**MINIMAL, **changes}
    return {key: value for key, value in data.items() if value is not DROP}


def _ids() -> list[str]:
    seen: Counter[str] = Counter()
    ids = []
    for case in BAD:
        seen[case.covers] += 1
        ids.append(f"{case.covers}-{seen[case.covers]}")
    return ids


@pytest.mark.parametrize("case", BAD, ids=_ids())
def test_a_bad_value_is_one_line_naming_its_key(case: Bad) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_study(case.changes))
    message = str(caught.value)
    assert "\n" not in message and "pydantic" not in message.lower(), message
    assert re.match(rf"<spec>: (?:{case.message})", message), message
    assert caught.value.path is not None, message
    assert message.startswith(f"<spec>: {caught.value.path}: "), message


def test_the_minimal_study_and_the_trainer_bases_are_valid() -> None:
    # Each case changes one thing: what it changes from must be valid.
    parse_spec(MINIMAL)
    parse_spec(_study(own(COMMAND)))
    parse_spec(_study(when({"optimizer": "sgd"})))
    # A stored function study carries kill_grace_s's default, which the function form refuses
    # to change: it must load again.
    spec = parse_spec(_study(own("pkg.train:fit")))
    assert spec_from_json(spec_to_json(spec)) == spec


def _models(annotation: Any, found: list[type[SpecModel]]) -> list[type[SpecModel]]:
    """Every SpecModel reachable from `annotation`: through fields, unions, lists, Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, SpecModel):
        if annotation not in found:
            found.append(annotation)
            for field in annotation.model_fields.values():
                _models(field.annotation, found)
    else:
        for arg in typing.get_args(annotation):
            _models(arg, found)
    return found


def _owner(model: type[SpecModel], name: str) -> type[SpecModel]:
    """The class that declares the field (`Entry.when` for every form of space entry)."""
    return next(klass for klass in reversed(model.__mro__)
                if isinstance(klass, type) and issubclass(klass, SpecModel)
                and name in klass.model_fields)


def _schema_keys() -> set[str]:
    keys = set()
    for model in _models(StudySpec, []):
        keys.add(f"{model.__name__}.{UNKNOWN}")
        for name, field in model.model_fields.items():
            keys.add(f"{_owner(model, name).__name__}.{field.alias or name}")
    return keys


def test_the_walk_finds_every_section_and_entry_form() -> None:
    names = {model.__name__ for model in _models(StudySpec, [])}
    assert names >= {"StudySpec", "ObjectiveSpec", "Budget", "SamplerSpec", "PrunerSpec",
                     "RunSpec", "TrainerSpec", "RangeEntry", "ChoicesEntry", "GridEntry",
                     "Pow2Entry", "AutoEntry"}
    assert {"Entry.when", "RangeEntry.int", "GridEntry.grid", "StudySpec.space"} <= _schema_keys()


def test_every_key_has_a_bad_value() -> None:
    keys = _schema_keys()
    covered = {case.covers for case in BAD}
    allowed = set(EVERY_VALUE_IS_VALID)
    assert sorted(keys - covered - allowed) == [], "keys without a bad-value case in BAD"
    assert sorted(covered - keys) == [], "cases naming no key of the schema"
    assert sorted(allowed - keys) == [], "allow-listed keys the schema lacks"
    assert sorted(covered & allowed) == [], "allow-listed keys that have a case: unlist them"


@pytest.mark.parametrize(("changes", "line"), [
    ({"budget": {"trials": 0}}, "budget.trials: expected at least 1, got 0"),
    ({"space": {"lr": {"low": -4, "high": -1, "log": True}}},
     "space.lr.low: expected a positive number for a log range, got -4 (bounds are values, "
     "not exponents: did you mean 1.0e-4?)"),
    (own({"command": ["python", "train.py", "--verbose", True]}),
     "trainer.command[3]: expected a string or a number (quote true, false and null), got true"),
], ids=["budget", "space-entry", "trainer-command"])
def test_validate_exits_2_with_one_line(tmp_path: Path, changes: dict[str, Any],
                                        line: str) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(_study(changes), sort_keys=False))
    hpsearch = Path(sys.executable).with_name("hpsearch")
    done = subprocess.run([str(hpsearch), "validate", str(study)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {study}: {line}"]
