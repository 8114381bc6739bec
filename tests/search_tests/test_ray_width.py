"""`--ray` with trials of several processes (`resources`): the actors' plan, and one small
cluster that places them.

The plan is pure (no cluster): an actor per N GPUs of one node, or a CPU worker of at least N
cores, and the refusals. The cluster (one node, three fake GPUs, Ray sets their ids in
CUDA_VISIBLE_DEVICES as for real ones) checks what Ray does with the plan: a trial's two GPUs
reach its worker, and the third stays idle, said in one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from search._errors import SearchError, SpecError
from search.run import load
from search.spec import Resources
from search.storage import count_trials, open_storage
from search.workers import RayRequest
from search.workers._ray import check_width, idle_gpus, plan_ray_slots
from tests.search_tests.studies import study_data

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
TWO_GPUS, TWO_PROCESSES = Resources(gpus=2), Resources(processes=2)
GPU_AUTO = RayRequest("auto")


def slots(node_cpus, node_gpus, *, request=GPU_AUTO, resources=TWO_GPUS,
          free_cpus=None, free_gpus=None):
    """(device, num_cpus, num_gpus, ranks) of each planned actor."""
    planned = plan_ray_slots(node_cpus, node_gpus=node_gpus, request=request,
                             free_cpus=sum(node_cpus) if free_cpus is None else free_cpus,
                             free_gpus=sum(node_gpus) if free_gpus is None else free_gpus,
                             resources=resources)
    return [(s.device, s.num_cpus, s.num_gpus, s.ranks) for s in planned]


# ---- the plan (no cluster) ----

def test_a_trial_of_n_gpus_is_an_actor_asking_for_n_gpus_of_one_node():
    assert slots([8, 8, 8], [2, 3, 1]) == [("cuda", 0, 2, 2)] * 2  # the third node has 1
    assert idle_gpus([2, 3, 1], TWO_GPUS) == 2
    assert slots([8], [8], resources=Resources(gpus=4)) == [("cuda", 0, 4, 4)] * 2
    assert slots([8], [8], request=RayRequest("auto", workers=3)) == [("cuda", 0, 2, 2)] * 3
    assert slots([8, 8], [4, 4], free_gpus=3) == [("cuda", 0, 2, 2)]  # 3 free: one trial
    assert idle_gpus([4, 4], TWO_GPUS) == 0 and idle_gpus([3], TWO_PROCESSES) == 0
    with pytest.raises(SpecError, match=r"resources.gpus: 2 GPUs a trial, and no node of the "
                                        r"Ray cluster has 2 \(GPUs per node: 1, 1; a trial"):
        slots([8, 8], [1, 1])
    with pytest.raises(SearchError, match=r"no 2 free GPUs for a trial \(free: 16 CPU, 1 GPU"):
        slots([8, 8], [2, 2], free_gpus=1)


def test_a_trial_of_n_processes_asks_for_n_cpus_or_more():
    cpu = RayRequest("auto", gpus="none")
    # Without --workers: the smallest node that holds a trial sets the share (2 ranks each).
    assert slots([4, 8], [], request=cpu, resources=TWO_PROCESSES) == [("cpu", 4, 0, 2)] * 3
    assert slots([1, 4], [], request=cpu, resources=TWO_PROCESSES) == [("cpu", 4, 0, 2)]
    # --workers K: the largest share of at least 2 CPUs that fits K, else 2 CPUs a worker.
    five = RayRequest("auto", gpus="none", workers=5)
    assert slots([4, 8], [], request=five, resources=TWO_PROCESSES) == [("cpu", 2, 0, 2)] * 5
    many = RayRequest("auto", gpus="none", workers=50)  # a cap: one per 2 cores at most
    assert slots([4, 8], [], request=many, resources=TWO_PROCESSES) == [("cpu", 2, 0, 2)] * 6
    # As on one machine: with free GPUs a GPU worker each, its trial's ranks share the GPU.
    assert slots([8], [2], resources=TWO_PROCESSES) == [("cuda", 0, 1, 2)] * 2
    with pytest.raises(SpecError, match=r"resources.processes: 16 processes a trial, and the "
                                        r"largest node of the Ray cluster has 8 CPUs"):
        slots([4, 8], [], request=cpu, resources=Resources(processes=16))


@pytest.mark.parametrize(("request_", "pack", "fragment"), [
    (RayRequest("auto", trials_per_gpu=2), None,
     "--trials-per-gpu 2: a trial of 2 GPUs (resources) takes its devices whole"),
    (RayRequest("auto"), 4, "--pack 4: a trial of 2 GPUs (resources) runs alone"),
    (RayRequest("auto", gpus="none"), None,
     "--gpus none: the study's trials take 2 GPUs each (resources.gpus)"),
])
def test_what_a_wide_trial_cannot_share_is_refused(request_, pack, fragment):
    with pytest.raises(SpecError) as refused:
        check_width(request_, TWO_GPUS, pack=pack)
    assert fragment in str(refused.value)
    check_width(request_, Resources(), pack=pack)  # one process a trial: as before


# ---- on a cluster ----

@pytest.fixture(scope="module")
def cluster():
    cluster_utils = pytest.importorskip(
        "ray.cluster_utils", reason="ray is not installed (pip install 'hpsearch[ray]')")
    cluster = cluster_utils.Cluster(
        initialize_head=True, connect=False,
        head_node_args={"num_cpus": 2, "num_gpus": 3, "include_dashboard": False})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def run(tmp_path: Path, data: dict, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run([HPSEARCH, "run", str(path), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.serial
def test_ray_gives_a_trial_two_gpus_and_leaves_the_third_idle(cluster, tmp_path, postgres_url,
                                                               study_name):
    """No CUDA here: the trial fails on the missing device, having recorded its GPUs."""
    data = study_data(study_name, trials=2, epochs=1, resources={"gpus": 2},
                      run={"max_failures_in_row": 1, "heartbeat_interval": 1, "grace_period": 3})
    refused = run(tmp_path, data, "--ray", cluster.address, "--trials-per-gpu", "2",
                  "--storage", postgres_url)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "error: --trials-per-gpu 2: a trial of 2 GPUs (resources) takes its devices whole; "
        "leave --trials-per-gpu out"]
    out = run(tmp_path, data, "--ray", cluster.address, "--storage", postgres_url)
    text = out.stdout + out.stderr
    assert "starting 1 GPU slot(s) of 2 GPUs, 2 ranks each as Ray actors on 1 node(s)" in text
    assert "1 GPU(s) stay idle: a trial takes 2 GPUs of one node (resources.gpus)" in text
    assert "GPU 0,1, 2 ranks of 1 thread" in text, text  # 2 cores: one thread a rank
    study, _ = load(study_name, open_storage(postgres_url))
    trials = study.get_trials(states=(TrialState.FAIL,))
    assert trials and {t.user_attrs["ray_gpu"] for t in trials} == {"0,1"}, text


@pytest.mark.serial
def test_a_trial_of_two_processes_gets_a_worker_of_two_cpus(cluster, tmp_path, postgres_url,
                                                            study_name):
    data = study_data(study_name, trials=1, epochs=1, resources={"processes": 2})
    out = run(tmp_path, data, "--ray", cluster.address, "--gpus", "none", "--storage",
              postgres_url)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "starting 1 CPU worker(s) of 2 CPU, 2 ranks each as Ray actors" in text
    assert ", 2 ranks of 1 thread" in text
    study, _ = load(study_name, open_storage(postgres_url))
    assert count_trials(study).finished == 1
