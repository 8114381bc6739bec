"""deploy/kubernetes stays correct without a cluster.

Every object the kustomization makes is checked against the Kubernetes API's own models (the
official `kubernetes` client): an unknown field, a field in the wrong case or a missing required
field fails here, as `kubectl apply` would refuse it. The commands the containers run are
expanded as Kubernetes expands `$(VAR)` and go through hpsearch's own argument parser, and the
names the objects share (Secret keys, Services, the ConfigMap, the shared volume) line up.
`kubectl kustomize` (no cluster needed) builds the same objects as this file reads.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes import client
from pydantic import BaseModel, ValidationError

from search.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
FAKE_PASSWORD = "0123456789abcdef"  # stands in for postgres.env, which git ignores
FAKE_TOKEN = "fedcba9876543210"
# The user's own files that the Secrets are made from (git ignores them), as the tests make them.
USER_FILES = {
    "postgres.env": f"password={FAKE_PASSWORD}\n",
    "token.env": f"token={FAKE_TOKEN}\n",
    "certs/cert.pem": "-----BEGIN CERTIFICATE-----\nc3RhbmQtaW4=\n-----END CERTIFICATE-----\n",
    "certs/key.pem": "-----BEGIN PRIVATE KEY-----\nc3RhbmQtaW4=\n-----END PRIVATE KEY-----\n",
}
IMAGE_WORKDIR = "/app"  # the Dockerfile's WORKDIR: relative paths of a study resolve there


# --- the objects -----------------------------------------------------------------------------

def _generated() -> list[dict[str, Any]]:
    """The kustomization's ConfigMap and Secret generators, as kustomize makes them (names
    without the hash suffix); the Secrets from USER_FILES."""
    out: list[dict[str, Any]] = []
    for gen in KUSTOMIZATION.get("configMapGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (KDIR / path).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": gen["name"]}, "data": data})
    for gen in KUSTOMIZATION.get("secretGenerator", []):
        values = {}
        for env_file in gen.get("envs", []):
            values.update(line.split("=", 1) for line in USER_FILES[env_file].splitlines())
        for entry in gen.get("files", []):
            key, _, path = entry.rpartition("=")
            values[key or Path(path).name] = USER_FILES[path]
        out.append({"apiVersion": "v1", "kind": "Secret", "type": gen.get("type", "Opaque"),
                    "metadata": {"name": gen["name"]},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}})
    return out


def _objects() -> list[dict[str, Any]]:
    objects = []
    for name in KUSTOMIZATION["resources"]:
        objects += [d for d in yaml.safe_load_all((KDIR / name).read_text()) if d]
    return objects + _generated()


OBJECTS = _objects()
BY_KIND_NAME = {(o["kind"], o["metadata"]["name"]): o for o in OBJECTS}


def _get(kind: str, name: str) -> dict[str, Any]:
    return BY_KIND_NAME[(kind, name)]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    template = obj.get("spec", {}).get("template")
    return template["spec"] if template else None


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod_spec(obj) or {}
    return pod.get("initContainers", []) + pod.get("containers", [])


def _hpsearch_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}/{c['name']}", c)
            for o in OBJECTS for c in _containers(o) if c["image"] == "hpsearch"]


# --- validation against the API's models -----------------------------------------------------

# The client's models are pydantic models from 37 on (earlier ones check required fields only
# in their constructors' setters): the checks below read their fields.
assert issubclass(client.V1Pod, BaseModel), "needs the kubernetes client 37 or later (dev extra)"


def _model(type_name: str) -> type[BaseModel] | None:
    found = getattr(client, type_name, None)
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def _walk(data: Any, type_name: str, path: str, errors: list[str]) -> None:
    """Unknown and missing fields, by the models' JSON names (`attribute_map`); pydantic alone
    also takes the Python names (`restart_policy`), which the API server does not."""
    if match := re.fullmatch(r"List\[(.+)\]", type_name):
        for i, item in enumerate(data if isinstance(data, list) else []):
            _walk(item, match.group(1), f"{path}[{i}]", errors)
        return
    if match := re.fullmatch(r"Dict\[str, (.+)\]", type_name):
        for key, item in (data if isinstance(data, dict) else {}).items():
            _walk(item, match.group(1), f"{path}.{key}", errors)
        return
    model = _model(type_name)
    if model is None or not isinstance(data, dict):
        return  # a scalar (or a wrong type: pydantic names it)
    json_names = {json: attr for attr, json in model.attribute_map.items()}
    for key, value in data.items():
        if key not in json_names:
            errors.append(f"{path}: unknown field {key!r} of {type_name}")
        else:
            _walk(value, model.openapi_types[json_names[key]], f"{path}.{key}", errors)
    for name, field in model.model_fields.items():
        json = field.serialization_alias or field.alias or name
        if field.is_required() and json not in data:
            errors.append(f"{path}: missing required field {json!r} of {type_name}")


def api_errors(obj: dict[str, Any]) -> list[str]:
    """Why the API server would refuse `obj`, as one line each; [] when it is valid."""
    version = obj.get("apiVersion", "").rpartition("/")[2]
    type_name = f"{version.capitalize()}{obj.get('kind', '')}"
    model = _model(type_name)
    if model is None:
        return [f"no Kubernetes model {type_name} for apiVersion {obj.get('apiVersion')!r}, "
                f"kind {obj.get('kind')!r}"]
    errors: list[str] = []
    _walk(obj, type_name, obj["kind"], errors)
    try:
        model.model_validate(obj)
    except ValidationError as e:
        errors += [f"{obj['kind']}.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                   for err in e.errors()]
    return errors


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_is_valid_for_the_kubernetes_api(obj):
    assert api_errors(obj) == []


def test_the_validator_refuses_typos_missing_fields_and_wrong_types():
    job = _get("Job", "hpsearch-worker")
    assert api_errors(job) == []

    typo = copy.deepcopy(job)
    pod = typo["spec"]["template"]["spec"]
    pod["contaners"] = pod.pop("containers")
    assert any("unknown field 'contaners' of V1PodSpec" in e for e in api_errors(typo))
    assert any("missing required field 'containers' of V1PodSpec" in e
               for e in api_errors(typo))

    nameless = copy.deepcopy(job)
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    assert any("missing required field 'name' of V1Container" in e for e in api_errors(nameless))

    python_name = copy.deepcopy(job)
    spec = python_name["spec"]["template"]["spec"]
    spec["restart_policy"] = spec.pop("restartPolicy")
    assert any("unknown field 'restart_policy'" in e for e in api_errors(python_name))

    number = copy.deepcopy(job)
    number["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4
    assert any("limits" in e and "string" in e for e in api_errors(number))

    assert api_errors({"apiVersion": "batch/v1", "kind": "Jobb", "metadata": {}})


def test_the_kustomization_lists_every_manifest_here():
    listed = set(KUSTOMIZATION["resources"])
    generated = {f for g in KUSTOMIZATION["configMapGenerator"] for f in g["files"]}
    assert {p.name for p in KDIR.glob("*.yaml")} == listed | generated | {"kustomization.yaml"}
    kinds = {(o["kind"], o["metadata"]["name"]) for o in OBJECTS}
    assert {("StatefulSet", "hpsearch-postgres"), ("Service", "hpsearch-postgres"),
            ("Secret", "hpsearch-postgres"), ("Secret", "hpsearch-token"),
            ("Secret", "hpsearch-tls"), ("Deployment", "hpsearch-dashboard"),
            ("Service", "hpsearch-dashboard"), ("ConfigMap", "hpsearch-study"),
            ("Job", "hpsearch-create-study"), ("Job", "hpsearch-worker"),
            ("PersistentVolumeClaim", "hpsearch-shared")} <= kinds
    assert len(kinds) == len(OBJECTS), "two objects of one kind share a name"


def test_kustomize_builds_the_same_objects(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed: `kubectl kustomize` builds deploy/kubernetes")
        pytest.skip("kubectl is not installed (CI fails here instead)")
    folder = tmp_path / "kubernetes"
    shutil.copytree(KDIR, folder, ignore=shutil.ignore_patterns(*USER_FILES))
    for path, text in USER_FILES.items():
        (folder / path).parent.mkdir(exist_ok=True)
        (folder / path).write_text(text)
    built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                           timeout=60)
    assert built.returncode == 0, built.stderr
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    # The study's ConfigMap and the certificate's Secret get a content hash in their names, and
    # every reference to them follows.
    text = built.stdout.replace("image: hpsearch:latest", "image: hpsearch")
    for kind, name in (("ConfigMap", "hpsearch-study"), ("Secret", "hpsearch-tls")):
        (hashed,) = [o["metadata"]["name"] for o in objects if o["kind"] == kind
                     and o["metadata"]["name"].startswith(f"{name}-")]
        text = text.replace(hashed, name)
    objects = [d for d in yaml.safe_load_all(text) if d]
    for secret in (o for o in objects if o["kind"] == "Secret"):  # base64 in lines of 76
        secret["data"] = {k: v.replace("\n", "") for k, v in secret["data"].items()}
    assert sorted(objects, key=_key) == sorted(OBJECTS, key=_key)
    for obj in objects:
        assert api_errors(obj) == []


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# --- the commands ---------------------------------------------------------------------------

def _secret_value(name: str, key: str) -> str:
    data = BY_KIND_NAME.get(("Secret", name), {}).get("data", {})
    assert key in data, f"no key {key!r} in a Secret {name!r} (keys: {sorted(data)})"
    return base64.b64decode(data[key]).decode()


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: `$$` is `$`, an unknown reference stays as written."""
    return re.sub(r"\$\$|\$\(([^)]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: in order, each value expanded
    with the variables before it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = _secret_value(ref["name"], ref["key"])
        else:
            env[var["name"]] = expand(var["value"], env)
    return env


def hpsearch_argvs(container: dict[str, Any]) -> list[list[str]]:
    """Every hpsearch command line the container runs, expanded: its command itself, or each
    `hpsearch …` in its `sh -c` script (with the shell's `$VAR`s filled in)."""
    env = container_env(container)
    argv = [expand(a, env) for a in container["command"] + container.get("args", [])]
    for arg in argv:
        assert "$(" not in arg, f"unresolved reference in {arg!r}"
    if argv[0] == "hpsearch":
        return [argv]
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, argv
    lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], t) for t in lexer]
    commands, current = [], None
    for token in tokens:
        if token == "hpsearch":
            current = ["hpsearch"]
            commands.append(current)
        elif current is not None and re.fullmatch(r"[;&|<>()]+", token):
            current = None
        elif current is not None:
            current.append(token)
    return commands


def _parse(argv: list[str]) -> Any:
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse's way of saying "bad flags"
        pytest.fail(f"`{' '.join(argv)}` is not a valid hpsearch command ({e})")


def test_expand_follows_kubernetes_rules():
    env = {"A": "x", "B": "$(A)"}
    assert expand("$(A)-$(B)-$$(A)-$(C)-$A", env) == "x-$(A)-$(A)-$(C)-$A"


@pytest.mark.parametrize("where,container", _hpsearch_containers(), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_each_command_is_a_real_hpsearch_command(where, container):
    argvs = hpsearch_argvs(container)
    assert argvs, f"{where} runs no hpsearch command"
    for argv in argvs:
        assert _parse(argv).command, where


def _storage_url(container: dict[str, Any]) -> str:
    urls = set()
    for argv in hpsearch_argvs(container):
        urls.add(argv[argv.index("--storage") + 1] if "--storage" in argv
                 else container_env(container)["HPSEARCH_STORAGE"])
    assert len(urls) == 1, urls
    return urls.pop()


def storage_problems(url: str) -> list[str]:
    """Why `url` is not the in-cluster PostgreSQL of these manifests, or []."""
    parts = urlsplit(url)
    service = _get("Service", "hpsearch-postgres")
    pg_env = {v["name"]: v for v in _get("StatefulSet", "hpsearch-postgres")["spec"][
        "template"]["spec"]["containers"][0]["env"]}
    expected = {
        "scheme": ("postgresql+psycopg2", parts.scheme),
        "host": (service["metadata"]["name"], parts.hostname),
        "port": (service["spec"]["ports"][0]["port"], parts.port),
        "user": (pg_env["POSTGRES_USER"]["value"], parts.username),
        "password": (FAKE_PASSWORD, parts.password),
        "database": (pg_env["POSTGRES_DB"]["value"], parts.path.lstrip("/")),
    }
    return [f"{what}: expected {want!r}, got {got!r}"
            for what, (want, got) in expected.items() if want != got]


def test_every_hpsearch_container_uses_the_postgres_service_and_the_secret():
    urls = {_storage_url(c) for _, c in _hpsearch_containers()}
    assert len(urls) == 1, "every container meets in one storage"
    assert storage_problems(urls.pop()) == []
    # SQLite (one machine only) or another server would be refused by the same check.
    assert storage_problems("sqlite:///hpsearch.db")
    assert storage_problems(f"postgresql+psycopg2://hpsearch:{FAKE_PASSWORD}@db:5432/hpsearch")


def test_secret_keys_line_up():
    secrets = {o["metadata"]["name"]: o for o in OBJECTS if o["kind"] == "Secret"}
    refs = [v["valueFrom"]["secretKeyRef"] for o in OBJECTS for c in _containers(o)
            for v in c.get("env", []) if "valueFrom" in v]
    assert len(refs) >= 9  # the password: 5 containers; the token: 4 hpsearch containers
    for ref in refs:
        assert ref["key"] in secrets[ref["name"]]["data"], ref
    mounted = [v["secret"]["secretName"] for o in OBJECTS for v in (_pod_spec(o) or {}).get(
        "volumes", []) if "secret" in v]
    assert mounted and set(mounted) <= set(secrets), mounted
    # Each Secret is made from files the user makes (docs/kubernetes.md) and git ignores.
    ignored = (KDIR / ".gitignore").read_text().split()
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for gen in KUSTOMIZATION["secretGenerator"]:
        for path in gen.get("envs", []) + [e.rpartition("=")[2] for e in gen.get("files", [])]:
            assert path in ignored or f"{Path(path).parent}/" in ignored, path
            made = (f"> deploy/kubernetes/{path}", f"deploy/kubernetes/{Path(path).parent}/")
            assert any(m in docs for m in made), path


def test_every_hpsearch_container_has_the_token_and_the_dashboard_tls():
    """The token signs the stored study (create-study) and is checked by every worker; the
    dashboard, bound beyond loopback, serves TLS from the mounted certificate Secret and asks
    for the token."""
    for where, container in _hpsearch_containers():
        refs = [v.get("valueFrom", {}).get("secretKeyRef") for v in container["env"]
                if v["name"] == "HPSEARCH_TOKEN"]
        assert refs == [{"name": "hpsearch-token", "key": "token"}], where
        assert container_env(container)["HPSEARCH_TOKEN"] == FAKE_TOKEN
    dashboard = _get("Deployment", "hpsearch-dashboard")
    (container,) = _containers(dashboard)
    (argv,) = hpsearch_argvs(container)
    assert argv[argv.index("--host") + 1] not in ("127.0.0.1", "localhost", "::1")
    volumes = {v["name"]: v for v in _pod_spec(dashboard)["volumes"]}
    for flag, key in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        path = PurePosixPath(argv[argv.index(flag) + 1])
        (mount,) = [m for m in container["volumeMounts"]
                    if PurePosixPath(m["mountPath"]) == path.parent]
        assert mount.get("readOnly") is True and "subPath" not in mount, mount
        secret = _get("Secret", volumes[mount["name"]]["secret"]["secretName"])
        assert secret["type"] == "kubernetes.io/tls" and path.name == key
        assert key in secret["data"]
    (port,) = container["ports"]
    assert port["name"] == "https"


def test_no_password_is_written_in_the_files():
    for path in KDIR.iterdir():
        if path.name == "postgres.env":
            continue  # the user's own, ignored by git
        for url in re.findall(r"postgresql\S*://[^\s\"']+", path.read_text()):
            assert ":$(POSTGRES_PASSWORD)@" in url, f"{path.name}: {url}"
    assert "postgres.env" in (KDIR / ".gitignore").read_text().split()
    assert not re.search(r"^\s*(stringData|data):", "\n".join(
        (KDIR / r).read_text() for r in KUSTOMIZATION["resources"]), re.M)


# --- what the objects share -------------------------------------------------------------------

def test_the_study_configmap_holds_the_study_that_workers_join():
    from search.spec import load_spec

    study_file = KDIR / "study.yaml"
    spec = load_spec(study_file)
    # The quick start's study, without its timeout (on a cluster a timed-out worker ends its
    # Job with the budget unmet).
    ours, quick = (yaml.safe_load(p.read_text())
                   for p in (study_file, ROOT / "studies" / "fashion_mlp.yaml"))
    assert ours["budget"].pop("timeout_s") is None
    quick["budget"].pop("timeout_s")
    assert ours == quick

    job = _get("Job", "hpsearch-create-study")
    (create,) = hpsearch_argvs(_containers(job)[0])
    args = _parse(create)
    assert args.command == "run" and args.create_only
    mounted = _mounted_configmap_file(job, PurePosixPath(args.study))
    assert mounted == ("hpsearch-study", "study.yaml")
    assert _get("ConfigMap", "hpsearch-study")["data"]["study.yaml"] == study_file.read_text()

    worker = _get("Job", "hpsearch-worker")
    joined = [_parse(argv).name for c in _containers(worker) for argv in hpsearch_argvs(c)]
    assert joined and set(joined) == {spec.name}, "the init container waits for the same study"


def _mounted_configmap_file(obj: dict[str, Any], path: PurePosixPath) -> tuple[str, str]:
    """(ConfigMap, key) of the file at `path` in the pod's first container."""
    volumes = {v["name"]: v for v in _pod_spec(obj)["volumes"]}
    for mount in _containers(obj)[0]["volumeMounts"]:
        if path.parent == PurePosixPath(mount["mountPath"]):
            return volumes[mount["name"]]["configMap"]["name"], path.name
    raise AssertionError(f"{path} is in no mounted volume")


def test_workers_restart_get_gpus_and_time_to_stop():
    job = _get("Job", "hpsearch-worker")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["parallelism"] >= 1 and "completions" not in spec  # a work queue
    assert spec["backoffLimit"] >= 10
    assert pod["restartPolicy"] == "OnFailure"
    (worker,) = pod["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    (argv,) = hpsearch_argvs(worker)
    args = _parse(argv)
    assert args.command == "worker" and args.gpus == "auto"
    # SIGTERM reaches a supervisor (auto: it adds workers to the pod's GPU), which waits 8 s
    # for its workers, then queues their trials again: that must fit inside the grace period.
    assert args.trials_per_gpu == "auto"
    assert pod["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize(("width", "trials"), [(2, 1), (2, 2), (4, 2)])
def test_the_gpu_limit_for_trials_of_several_gpus_is_width_times_trials(width, trials):
    """The worker Job's comment says: a study of `resources: {gpus: N}` sets the pod's GPU
    limit to N x the trials it runs at once. The pod's own command, planned as its worker
    plans it on that many GPUs, runs exactly that many trials and leaves no GPU idle."""
    from search.spec import Resources
    from search.workers import plan_slots, widen

    text = (KDIR / "worker.yaml").read_text()
    assert "(`resources: {gpus: N}`)" in text and "needs N x the trials a pod runs" in text
    job = _get("Job", "hpsearch-worker")
    (worker,) = job["spec"]["template"]["spec"]["containers"]
    args = _parse(hpsearch_argvs(worker)[0])
    limit = width * trials
    slots = plan_slots(args.gpus, trials_per_gpu=args.trials_per_gpu, workers=args.workers,
                       cores=8, gpu_ids=[str(i) for i in range(limit)])
    said: list[str] = []
    wide = widen(slots, Resources(gpus=width), trials_per_gpu=args.trials_per_gpu,
                 pack=args.pack, cores=8, say=said.append)
    assert [s.ranks for s in wide] == [width] * trials and not said  # no GPU idle
    assert sorted(",".join(s.cuda_visible_devices for s in wide).split(",")) == \
        [str(i) for i in range(limit)]


def test_checkpoints_and_artifacts_are_on_the_shared_volume():
    from search.spec import load_spec

    claim = _get("PersistentVolumeClaim", "hpsearch-shared")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    spec = load_spec(KDIR / "study.yaml")
    checkpoints = PurePosixPath(IMAGE_WORKDIR) / (spec.run.checkpoint_dir or "checkpoints")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", dockerfile, re.M)

    def shared_mounts(obj: dict[str, Any], container: dict[str, Any]) -> set[str]:
        shared = {v["name"] for v in _pod_spec(obj)["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "hpsearch-shared"}
        return {m["mountPath"] for m in container["volumeMounts"] if m["name"] in shared}

    worker_job = _get("Job", "hpsearch-worker")
    worker = worker_job["spec"]["template"]["spec"]["containers"][0]
    assert str(checkpoints) in shared_mounts(worker_job, worker)
    for obj in (worker_job, _get("Deployment", "hpsearch-dashboard")):
        container = _pod_spec(obj)["containers"][0]
        artifacts = container_env(container)["HPSEARCH_ARTIFACTS"]
        assert artifacts in shared_mounts(obj, container), obj["metadata"]["name"]


def test_pods_run_as_the_images_user():
    """The image runs as a user who is not root (the Dockerfile's USER): each pod says so, so
    the kubelet refuses to run it as root, and the pods on the shared volume get it as their
    group."""
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile's USER is uid:gid, numeric"
    uid, gid = map(int, user.groups())
    assert uid != 0
    pods = {o["metadata"]["name"]: _pod_spec(o) for o in OBJECTS
            if any(c["image"] == "hpsearch" for c in _containers(o))}
    assert set(pods) == {"hpsearch-dashboard", "hpsearch-create-study", "hpsearch-worker"}
    for name, pod in pods.items():
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, name
        assert (context.get("runAsUser"), context.get("runAsGroup")) == (uid, gid), name
        if any(v.get("persistentVolumeClaim", {}).get("claimName") == "hpsearch-shared"
               for v in pod.get("volumes", [])):
            assert context.get("fsGroup") == gid, name


def test_services_select_their_pods_and_ports():
    for service in (o for o in OBJECTS if o["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        selector = service["spec"]["selector"]
        pods = [o for o in OBJECTS if _pod_spec(o) is not None
                and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, service["metadata"]["name"]
        (pod,) = pods
        assert pod["spec"]["selector"]["matchLabels"].items() <= \
            pod["spec"]["template"]["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in _containers(pod) for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, port
    postgres = _get("StatefulSet", "hpsearch-postgres")
    assert postgres["spec"]["serviceName"] == "hpsearch-postgres"
    (db,) = _containers(postgres)
    assert "pg_isready" in db["readinessProbe"]["exec"]["command"]
    data = {m["mountPath"] for m in db["volumeMounts"] if m["name"] == "pgdata"}
    pgdata = container_env(db)["PGDATA"]
    assert any(PurePosixPath(pgdata).is_relative_to(d) for d in data), pgdata
    assert [t["metadata"]["name"] for t in postgres["spec"]["volumeClaimTemplates"]] == ["pgdata"]


def test_dashboard_listens_on_its_service_port_inside_the_cluster_only():
    dashboard = _get("Deployment", "hpsearch-dashboard")
    (container,) = _containers(dashboard)
    (argv,) = hpsearch_argvs(container)
    args = _parse(argv)
    assert args.command == "dashboard" and args.host == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    service = _get("Service", "hpsearch-dashboard")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_docs_commands_name_these_objects():
    """The commands a reader copies (README, docs/kubernetes.md, the kustomization's header)
    name the objects that exist."""
    service_port = _get("Service", "hpsearch-dashboard")["spec"]["ports"][0]["port"]
    for path in (ROOT / "README.md", ROOT / "docs" / "kubernetes.md", KDIR / "kustomization.yaml"):
        text = path.read_text()
        assert "kubectl apply -k deploy/kubernetes" in text, path.name
        assert "> deploy/kubernetes/postgres.env" in text, path.name
        jobs = re.findall(r"kubectl patch job (\S+) .*parallelism", text)
        forwards = re.findall(r"kubectl port-forward svc/(\S+) \d+:(\d+)", text)
        assert jobs and all(("Job", j) in BY_KIND_NAME for j in jobs), path.name
        assert forwards and all(("Service", s) in BY_KIND_NAME and int(p) == service_port
                                for s, p in forwards), path.name
