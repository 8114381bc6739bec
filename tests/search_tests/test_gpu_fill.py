"""`--trials-per-gpu auto`: the policy on injected readings, nvidia-smi's output parsed, and the
supervisor on a simulated device (faked GPUs whose workers train on the CPU): it adds a worker
while memory fits, and an out-of-memory on the shared GPU queues the trial again and lowers it.
CUDA itself is exercised in tests/test_gpu.py where a GPU is present.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from search.run import load
from search.storage import count_trials, open_storage
from search.trial._gpu import GpuReading, NvidiaSmi, SimulatedGpus, shared_gpu_oom
from search.workers._gpu_fill import MAX_PER_GPU, GpuFill
from tests.search_tests.studies import study_data

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
GB = 1 << 30


def reading(used: float, total: float = 1000, util: float | None = 10) -> GpuReading:
    return GpuReading(used, total, util)


def test_a_gpu_gets_workers_while_one_more_fits_under_the_margin():
    fill = GpuFill(["0"], settle_s=10)
    fill.started("0", now=0)
    assert fill.grow({"0": reading(300)}, now=5) == []  # still settling
    assert fill.grow({"0": reading(300)}, now=11) == ["0"]  # 300 + 300 <= 850
    fill.started("0", now=11)
    assert fill.grow({"0": reading(600)}, now=30) == []  # 600 + 300 > 850: full
    assert fill.workers() == {"0": 2}


def test_the_largest_worker_seen_decides_and_a_busy_gpu_gets_none():
    fill = GpuFill(["0", "1"], settle_s=0)
    for gpu in ("0", "1"):
        fill.started(gpu, now=0)
    fill.grow({"0": reading(500), "1": reading(100)}, now=1)  # GPU 0's worker peaked at 500
    # 400 now, but a worker was seen at 500: 400 + 500 > 850
    assert fill.grow({"0": reading(400), "1": reading(100, util=95)}, now=2) == []
    assert fill.grow({"0": reading(400), "1": reading(100, util=None)}, now=3) == ["1"]


def test_an_out_of_memory_holds_the_gpu_one_worker_lower():
    fill = GpuFill(["0"], settle_s=0)
    for _ in range(3):
        fill.started("0", now=0)
    fill.left("0", now=1, out_of_memory=True)
    assert fill.state["0"].cap == 2 and fill.workers() == {"0": 2}
    assert fill.grow({"0": reading(100)}, now=5) == []  # room, but held at 2
    fill.left("0", now=6, out_of_memory=False)  # a worker that met the budget: no lowering
    assert fill.state["0"].cap == 2
    assert fill.grow({"0": reading(50)}, now=7) == ["0"]
    assert "held at 2 after an out-of-memory" in fill.describe()


def test_growth_stops_at_the_ceiling():
    fill = GpuFill(["0"], settle_s=0)
    for _ in range(MAX_PER_GPU):
        fill.started("0", now=0)
    assert fill.grow({"0": reading(1)}, now=1) == []


@pytest.mark.parametrize(("free", "own", "shared"), [
    (0, 70 * GB, False),  # the trial itself filled the GPU: its own failure
    (0, 10 * GB, True),  # others hold 70 GB: the sharing did it
    (1 * GB, 79 * GB, False),
    (0, 79.5 * GB, False),  # a CUDA context's worth is not "others"
])
def test_an_out_of_memory_is_the_sharing_only_when_others_hold_more(free, own, shared):
    assert shared_gpu_oom(int(free), 80 * GB, int(own)) is shared


def test_nvidia_smi_readings_by_index_or_uuid(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n"
                   "echo '0, GPU-aaa, 1200, 81559, 35'\n"
                   "echo '1, GPU-bbb, 500, 81559, [N/A]'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    got = NvidiaSmi(str(smi)).read({"0": 1, "GPU-bbb": 2})
    assert got == {"0": GpuReading(1200, 81559, 35), "GPU-bbb": GpuReading(500, 81559, None)}
    assert NvidiaSmi(str(tmp_path / "missing")).read({"0": 1}) == {}


def test_a_bad_simulated_device_is_named():
    from search._errors import SpecError

    with pytest.raises(SpecError, match="HPSEARCH_FAKE_GPU_MEMORY"):
        SimulatedGpus.from_env({"HPSEARCH_FAKE_GPU_MEMORY": '{"total": 1}'})


# ---- the supervisor on a simulated GPU ----

OOM_MODEL = '''
import math
import os
from pathlib import Path

import torch
from torch import nn


class Net(nn.Module):
    """An MLP whose first forward in a second worker process runs out of memory, once."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))
        self.checked = False

    def forward(self, x):
        if not self.checked:
            self.checked = True
            first = Path(os.environ["OOM_DIR"]) / "first.pid"
            if not first.exists():
                first.write_text(str(os.getpid()))
            elif first.read_text() != str(os.getpid()):
                try:
                    (Path(os.environ["OOM_DIR"]) / "oom-once").unlink()
                except FileNotFoundError:
                    pass
                else:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                      "2.00 GiB (simulated)")
        return self.body(x)
'''


def _run_on_simulated_gpu(tmp_path: Path, name: str, monkeypatch, *, oom: bool):
    (tmp_path / "oomnet.py").write_text(OOM_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))  # the stored spec names it: loading imports it
    if oom:
        (tmp_path / "oom-once").write_text("")
    # Trials long enough (10 epochs of 8,000) that worker #1, started a second or two after
    # #0 and importing torch meanwhile, still finds trials left to take.
    data = study_data(name, trials=10, epochs=10, size=8000, checkpoints=tmp_path / "ckpt",
                      model={"type": "oomnet:Net"})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path / 's.db'}"
    env = {**os.environ, "HPSEARCH_FAKE_GPU_COUNT": "1", "OOM_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           # 300 MB a worker on a 1000 MB GPU: two fit under the 85% margin, three do not.
           "HPSEARCH_FAKE_GPU_MEMORY": json.dumps({"total_mb": 1000, "per_worker_mb": 300,
                                                   "util_per_worker": 20, "settle_s": 1})}
    try:  # 20 s alone; a CI run with four test files at once on two cores once took 240+
        result = subprocess.run([HPSEARCH, "run", str(path), "--storage", url], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired as e:  # what it had printed: where it stood
        said = [x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                for x in (e.stdout, e.stderr)]
        pytest.fail(f"hpsearch run still running after {e.timeout} s:\n" + "\n".join(said))
    study, _ = load(name, open_storage(url))
    return result, study


def test_auto_adds_a_worker_to_the_gpu_while_it_fits(tmp_path, study_name, monkeypatch):
    result, study = _run_on_simulated_gpu(tmp_path, study_name, monkeypatch, oom=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "started 1 worker processes (#0 cuda GPU 0" in out
    assert "GPU 0: 300/1000 MB used, 20% busy: started worker #1 there (2 on it now)" in out, out
    assert "worker #2" not in out  # a third would pass the margin
    assert count_trials(study).finished == 10
    assert len({t.user_attrs["pid"] for t in study.get_trials()}) == 2, out


def test_an_out_of_memory_on_the_shared_gpu_requeues_the_trial_and_lowers_the_gpu(
        tmp_path, study_name, monkeypatch):
    result, study = _run_on_simulated_gpu(tmp_path, study_name, monkeypatch, oom=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert not (tmp_path / "oom-once").exists(), out  # the second worker did run out of memory
    # The second process to reach a forward runs out: worker #1 as a rule, but #0 where its
    # imports took longer than #1's start (a loaded machine).
    assert re.search(r"worker #[01] ran out of memory on GPU 0, shared with others", out), out
    assert "GPU 0 keeps at most 1 worker(s) from now" in out, out
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["ended"] == "interrupted", [
        (t.number, t.state.name, t.user_attrs.get("ended")) for t in trials]
    assert "out of memory" in failed[0].user_attrs["oom_shared"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") is not None
             or t.user_attrs.get("retried_from") == failed[0].number]
    assert retry and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == failed[0].params  # queued again unchanged
    assert count_trials(study).finished == 10  # nothing failed the study
