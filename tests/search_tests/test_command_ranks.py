"""A command trainer for trials of several processes: ``resources: {processes: N}`` with
``command: [torchrun, --nproc-per-node, "{nproc}", --master-port, "{master_port}", ...]``.

The placeholders and the environment, the rank in a report line (rank 0's reports are the
trial's), a port clash started again on another port; then real torchrun runs on gloo: a study
through `hpsearch run --workers 2`, and no process left behind once a trial is pruned, times
out, or loses its worker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import Pruned, Trial
from search.spec import parse_spec
from search.trial import _api, _command
from search.trial._command import TrialFailed, command_argv, command_env, run_command

BIN = Path(sys.executable).parent
HPSEARCH = str(BIN / "hpsearch")
# `torchrun` as a user's study names it: found on PATH, the environment's own.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
TORCHRUN = ["torchrun", "--nproc-per-node", "{nproc}", "--master-port", "{master_port}"]

DDP = '''
import os, signal, sys, time
import torch
import torch.distributed as dist
import search

lr, epochs, mode = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
name = f"{os.environ['HPSEARCH_TRIAL_NUMBER']}-{rank}"
with open(os.path.join(os.environ["PIDS"], name), "w") as f:
    f.write(f"{os.getpid()} {os.getppid()}")  # the rank and its torchrun
total = torch.ones(1)
dist.all_reduce(total)  # every rank has written its pid before any reports
assert total.item() == world == int(os.environ["HPSEARCH_NPROC"]), (total, world)
if mode == "stubborn" and rank == 1:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # needs the SIGKILL
for epoch in range(1, epochs + 1):
    search.report(epoch, score=(lr - 0.01) ** 2 + 1.0 / epoch + 10 * rank, seen_rank=rank,
                  world=world)
    if mode == "stubborn":
        time.sleep(600)
dist.destroy_process_group()
'''


def ranks_spec(command: list, *, width: int = 2, **trainer) -> object:
    return parse_spec({"name": "ranks", "objective": {"metric": "score"},
                       "resources": {"processes": width},
                       "trainer": {"command": command, **trainer},
                       "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}})


# --------------------------------------------------------------------- fields and lines


def test_the_placeholders_and_the_environment_name_width_gpus_and_port(monkeypatch):
    spec = ranks_spec([*TORCHRUN, "t.py", "--gpus={gpus}", "{lr}"])
    monkeypatch.setenv("RANK", "3")  # a worker inside another process group: not the command's
    monkeypatch.setenv("MASTER_PORT", "1234")
    on_cpu = Trial(number=4, study_name="ranks", params={"lr": 0.01}, device="cpu",
                   threads=1, world_size=2)
    assert command_argv(spec, on_cpu, master_port=29555) == [
        "torchrun", "--nproc-per-node", "2", "--master-port", "29555", "t.py", "--gpus=",
        "0.01"]
    env = command_env(spec, on_cpu, master_port=29555)
    assert (env["HPSEARCH_NPROC"], env["HPSEARCH_GPUS"], env["HPSEARCH_MASTER_PORT"]) == \
        ("2", "", "29555")
    assert "RANK" not in env and "MASTER_PORT" not in env and env["CUDA_VISIBLE_DEVICES"] == ""

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # a worker pinned to its trial's GPUs
    on_gpus = Trial(number=5, study_name="ranks", params={"lr": 0.01}, device="cuda:0")
    wide = parse_spec({**spec.model_dump(mode="json", exclude_defaults=True),
                       "resources": {"gpus": 2}})
    assert command_argv(wide, on_gpus, master_port=1)[6] == "--gpus=2,3"
    env = command_env(wide, on_gpus, master_port=1)
    assert env["HPSEARCH_GPUS"] == env["CUDA_VISIBLE_DEVICES"] == "2,3"
    # Without a port given, each call picks a free one.
    assert int(command_argv(spec, on_cpu)[4]) > 0


def test_a_report_line_says_its_rank_and_only_rank_0s_are_the_trials(monkeypatch, capsys):
    _api.report(1, loss=0.5)
    monkeypatch.setenv("RANK", "1")
    _api.report(2, loss=0.25)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['@hpsearch {"epoch": 1, "loss": 0.5}',
                     '@hpsearch {"epoch": 2, "rank": 1, "loss": 0.25}']
    assert _api.parse_line(lines[0]) == (1, {"loss": 0.5})
    assert _api.parse_line(lines[1]) is None  # another rank's
    assert _api.parse_line('@hpsearch {"epoch": 2, "rank": 0, "loss": 0.2}') == (2, {"loss": 0.2})
    # merged output: torchrun's tee header, another rank's unfinished line before it
    assert _api.parse_line('[default0]:@hpsearch {"epoch": 3, "loss": 0.1}') == (3, {"loss": 0.1})
    assert _api.parse_line('step 7 of 9@hpsearch {"epoch": 4, "rank": 0, "loss": 0.1}') == \
        (4, {"loss": 0.1})
    assert _api.parse_line("[default1]:training epoch 3") is None
    for bad in ('"1"', "-1", "true", "1.0"):
        with pytest.raises(ValueError, match="rank"):
            _api.parse_line(f'@hpsearch {{"epoch": 1, "rank": {bad}, "loss": 0.1}}')
    with pytest.raises(ValueError, match="not JSON"):  # whoever's it is
        _api.parse_line('[default1]:@hpsearch {"epoch": 1, "rank": 1, ')
    with pytest.raises(ValueError, match="'rank' is the line's rank"):
        _api.report(3, rank=1.0)


def python_command(folder: Path, code: str) -> list[str]:
    (folder / "claims.py").write_text(code)
    return ["python", str(folder / "claims.py"), "{master_port}"]


CLAIMS_PORT = '''
import socket, sys
import search
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    sys.exit(f"[Errno {e.errno}] {e.strerror}")
search.report(1, score=0.5)
'''


class Ports:
    """`free_port` that hands out a port held open here first, then free ones."""

    def __init__(self, clashes: int) -> None:
        self.held = socket.socket()
        self.held.bind(("127.0.0.1", 0))
        self.held.listen()
        self.clashes = clashes
        self.given: list[int] = []
        self.free_port = _command.free_port

    def __call__(self) -> int:
        taken = len(self.given) < self.clashes
        port = self.held.getsockname()[1] if taken else self.free_port()
        self.given.append(port)
        return port


def test_a_port_clash_before_the_first_report_starts_the_command_again(tmp_path, monkeypatch,
                                                                       caplog):
    def said() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == "hpsearch.trial"]
        caplog.clear()
        return lines

    caplog.set_level(logging.INFO, logger="hpsearch")
    ports = Ports(clashes=1)
    monkeypatch.setattr(_command, "free_port", ports)
    spec = ranks_spec(python_command(tmp_path, CLAIMS_PORT))
    trial = Trial(number=0, study_name="ranks", params={"lr": 0.01})
    run_command(spec, trial, {})
    assert trial.history == [{"epoch": 1, "score": 0.5}] and len(set(ports.given)) == 2
    assert said() == [f"trial #0: port {ports.given[0]} was in use as its command started; "
                      "starting it again on another port"]

    monkeypatch.setattr(_command, "free_port", Ports(clashes=_command.PORT_TRIES))
    with pytest.raises(TrialFailed, match=r"exit code 1\): \[Errno 98\] Address already in use"):
        run_command(spec, Trial(number=1, study_name="ranks", params={"lr": 0.01}), {})
    assert len(said()) == _command.PORT_TRIES - 1
    # After a report, the same words are the trial's failure, not a clash.
    monkeypatch.setattr(_command, "free_port", Ports(clashes=1))
    late = "import search, sys; search.report(1, score=1.0); sys.exit('address already in use')"
    with pytest.raises(TrialFailed, match="exit code 1"):
        run_command(ranks_spec(python_command(tmp_path, late)),
                    Trial(number=2, study_name="ranks", params={"lr": 0.01}), {})
    assert not said()


LEAVES_ONE = '''
import subprocess, sys, time
import search
# A process of its own session, as torchrun starts each rank: out of its group's reach.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                 start_new_session=True)
search.report(1, score=1.0)
if sys.argv[2] == "waits":
    time.sleep(600)
'''


@pytest.mark.parametrize("mode", ["exits", "waits"])
def test_every_process_a_wide_command_started_ends_with_it(tmp_path, monkeypatch, mode):
    """The supervisor's sweep, without torchrun: a detached process left behind is ended when
    the command exits, and when its trial is pruned."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("MARK", mark)
    spec = ranks_spec(python_command(tmp_path, LEAVES_ONE) + [mode], kill_grace_s=1)
    trial = Trial(number=0, study_name="ranks", params={"lr": 0.01},
                  on_report=lambda epoch, values: "pruned" if mode == "waits" else None)
    if mode == "waits":
        with pytest.raises(Pruned):
            run_command(spec, trial, {})
    else:
        run_command(spec, trial, {})
    assert processes_marked(mark) == []


@pytest.mark.parametrize("code, reason", [
    ("import sys; sys.exit(3)", "command failed (exit code 3)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "command failed (killed by "
                                                                 "signal 9)"),
    # Trained, then aborted in the interpreter's teardown as torch's gloo threads can: named.
    ("import os, sys, search; search.report(1, score=1.0); "
     "print('terminate called without an active exception', file=sys.stderr, flush=True); "
     "os.abort()", "command failed (killed by signal 6): a rank aborted as Python exited "
                   "(torch's gloo threads, pytorch#190489): end the script with os._exit(0) "
                   "after destroy_process_group(); see docs/own-training.md"),
])
def test_a_wide_commands_end_is_its_own_under_the_supervisor(tmp_path, code, reason):
    spec = ranks_spec(python_command(tmp_path, code))
    with pytest.raises(TrialFailed) as failed:
        run_command(spec, Trial(number=0, study_name="ranks", params={"lr": 0.01}), {})
    assert str(failed.value) == reason
    with pytest.raises(TrialFailed, match="cannot start no-such-program: no such program"):
        run_command(ranks_spec(["no-such-program"]),
                    Trial(number=1, study_name="ranks", params={"lr": 0.01}), {})


# ---------------------------------------------------------------- real torchrun, on gloo


def processes_marked(mark: str) -> list[int]:
    """The living processes whose environment holds MARK=`mark`: every one a command started."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if f"MARK={mark}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def torchrun_study(folder: Path, mode: str, **changes) -> str:
    """A study of `processes: 2` trials running DDP under torchrun; its processes' mark."""
    (folder / "ddp.py").write_text(DDP)
    (folder / "pids").mkdir()
    mark = uuid.uuid4().hex
    study = {"name": "ranks", "objective": {"metric": "score"},
             "budget": {"trials": 3, "epochs": 2}, "sampler": {"type": "random", "seed": 0},
             "pruner": {"type": "none"}, "resources": {"processes": 2},
             "trainer": {"command": [*TORCHRUN, "ddp.py", "{lr}", "{epochs}", mode],
                         "kill_grace_s": 1,
                         "env": {"PIDS": str(folder / "pids"), "MARK": mark}},
             "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}, **changes}
    (folder / "ranks.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return mark


def rank_pids(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: tuple(map(int, p.read_text().split()))
            for p in (folder / "pids").iterdir() if p.read_text()}


@pytest.mark.serial
def test_a_torchrun_study_runs_its_budget_through_hpsearch_run_with_two_workers(tmp_path):
    mark = torchrun_study(tmp_path, "ok")
    run = subprocess.run([HPSEARCH, "run", "ranks.yaml", "--workers", "2", "--gpus", "none"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    study = optuna.load_study(study_name="ranks", storage=f"sqlite:///{tmp_path}/hpsearch.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3  # the budget, exactly
    for t in study.trials:  # rank 0's reports, not rank 1's
        assert [(r["epoch"], r["seen_rank"], r["world"]) for r in t.user_attrs["history"]] == \
            [(1, 0, 2), (2, 0, 2)]
        assert t.value == pytest.approx((t.params["lr"] - 0.01) ** 2 + 0.5)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers ran trials
    assert sorted(rank_pids(tmp_path)) == [f"{n}-{r}" for n in range(3) for r in (0, 1)]
    assert processes_marked(mark) == []


@pytest.mark.serial
@pytest.mark.parametrize("ending", ["pruned", "timed out"])
def test_a_pruned_or_timed_out_torchrun_trial_leaves_no_process(tmp_path, monkeypatch, ending):
    """Rank 1 ignores SIGTERM: the SIGKILL after kill_grace_s ends it, torchrun's own wait for
    its ranks notwithstanding."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", ENV["PATH"])
    mark = torchrun_study(tmp_path, "stubborn")
    study = yaml.safe_load((tmp_path / "ranks.yaml").read_text())
    if ending == "timed out":
        study["trainer"]["trial_timeout_s"] = 8  # past torchrun's start, twice over
    spec = parse_spec(study)
    trial = Trial(number=0, study_name="ranks", params={"lr": 0.01}, epochs=2,
                  on_report=lambda epoch, values: "pruned" if ending == "pruned" else None)
    started = time.monotonic()
    with pytest.raises(Pruned if ending == "pruned" else TrialFailed, match=ending):
        run_command(spec, trial, {})
    assert time.monotonic() - started < 60
    assert sorted(rank_pids(tmp_path)) == ["0-0", "0-1"]  # both ranks had started
    assert processes_marked(mark) == []


@pytest.mark.serial
def test_a_killed_worker_takes_torchrun_and_every_rank_along(tmp_path):
    mark = torchrun_study(tmp_path, "stubborn", budget={"trials": 1, "epochs": 2})
    worker = subprocess.Popen([HPSEARCH, "run", "ranks.yaml"], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: len(rank_pids(tmp_path)) == 2, 60), "the ranks never started"
        assert len(processes_marked(mark)) >= 4  # supervisor, torchrun, 2 ranks
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        assert wait_until(lambda: not processes_marked(mark), 15), processes_marked(mark)
    finally:
        if worker.poll() is None:
            worker.kill()
        for pid in processes_marked(mark):
            os.kill(pid, signal.SIGKILL)


def test_the_rank_lines_of_a_trial_are_read_by_its_command_trainer(tmp_path):
    """Without torchrun: a command whose two processes print into one pipe, rank 1 first."""
    code = ("import os, subprocess, sys, search\n"
            "if len(sys.argv) > 2:\n"
            "    os.environ['RANK'] = sys.argv[2]\n"
            "    search.report(1, score=float(sys.argv[2]))\n"
            "else:\n"
            "    for rank in ('1', '0'):\n"
            "        subprocess.run([sys.executable, __file__, sys.argv[1], rank], check=True)\n")
    (tmp_path / "two.py").write_text(code)
    spec = ranks_spec(["python", str(tmp_path / "two.py"), "{master_port}"])
    trial = Trial(number=0, study_name="ranks", params={"lr": 0.01})
    output: dict[str, str] = {}
    run_command(spec, trial, output)
    assert trial.history == [{"epoch": 1, "score": 0.0}]
    assert json.loads(output["stdout"].splitlines()[0].split(" ", 1)[1])["rank"] == 1
