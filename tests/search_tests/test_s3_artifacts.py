"""Artifacts in an S3-compatible bucket: a real S3 API (moto's server on loopback), real boto3.

`HPSEARCH_ARTIFACTS=s3://bucket/prefix` sends every trial's charts and metrics there. Skipped
where moto's server is not installed (it comes with the `dev` extra; CI has it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

MOTO = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


@pytest.fixture
def s3_endpoint():
    if not Path(MOTO).exists():
        pytest.skip("moto_server is not installed (pip install 'hpsearch[dev]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _bucket(endpoint: str, prefix: str):
    """The environment that sends artifacts to s3://hp-artifacts/`prefix`, and a client of the
    bucket (created)."""
    import boto3

    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "HPSEARCH_ARTIFACTS": f"s3://hp-artifacts/{prefix}"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket="hp-artifacts")
    return env, client


def _spec(name: str, run: dict) -> dict:
    return {"name": name, "budget": {"trials": 2, "epochs": 2},
            "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
            "data": {"dataset": "synthetic", "size": 512}, "model": {"hidden": [16]},
            "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}, "run": run}


def test_trial_artifacts_land_in_the_bucket(s3_endpoint, tmp_path, study_name):
    env, client = _bucket(s3_endpoint, "exp1")
    spec = _spec(study_name, {"checkpoint_dir": str(tmp_path / "ckpt")})
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = subprocess.run([HPSEARCH, "run", str(path), "--storage", url], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout.lower() + result.stderr.lower()

    import optuna
    from optuna.artifacts import get_all_artifact_meta

    study = optuna.load_study(study_name=study_name, storage=url)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="hp-artifacts",
                                                     Prefix="exp1/")["Contents"]}
    for trial in study.trials:
        metas = {m.filename: m for m in get_all_artifact_meta(trial, storage=study._storage)}
        assert {"curves.svg", "lr.svg", "grad_norms.svg", "metrics.json"} <= set(metas)
        assert all(f"exp1/{m.artifact_id}" in keys for m in metas.values())
        body = client.get_object(Bucket="hp-artifacts",
                                 Key=f"exp1/{metas['metrics.json'].artifact_id}")["Body"]
        assert json.loads(body.read())["history"] == trial.user_attrs["history"]


def test_checkpoints_follow_the_artifact_store(s3_endpoint, tmp_path, study_name):
    """`run.checkpoint_dir: artifact-store`: each epoch's checkpoint goes to
    $HPSEARCH_ARTIFACTS/checkpoints, where a retry on another machine finds it."""
    env, client = _bucket(s3_endpoint, "exp2")
    spec = _spec(study_name, {"checkpoint_dir": "artifact-store", "keep_checkpoints": True})
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([HPSEARCH, "run", str(path), "--storage",
                             f"sqlite:///{tmp_path / 's.db'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="hp-artifacts",
                                                     Prefix="exp2/checkpoints/")["Contents"]}
    assert keys == {f"exp2/checkpoints/{study_name}/trial-{n}/checkpoint.pt" for n in (0, 1)}
    assert not (tmp_path / "checkpoints").exists()  # nothing on the local disk's default
    # `hpsearch delete` removes the bucket's copies with the study.
    deleted = subprocess.run([HPSEARCH, "delete", study_name, "--yes", "--storage",
                              f"sqlite:///{tmp_path / 's.db'}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "2 checkpoint file(s) in s3://hp-artifacts/exp2/checkpoints" in deleted.stdout
    left = client.list_objects_v2(Bucket="hp-artifacts", Prefix="exp2/checkpoints/")
    assert left.get("KeyCount") == 0, left.get("Contents")


def test_where_artifact_store_checkpoints_go(monkeypatch):
    from search._errors import SpecError
    from search.storage import checkpoint_location

    monkeypatch.delenv("HPSEARCH_ARTIFACTS", raising=False)
    assert checkpoint_location(None, "sqlite:///s.db") == "checkpoints"
    assert checkpoint_location("/shared/ckpt", None) == "/shared/ckpt"
    assert checkpoint_location("artifact-store", "sqlite:////data/s.db") == (
        "/data/s.db.artifacts/checkpoints")  # beside the storage, as its artifacts are
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", "s3://bucket/runs/")
    assert checkpoint_location("artifact-store", "postgresql://h/db") == (
        "s3://bucket/runs/checkpoints")
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", "/mnt/shared/art")
    assert checkpoint_location("artifact-store", None) == "/mnt/shared/art/checkpoints"
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", "off")
    with pytest.raises(SpecError, match="artifact-store, but the artifact store is off"):
        checkpoint_location("artifact-store", None)


def test_artifact_store_checkpoints_with_the_store_off_are_refused_before_anything(tmp_path,
                                                                                     study_name):
    """`validate` and `run` refuse `checkpoint_dir: artifact-store` with the store off, and
    `run` does so before the study (or its database) is created."""
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump(_spec(study_name, {"checkpoint_dir": "artifact-store"})))
    env = {**os.environ, "HPSEARCH_ARTIFACTS": "off"}
    db = tmp_path / "s.db"
    for argv in (["validate", str(path)], ["run", str(path), "--storage", f"sqlite:///{db}"]):
        result = subprocess.run([HPSEARCH, *argv], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "run.checkpoint_dir: artifact-store, but the artifact store is off" in (
            result.stderr), result.stderr
    assert not db.exists()


def test_delete_with_its_checkpoint_bucket_out_of_reach_deletes_nothing(tmp_path, study_name):
    """`hpsearch delete` removes the bucket's copies first: a bucket it cannot reach is one
    line naming it, exit 1, and the study stays whole."""
    from search.run import load
    from search.storage import open_storage
    from tests.search_tests.test_workers import create

    url = f"sqlite:///{tmp_path / 's.db'}"
    study, _ = create(url, _spec(study_name, {"checkpoint_dir": "s3://hp-ckpt/runs"}))
    study.enqueue_trial({"lr": 0.01})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1"}
    out = subprocess.run([HPSEARCH, "delete", study_name, "--yes", "--storage", url],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "s3://hp-ckpt/runs: cannot remove the study's checkpoints there" in out.stderr
    assert "the study was not deleted" in out.stderr
    assert len(load(study_name, open_storage(url))[0].get_trials()) == 1
