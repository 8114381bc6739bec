"""`run --ray`: workers as Ray actors on a real multi-node Ray cluster, on one machine.

One cluster serves the whole module (Ray is slow to start): a head and two worker nodes of one
CPU each, one of them with two fake GPUs (Ray assigns their ids and sets CUDA_VISIBLE_DEVICES
as for real ones). Studies run through the real command line against PostgreSQL; a node is
really removed mid-trial, its trial resumed on another node from an S3 bucket (moto's server).
The test that removes a node comes last: the cluster has one node less after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.run import load
from search.storage import count_trials, open_storage
from search.workers import RayRequest
from search.workers._ray import plan_ray_slots
from tests.search_tests.studies import study_data
from tests.search_tests.test_s3_artifacts import s3_endpoint  # noqa: F401 - a fixture

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
ray_cluster_utils = pytest.importorskip("ray.cluster_utils",
                                        reason="ray is not installed (pip install 'hpsearch[ray]')")


@pytest.fixture(scope="module")
def cluster():
    cluster = ray_cluster_utils.Cluster(
        initialize_head=True, connect=False,
        head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.gpu_node = cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.cpu_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def hp(*args: str, cwd: Path, env: dict | None = None,
       timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- planning (no cluster) ----

def test_workers_fill_free_gpu_slots_or_split_the_cores():
    gpu = RayRequest("auto", trials_per_gpu=2)
    slots = plan_ray_slots([8, 8], free_cpus=16, free_gpus=3, request=gpu)
    assert [(s.device, s.num_gpus, s.num_cpus) for s in slots] == [("cuda", 0.5, 0)] * 6
    capped = RayRequest("auto", trials_per_gpu=2, workers=4)
    assert len(plan_ray_slots([8], free_cpus=8, free_gpus=3, request=capped)) == 4
    # No GPU (or --gpus none): one worker per smallest node's cores; K workers as big as fit.
    cpu = RayRequest("auto", gpus="none")
    assert [s.num_cpus for s in plan_ray_slots([4, 8], free_cpus=12, free_gpus=2,
                                               request=cpu)] == [4, 4, 4]
    three = RayRequest("auto", workers=3)
    assert [s.num_cpus for s in plan_ray_slots([4, 8], free_cpus=12, free_gpus=0,
                                               request=three)] == [4, 4, 4]
    five = RayRequest("auto", workers=5)
    assert [s.num_cpus for s in plan_ray_slots([4, 8], free_cpus=12, free_gpus=0,
                                               request=five)] == [2] * 5
    many = RayRequest("auto", workers=50)  # a cap, not a demand: one per core at most
    assert len(plan_ray_slots([1, 1, 1], free_cpus=3, free_gpus=0, request=many)) == 3


def test_checkpoints_go_to_a_folder_or_a_bucket():
    from search._errors import SpecError
    from search.spec import parse_spec

    def location(value: str) -> str:
        data = study_data("c")
        data["run"] = {"checkpoint_dir": value}
        return parse_spec(data).run.checkpoint_dir

    assert location("s3://bucket/prefix") == "s3://bucket/prefix"
    assert location("/shared/ckpt") == "/shared/ckpt"
    for bad in ("s3://", "gs://bucket/x"):
        with pytest.raises(SpecError, match="expected a folder or s3://bucket/prefix"):
            location(bad)


# ---- bad input and unreachable clusters (no cluster) ----

def test_bad_input_is_refused_in_one_line(tmp_path, postgres_url):
    path = write(tmp_path, study_data("never-run"))
    ids = hp("run", str(path), "--ray", "--gpus", "0,1", "--storage", postgres_url, cwd=tmp_path)
    assert ids.returncode == 2 and "GPU ids mean nothing with --ray" in ids.stderr
    sqlite = hp("run", str(path), "--ray", "auto", "--storage", "sqlite:///s.db", cwd=tmp_path)
    assert sqlite.returncode == 2, sqlite.stderr
    assert "cannot share the SQLite file" in sqlite.stderr
    assert "postgresql" in sqlite.stderr and "storage-proxy" in sqlite.stderr
    # Ray missing: `import ray` fails as it does where it is not installed.
    code = ("import sys; sys.modules['ray'] = None; from search.cli import main; "
            f"sys.exit(main(['run', {str(path)!r}, '--ray', '--storage', {postgres_url!r}]))")
    missing = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2, missing.stderr
    assert "pip install 'hpsearch[ray]'" in missing.stderr
    for out in (ids, sqlite, missing):
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_no_ray_at_the_address_is_one_line_and_exit_1(tmp_path, postgres_url, study_name):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp_path, study_data(study_name))
    started = time.monotonic()
    out = hp("run", str(path), "--ray", f"127.0.0.1:{port}", "--storage", postgres_url,
             cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert f"--ray 127.0.0.1:{port}: no Ray cluster reachable there" in out.stderr
    assert time.monotonic() - started < 30  # not Ray's minutes of retries
    assert study_name not in optuna.get_all_study_names(postgres_url)  # nothing written


# ---- on the cluster ----

def test_trials_from_two_nodes_meet_the_exact_budget(cluster, tmp_path, postgres_url,
                                                      study_name):
    data = study_data(study_name, trials=8, epochs=3, size=4000, hidden=64, heartbeat=True,
                      checkpoints=tmp_path / "ckpt")
    out = hp("run", str(write(tmp_path, data)), "--ray", cluster.address, "--gpus", "none",
             "--workers", "2", "--storage", postgres_url, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting 2 CPU worker(s) of 1 CPU as Ray actors on 3 node(s)" in out.stdout
    study, _ = load(study_name, open_storage(postgres_url))
    assert count_trials(study).finished == 8
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    nodes = {t.user_attrs["ray_node"] for t in trials}
    assert len(nodes) == 2, nodes  # one CPU a node: the two workers are on two nodes
    assert nodes <= {n.node_id for n in cluster.list_all_nodes()}
    assert len({t.user_attrs["pid"] for t in trials}) == 2


def test_each_gpu_worker_sees_the_gpu_ray_gave_it(cluster, tmp_path, postgres_url, study_name):
    """Two fake GPUs: two workers, on their node, pinned to GPU 0 and GPU 1 by Ray. No CUDA
    here: each fails its trial on the missing device, having recorded where it ran."""
    data = study_data(study_name, trials=4, epochs=1,
                      run={"max_failures_in_row": 1, "heartbeat_interval": 1, "grace_period": 3})
    out = hp("run", str(write(tmp_path, data)), "--ray", cluster.address, "--storage",
             postgres_url, cwd=tmp_path)
    assert "starting 2 GPU slot(s) of 1 GPU as Ray actors" in out.stdout, out.stdout
    assert "GPU 0" in out.stdout and "GPU 1" in out.stdout
    assert out.returncode == 1  # every worker stopped on its failures: said, not hidden
    study, _ = load(study_name, open_storage(postgres_url))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert sorted(t.user_attrs["ray_gpu"] for t in failed) == ["0", "1"]
    assert {t.user_attrs["ray_node"] for t in failed} == {cluster.gpu_node.node_id}
    assert all("CUDA is not available" in t.user_attrs["ended"] for t in failed)


def test_ctrl_c_stops_the_ray_workers_and_queues_their_trials_again(cluster, tmp_path,
                                                                    postgres_url, study_name):
    """As with local workers: exit 130, every running trial interrupted and queued to resume."""
    # Far more epochs than the test waits for: a trial seen running is still running at the
    # Ctrl-C (30 epochs, 3 s, once let trial #0 complete in between and #2 start).
    data = study_data(study_name, trials=4, epochs=3000, size=20000, hidden=256, heartbeat=True,
                      checkpoints=tmp_path / "ckpt")
    proc = subprocess.Popen([HPSEARCH, "run", str(write(tmp_path, data)), "--ray",
                             cluster.address, "--gpus", "none", "--workers", "2",
                             "--storage", postgres_url], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        running: list = []
        while len(running) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                study, _ = load(study_name, open_storage(postgres_url))
            except Exception:  # noqa: BLE001 - not created yet
                continue
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                       if t.intermediate_values]
        assert len(running) == 2, "two trials an epoch in"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    study, _ = load(study_name, open_storage(postgres_url))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert sorted(t.number for t in failed) == sorted(t.number for t in running), out
    assert all(t.user_attrs["ended"] == "interrupted" for t in failed)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2  # queued to resume
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_node_lost_mid_trial_is_resumed_on_another_from_the_bucket(
        cluster, tmp_path, postgres_url, study_name, s3_endpoint):  # noqa: F811 - the fixture
    """Checkpoints in S3 only (each worker's local copy is its own scratch folder): the retry
    on another node can resume only from the bucket."""
    import boto3

    keys = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    bucket.create_bucket(Bucket="ckpt")
    data = study_data(study_name, trials=3, epochs=8, size=20000, hidden=256, heartbeat=True)
    data["run"]["checkpoint_dir"] = "s3://ckpt/runs"
    head = cluster.head_node.node_id
    nodes = {n.node_id: n for n in cluster.list_all_nodes()}
    proc = subprocess.Popen([HPSEARCH, "run", str(write(tmp_path, data)), "--ray",
                             cluster.address, "--gpus", "none", "--workers", "2",
                             "--storage", postgres_url], cwd=tmp_path,
                            env={**os.environ, **keys}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                study, _ = load(study_name, open_storage(postgres_url))
            except Exception:  # noqa: BLE001 - not created yet
                continue
            victim = next((t for t in study.get_trials(states=(TrialState.RUNNING,))
                           if len(t.intermediate_values) >= 2
                           and t.user_attrs.get("ray_node", head) != head), None)
        assert victim is not None, "no trial two epochs in on a worker node"
        cluster.remove_node(nodes[victim.user_attrs["ray_node"]])
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        # The killed worker could not remove its scratch folder (a lost node takes its own).
        for scratch in Path(tempfile.gettempdir()).glob(f"hpsearch-checkpoints-*/{study_name}"):
            shutil.rmtree(scratch.parent, ignore_errors=True)
    assert proc.returncode == 0, out
    study, _ = load(study_name, open_storage(postgres_url))
    assert count_trials(study).finished == 3  # the exact budget
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retried_from")
                 == victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["ray_node"] != victim.user_attrs["ray_node"]
    assert retry.user_attrs["resumed_from_epoch"] >= 2, json.dumps(retry.user_attrs)[:500]
    assert sorted(retry.intermediate_values) == list(range(1, 9))
    # Finished trials' checkpoints are removed from the bucket with the local ones.
    assert bucket.list_objects_v2(Bucket="ckpt").get("KeyCount") == 0
