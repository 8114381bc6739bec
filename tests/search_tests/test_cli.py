"""The CLI as users run it: a real subprocess, real files, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


def hp(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys, search.cli; search.cli.build_parser().format_help(); "
            "assert 'torch' not in sys.modules and 'optuna' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    out = subprocess.run([HPSEARCH, "--help"], capture_output=True, text=True, check=True)
    for command in ("validate", "run", "worker", "status", "best"):
        assert command in out.stdout


def test_commands_that_read_a_study_never_load_torch(tmp_path):
    """status, best, report, stop and delete read a study's stored spec, checked when it was
    created: they import no torch (2 s of a 3 s `status` before). validate still checks the
    trainer's names, and refuses a bad one."""
    from search.workers import run_worker
    from tests.search_tests.studies import study_data
    from tests.search_tests.test_workers import create

    url = f"sqlite:///{tmp_path / 's.db'}"
    study, spec = create(url, study_data("reads", trials=2, epochs=1, size=128))
    run_worker(study, spec, device="cpu", artifacts=False)
    for argv in (["status"], ["status", "reads", "--json"], ["best", "reads"],
                 ["report", "reads", "--out", str(tmp_path / "r.html")], ["stop", "reads"],
                 ["delete", "reads", "--yes"]):
        code = ("import sys; from search.cli import main; rc = main(sys.argv[1:]); "
                "sys.exit(rc or 100 * ('torch' in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code, *argv, "--storage", url],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (argv, out.returncode, out.stdout + out.stderr)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(study_data("bad", space={"optimizer": {"choices": ["sgdd"]}})))
    refused = hp("validate", str(bad), cwd=tmp_path)
    assert refused.returncode == 2 and "unknown optimizer 'sgdd'" in refused.stderr, (
        refused.stderr)


def test_version_is_the_installed_distributions(tmp_path):
    from importlib.metadata import version

    out = hp("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"hpsearch {version('hpsearch')}"


def test_a_single_gpu_worker_is_pinned_before_torch_or_optuna_loads():
    """Planning the worker slots loads neither: CUDA_VISIBLE_DEVICES is set before them."""
    code = ("import os, sys; from search import workers; "
            "os.environ['HPSEARCH_FAKE_GPU_COUNT'] = '1'; "
            "slots = workers.plan('auto'); "
            "assert os.environ['CUDA_VISIBLE_DEVICES'] == '0', slots; "
            "assert 'torch' not in sys.modules and 'optuna' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_smoke_study_end_to_end(tmp_path):
    run = hp("run", str(ROOT / "studies" / "smoke.yaml"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "6/6 trials finished" in run.stdout
    assert "best trial #" in run.stdout
    assert "hpsearch best smoke --format yaml" in run.stdout  # says what to do next
    assert (tmp_path / "hpsearch.db").exists()  # the default storage, in the working directory

    status = hp("status", "smoke", "--json", cwd=tmp_path)
    data = json.loads(status.stdout)
    assert data["counts"]["finished"] == 6
    assert {"best", "running", "failures", "pruning", "counts"} <= set(data)

    best = hp("best", "smoke", "--format", "yaml", cwd=tmp_path)
    (tmp_path / "best.yaml").write_text(best.stdout)
    assert yaml.safe_load(best.stdout)["config"]["data"]["dataset"] == "synthetic"
    again = subprocess.run([sys.executable, "-m", "trainers", "best.yaml", "--epochs", "1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "completed" in again.stdout

    resumed = hp("run", str(ROOT / "studies" / "smoke.yaml"), cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming study smoke: 6/6" in resumed.stdout


def test_worker_joins_by_name_and_stops_at_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = hp("run", str(ROOT / "studies" / "smoke.yaml"), "--storage", url, "--trials", "2",
               cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # More budget for the study, then a worker that needs only the name and the URL.
    more = hp("run", str(ROOT / "studies" / "smoke.yaml"), "--storage", url, "--trials", "3",
              cwd=tmp_path)
    assert more.returncode == 0
    worker = hp("worker", "smoke", "--storage", url, cwd=tmp_path)
    assert worker.returncode == 0, worker.stderr
    assert "3/3 trials finished" in worker.stdout


def test_bad_study_file_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    spec["space"]["lr"]["low"] = -1
    bad.write_text(yaml.safe_dump(spec))
    for command in ("validate", "run"):
        result = hp(command, str(bad), cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0  # one line
        assert "space.lr.low: expected a positive number" in result.stderr
    assert not (tmp_path / "hpsearch.db").exists()


def test_unknown_study_and_missing_database_exit_2(tmp_path):
    missing = hp("status", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "no database" in missing.stderr
    assert not (tmp_path / "hpsearch.db").exists()  # reading never creates a database
    hp("run", str(ROOT / "studies" / "smoke.yaml"), "--trials", "1", cwd=tmp_path)
    unknown = hp("best", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "no study named 'nope'" in unknown.stderr


def test_passwords_never_appear(tmp_path):
    url = "postgresql+psycopg2://bob:s3cret@127.0.0.1:1/nothing"
    result = hp("status", "--storage", url, cwd=tmp_path)
    assert result.returncode == 1
    assert "s3cret" not in result.stdout + result.stderr
    assert "bob:***@" in result.stderr
    # Nor a token (a proxy refusing one: test_security.py).
    env = {**os.environ, "HPSEARCH_TOKEN": "t0ken-s3cret"}
    for args in (["storage-proxy", "--host", "0.0.0.0", "--storage", "sqlite:///x.db"],
                 ["dashboard", "--host", "0.0.0.0", "--tls-cert", "missing.pem",
                  "--tls-key", "missing.pem"]):
        said = subprocess.run([HPSEARCH, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=env)
        assert said.returncode in (1, 2) and said.stderr.startswith("error: "), said.stderr
        assert "t0ken-s3cret" not in said.stdout + said.stderr


def test_bad_arguments_exit_2(tmp_path):
    for args in (["run", "x.yaml", "--trials", "0"], ["frobnicate"],
                 ["run", "x.yaml", "--timeout", "soon"],
                 ["status", "--storage", "redis://localhost"]):
        assert hp(*args, cwd=tmp_path).returncode == 2, args


def test_validate_and_run_say_when_the_sampler_cannot_learn_from_pruned_trials(tmp_path):
    from search.spec import parse_spec, sampler_outlook
    from tests.search_tests.studies import study_data

    def outlook(sampler, pruner="hyperband"):
        return sampler_outlook(parse_spec(study_data("g", sampler=sampler, pruner=pruner)))

    gp = outlook({"type": "gp"}, {"type": "patient", "options": {"patience": 2},
                                  "wrapped": {"type": "median"}})
    assert gp == ("sampler gp learns from completed trials only: the trials pruner "
                  "patient(median) stops teach it nothing, and it keeps proposing where they were; "
                  "pair it with pruner: {type: none} (docs/study-file.md#sampler)"), gp
    assert outlook({"type": "gp"}, {"type": "none"}) is None
    cma = outlook({"type": "cmaes"}, {"type": "median"})
    assert cma.startswith("sampler cmaes passes over pruned trials unless its options say "
                          "consider_pruned_trials: true"), cma
    assert outlook({"type": "cmaes", "options": {"consider_pruned_trials": True}},
                   {"type": "median"}) is None
    for learns_from_pruned in ({"type": "tpe"}, {"type": "random"}, {"type": "qmc"}):
        assert outlook(learns_from_pruned, {"type": "hyperband"}) is None
    # Both commands print it: validate under its usual line, run under its start line.
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(study_data("g", trials=2, sampler={"type": "gp"},
                                              pruner="hyperband")))
    out = hp("validate", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == f"{path}: {outlook({'type': 'gp'})}", out.stdout
    ran = hp("run", str(path), "--storage", f"sqlite:///{tmp_path / 'g.db'}", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("starting study g:"))
    assert lines[start + 1] == outlook({"type": "gp"}), ran.stdout


def test_validate_says_how_run_pack_will_treat_the_space(tmp_path):
    from search.spec import pack_outlook, parse_spec
    from tests.search_tests.studies import study_data

    def outlook(space, **changes):
        return pack_outlook(parse_spec(study_data("p", space=space, **changes)))

    lr = {"lr": {"low": 1e-3, "high": 0.1, "log": True}}
    packs = {**lr, "optimizer": {"choices": ["sgd", "rmsprop"]}, "dropout": {"low": 0.0,
                                                                                "high": 0.5}}
    assert outlook(packs) is None  # no run.pack: nothing to say
    assert outlook(packs, run={"pack": 1}) is None  # off
    assert outlook(packs, run={"pack": 8}) == "run.pack 8: every trial of the space can be packed"
    some = outlook({**lr, "norm": {"choices": ["none", "batchnorm"]}}, run={"pack": "auto"})
    assert some.startswith("run.pack auto: about "), some
    assert some.endswith("% of the space's trials run alone (model.norm batchnorm: batch "
                         "statistics in train mode are not packed)"), some
    assert 25 <= int(some.split("about ")[1].split("%")[0]) <= 75, some
    none = outlook(lr, run={"pack": 4}, model={"type": "mlp", "hidden": [16],
                                                "norm": "batchnorm"})
    assert none.startswith("run.pack 4: no trial packs (model.norm batchnorm"), none
    # The command prints it under the usual line.
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(study_data("p", space=packs, run={"pack": "auto"})))
    out = hp("validate", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == (f"{path}: run.pack auto: every trial of the space can "
                                          "be packed"), out.stdout
    assert "new study created" not in out.stderr, out.stderr


def test_the_cli_freezes_the_collector_after_every_other_exit_handler(tmp_path):
    """A worker's exit skips the interpreter's final collections over torch's and Optuna's
    objects (seconds of a SIGTERMed worker's exit), and only after every other exit handler,
    a tracking client's included, has run."""
    script = (
        "import atexit, gc, sys\n"
        "from search.cli import main\n"
        "main(['validate', sys.argv[1]])\n"
        "atexit.register(lambda: print('handler after main: frozen', gc.get_freeze_count()))\n"
        "atexit._run_exitfuncs()\n"
        "print('after every handler: frozen', gc.get_freeze_count() > 0)\n"
    )
    study = Path(__file__).resolve().parents[2] / "studies" / "fashion_mlp.yaml"
    done = subprocess.run([sys.executable, "-c", script, str(study)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "handler after main: frozen 0" in lines
    assert lines[-1] == "after every handler: frozen True"


def test_a_finished_run_leaves_its_study_whole_in_the_database_file(tmp_path):
    """The storages close at exit, before the collector is frozen: the last connection to a
    SQLite file in WAL mode writes the journal back, so the .db file alone, copied elsewhere,
    holds every trial (frozen first, 320 KB stayed in s.db-wal and s.db held none)."""
    import shutil
    import sqlite3

    from tests.search_tests.studies import study_data

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study_data("whole", trials=3, epochs=1, size=128)))
    done = hp("run", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "s.db-wal").exists()
    alone = tmp_path / "copy" / "s.db"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "s.db", alone)
    with sqlite3.connect(alone) as db:
        states = db.execute("SELECT state FROM trials").fetchall()
    assert states == [("COMPLETE",)] * 3
