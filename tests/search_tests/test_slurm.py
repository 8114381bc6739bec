"""`hpsearch slurm`: the batch script, the refusals, and real array tasks through submitit.

Slurm itself cannot run here. The script is submitit's own, checked line by line; the tasks
run through submitit's LocalExecutor, the same pickled `ArrayTask` a Slurm node unpickles,
each starting a real `hpsearch worker` against PostgreSQL. Preemption is the signal Slurm
sends (USR2, to every process of the task), and submitit requeues the task as on a cluster.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search._errors import SpecError
from search.cli import build_parser, main
from search.run import create_or_load
from search.spec import Resources, parse_spec
from search.storage import count_trials, open_storage, request_stop, stop_requested
from search.workers import SlurmArray
from search.workers._slurm import _share
from tests.search_tests.studies import LR, study_data

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
SECRET = "hunter2"  # PostgreSQL here trusts local connections: any password is accepted


def with_password(url: str) -> str:
    head, tail = url.split("://", 1)
    user, rest = tail.split("@", 1)
    return f"{head}://{user.split(':')[0]}:{SECRET}@{rest}"


def hpsearch(*args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def worker_line(out: str) -> list[str]:
    """The worker command a dry run shows, split as a shell would."""
    lines = [line for line in out.splitlines() if line.startswith("# hpsearch worker ")]
    assert len(lines) == 1, out
    return shlex.split(lines[0][2:])


def create(url: str, data: dict):
    spec = parse_spec(data)
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    return create_or_load(spec, storage)


# ---- the batch script ----

def test_dry_run_prints_the_batch_script_and_a_worker_command_hpsearch_parses(
        tmp_path, study_name, postgres_url):
    url = with_password(postgres_url)
    create(url, study_data(study_name))
    out = hpsearch("slurm", study_name, "--storage", url, "--nodes", "3",
                   "--gpus-per-node", "4", "--trials-per-gpu", "2", "--partition", "gpu",
                   "--time", "02:30:00", "--account", "ml", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("#!/bin/bash\n")
    directives = {line for line in text.splitlines() if line.startswith("#SBATCH ")}
    for expected in ("--partition=gpu", "--gpus-per-node=4", "--array=0-2%3", "--time=150",
                     "--account=ml", "--nodes=1", "--ntasks-per-node=1", "--requeue",
                     "--signal=USR2@90", f"--job-name=hpsearch-{study_name}",
                     f"--output={tmp_path}/slurm-{study_name}/%A_%a_0_log.out"):
        assert f"#SBATCH {expected}" in directives, (expected, text)
    assert "-m submitit.core._submit" in text
    assert SECRET not in text + out.stderr
    argv = worker_line(text)
    assert argv[0] == "hpsearch"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.name, args.gpus, args.trials_per_gpu) == (
        "worker", study_name, "auto", 2)
    assert args.storage == url.replace(f":{SECRET}@", ":***@")
    assert not (tmp_path / f"slurm-{study_name}").exists()  # a dry run writes nothing


def test_cpu_nodes_get_cpu_workers_and_one_job(capsys, study_name, postgres_url):
    create(postgres_url, study_data(study_name))
    code = main(["slurm", study_name, "--storage", postgres_url, "--gpus-per-node", "0",
                 "--workers", "3", "--time", "1-00:00:01", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --cpus-per-task=3" in out
    assert "#SBATCH --time=1441" in out  # minutes, rounded up as Slurm does
    assert "--gpus-per-node" not in out and "--array" not in out  # one node: a plain job
    args = build_parser().parse_args(worker_line(out)[1:])
    assert (args.gpus, args.workers) == ("none", 3)


def test_a_dry_run_of_a_study_not_in_the_storage_is_refused(capsys, study_name, postgres_url):
    """The script depends on the stored spec (the trials' width): it is read for a dry run too."""
    code = main(["slurm", study_name, "--storage", postgres_url, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"no study named {study_name!r}" in err


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--storage", "sqlite:///studies.db"], "cannot share the SQLite file"),
    (["--time", "90"], "--time: expected HH:MM:SS"),
    (["--time", "01:75:00"], "--time: expected HH:MM:SS"),
    (["--time", "00:00:00"], "--time: expected a positive"),
    (["--gpus-per-node", "-1"], "--gpus-per-node: expected 0"),
    (["--workers", "2"], "--workers: with GPUs"),
])
def test_bad_input_is_refused_in_one_line(argv, fragment, capsys):
    storage = [] if "--storage" in argv else ["--storage", "postgresql://u:pw@h/db"]
    code = main(["slurm", "s", *storage, *argv, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and fragment in err, err
    assert ":pw@" not in err
    if "sqlite" in err:
        assert "postgresql" in err and "storage-proxy" in err  # the fix, not only the reason


def test_without_submitit_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what `import submitit` then raises
    code = main(["slurm", "s", "--storage", "postgresql://u@h/db", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'hpsearch[slurm]'" in err


def test_without_sbatch_it_says_so_in_one_line(tmp_path):
    bin_dir = Path(sys.executable).parent
    assert not (bin_dir / "sbatch").exists()
    out = hpsearch("slurm", "s", "--storage", "postgresql://u:pw@127.0.0.1:1/db",
                   env={**os.environ, "PATH": str(bin_dir)}, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "sbatch" in out.stderr and "--dry-run" in out.stderr
    assert "pw@" not in out.stderr and not out.stdout


def test_submit_hands_sbatch_the_dry_run_script(tmp_path, study_name, postgres_url, capsys,
                                                monkeypatch):
    """The submit path up to sbatch: Slurm's two commands stand in as scripts that record what
    they get (no cluster here); submitit's SlurmExecutor does the rest for real."""
    url = with_password(postgres_url)
    study = create(url, study_data(study_name))
    request_stop(study)  # submitting resumes a stopped study, as `run` and `worker` do
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\n'
                                 'echo "Submitted batch job 4242"\n')
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    options = ["slurm", study_name, "--storage", url, "--nodes", "2", "--gpus-per-node", "2",
               "--partition", "gpu"]
    assert main([*options, "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert main(options) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + dry.out
    assert "submitted Slurm job 4242: 2 array task(s)" in out.out
    assert "squeue -j 4242" in out.out and "scancel 4242" in out.out
    assert "resuming study" in out.out and not stop_requested(study)
    script = dry.out.split("# each of the")[0]
    assert (tmp_path / "submitted.sh").read_text() == script
    folder = tmp_path / f"slurm-{study_name}"
    assert (folder / "4242_submission.sh").read_text() == script  # kept beside the logs
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # the pickles hold the password
    from submitit.core.utils import DelayedSubmission

    for task in (0, 1):
        delayed = DelayedSubmission.load(folder / f"4242_{task}_submitted.pkl")
        args = build_parser().parse_args(delayed.function.args)
        assert args.storage == url and delayed.args == (task,)


# ---- trials of several processes (resources) ----

@pytest.mark.parametrize(("options", "fragment"), [
    ({"gpus_per_node": 3}, "--gpus-per-node 3: the study's trials take 2 GPUs of one node each "
                           "(resources.gpus), and 2 does not divide 3; give a multiple of 2 "
                           "(--gpus-per-node 2, --gpus-per-node 4)"),
    ({"gpus_per_node": 0}, "--gpus-per-node 0: the study's trials take 2 GPUs"),
    ({"gpus_per_node": 4, "trials_per_gpu": 2}, "--trials-per-gpu 2: the study's trials take "
                                                "2 GPUs each"),
])
def test_a_width_the_nodes_cannot_hold_is_refused(options, fragment):
    with pytest.raises(SpecError) as refused:
        SlurmArray("s", "postgresql://u@h/db", resources=Resources(gpus=2), **options)
    assert fragment in str(refused.value)


def test_wide_trials_take_whole_gpus_and_cpu_processes_get_a_core_each():
    def array(**options) -> SlurmArray:
        return SlurmArray("s", "postgresql://u@h/db", **options)

    gpus = array(gpus_per_node=8, resources=Resources(gpus=2))
    assert gpus.sbatch_parameters()["gpus_per_node"] == 8
    assert "cpus_per_task" not in gpus.sbatch_parameters()  # Slurm's, as for one-GPU trials
    assert _share(gpus) == "8 GPU(s) as 4 trial slot(s) of 2 GPUs"
    cpus = array(gpus_per_node=0, workers=3, resources=Resources(processes=4))
    assert cpus.sbatch_parameters()["cpus_per_task"] == 12  # 3 trials at once of 4 processes
    assert _share(cpus) == "3 CPU worker(s) of 4 processes a trial"
    assert array(gpus_per_node=2, resources=Resources(processes=4)).sbatch_parameters()[
        "cpus_per_task"] == 8  # a worker per GPU, its trials 4 CPU processes
    assert array(gpus_per_node=0, cpus_per_task=5,
                 resources=Resources(processes=4)).sbatch_parameters()["cpus_per_task"] == 5
    with pytest.raises(SpecError, match=r"--cpus-per-task 2: .* 4 processes each"):
        array(gpus_per_node=0, cpus_per_task=2, resources=Resources(processes=4))
    assert _share(array(gpus_per_node=2)) == "2 GPU(s) x trials by memory (auto)"


def test_the_stored_width_is_checked_before_anything_is_printed(capsys, study_name,
                                                               postgres_url, tmp_path):
    create(postgres_url, study_data(study_name, resources={"gpus": 2}))
    base = ["slurm", study_name, "--storage", postgres_url, "--folder", str(tmp_path / "f"),
            "--dry-run"]
    assert main([*base, "--gpus-per-node", "3"]) == 2
    out = capsys.readouterr()
    assert not out.out and out.err.count("\n") == 1
    assert "--gpus-per-node 3: the study's trials take 2 GPUs of one node each" in out.err
    assert main([*base, "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=4" in out
    args = build_parser().parse_args(worker_line(out)[1:])
    assert (args.gpus, args.trials_per_gpu) == ("auto", "auto")  # the worker plans 2 slots
    assert not (tmp_path / "f").exists()

    cpu = f"{study_name}-cpu"
    create(postgres_url, study_data(cpu, resources={"processes": 2}))
    assert main(["slurm", cpu, "--storage", postgres_url, "--gpus-per-node", "0",
                 "--workers", "3", "--dry-run"]) == 0
    assert "#SBATCH --cpus-per-task=6" in capsys.readouterr().out


# ---- real array tasks (submitit's local executor, PostgreSQL) ----

def _local_jobs(array: SlurmArray) -> list:
    from submitit.local.local import LocalExecutor

    executor = LocalExecutor(folder=array.folder)
    executor.update_parameters(timeout_min=30)
    return array.submit(executor=executor)


def _wait(jobs: list, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    try:
        while not all(job.done() for job in jobs):
            assert time.monotonic() < deadline, "array tasks still running:\n" + _logs(jobs)
            time.sleep(0.5)
        return [job.result() for job in jobs]
    finally:
        for job in jobs:
            if not job.done():
                job.cancel()


def _logs(jobs: list) -> str:
    return "\n".join(f"{job.stdout()}\n{job.stderr()}" for job in jobs)


def _running(study, min_epochs: int):
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if len(t.intermediate_values) >= min_epochs and t.user_attrs.get("pid"):
            return t
    return None


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local tasks start here, as Slurm's in the submit dir
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", "off")
    return tmp_path


def test_a_task_that_starts_after_hpsearch_stop_ends_at_once(tmp_path, study_name,
                                                           postgres_url):
    """A pending or requeued task must not resume a stopped study (`worker` would)."""
    study = create(postgres_url, study_data(study_name))
    request_stop(study)
    task = SlurmArray(study_name, postgres_url, gpus_per_node=0).worker_args()
    out = subprocess.run([sys.executable, "-m", "search.cli", *task], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is stopped" in out.stdout
    assert stop_requested(study) and not study.get_trials()


def test_two_array_tasks_meet_the_budget_exactly(in_tmp, study_name, postgres_url):
    trials = 6
    study = create(postgres_url, study_data(
        study_name, trials=trials, epochs=2, size=8000, hidden=64, heartbeat=True,
        checkpoints=in_tmp / "ckpt", space={**LR, "batch_size": {"pow2": [32, 64]}}))
    array = SlurmArray(study_name, postgres_url, nodes=2, gpus_per_node=0, workers=1,
                       folder=in_tmp / "slurm")
    jobs = _local_jobs(array)
    assert _wait(jobs, timeout=150) == [0, 0], _logs(jobs)
    trials_run = study.get_trials()
    assert count_trials(study).finished == trials
    assert all(t.state == TrialState.COMPLETE for t in trials_run), _logs(jobs)
    assert len({t.user_attrs["pid"] for t in trials_run}) == 2  # both tasks ran trials


def test_preempted_task_is_requeued_and_its_trial_resumes(in_tmp, study_name, postgres_url):
    study = create(postgres_url, study_data(
        study_name, trials=1, epochs=8, size=24000, hidden=256, heartbeat=True,
        checkpoints=in_tmp / "ckpt", space={**LR, "batch_size": {"pow2": [32, 64]}}))
    array = SlurmArray(study_name, postgres_url, nodes=1, gpus_per_node=0,
                       folder=in_tmp / "slurm")
    jobs = _local_jobs(array)
    try:
        victim = _poll(lambda: _running(study, 2), 90, "a trial two epochs in", jobs)
        worker = victim.user_attrs["pid"]
        task = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert b"submitit.core._submit" in Path(f"/proc/{task}/cmdline").read_bytes()
        for pid in (worker, task):  # as Slurm signals every process of the task
            os.kill(pid, signal.SIGUSR2)
    finally:
        results = _wait(jobs, timeout=150)
    assert results == [0], _logs(jobs)
    assert "Requeued job" in _logs(jobs)
    assert count_trials(study).finished == 1
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [victim.number]
    assert failed[0].user_attrs.get("ended") == "interrupted"
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retried_from") == victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert retry.user_attrs["pid"] != worker  # the requeued task's new worker
    assert retry.params == victim.params


def _poll(predicate, timeout: float, what: str, jobs: list):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{_logs(jobs)}")
