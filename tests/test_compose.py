"""docker-compose.yml stays correct without Docker: every command is a real hpsearch command.

Docker cannot run on the build machines; this parses the file the way compose would use it
and checks each service's command against hpsearch's own argument parser, what the services
share (the storage, the artifact store's volume, the study file) and the Dockerfile they are
built from (the extras as a build argument, a user who is not root).
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path, PurePosixPath

import pytest
import yaml

from search.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
IMAGE_WORKDIR = PurePosixPath("/app")  # the Dockerfile's WORKDIR: relative paths resolve there

def hpsearch_services() -> list[str]:
    return [name for name, s in SERVICES.items() if s.get("command", [None])[0] == "hpsearch"]

def test_expected_services_exist():
    assert {"postgres", "dashboard", "worker", "create-study"} <= set(SERVICES)
    assert set(hpsearch_services()) == {"dashboard", "worker", "create-study"}

@pytest.mark.parametrize("name", hpsearch_services())
def test_each_command_is_a_real_hpsearch_command(name):
    argv = SERVICES[name]["command"]
    assert isinstance(argv, list), "exec form, so no shell mangles the arguments"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse's way of saying "bad flags"
        pytest.fail(f"{name}: `{' '.join(argv)}` is not a valid hpsearch command ({e})")
    assert args.command, name

def mounts(service: dict) -> list[tuple[str, PurePosixPath, bool]]:
    """(source, path in the container, read-only) of each of the service's volumes."""
    out = []
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        out.append((source, PurePosixPath(target), mode == ["ro"]))
    return out

def host_file(service: dict, path: str) -> Path:
    """The file of this checkout that `path` (as the service's command names it) is."""
    inside = IMAGE_WORKDIR / path
    for source, target, _ in mounts(service):
        if source.startswith("./") and inside.is_relative_to(target):
            return ROOT / source / inside.relative_to(target)
    raise AssertionError(f"{inside} is in no folder of this checkout mounted in the service")

def test_the_study_file_exists_and_workers_join_it_by_its_name():
    from search.spec import load_spec

    create = SERVICES["create-study"]["command"]
    study_file = host_file(SERVICES["create-study"], next(a for a in create if a.endswith(".yaml")))
    assert study_file == ROOT / "deploy" / "compose" / "study.yaml"
    spec = load_spec(study_file)
    assert "--create-only" in create
    assert SERVICES["worker"]["command"][2] == spec.name

def test_the_study_is_the_quick_starts_without_its_time_box():
    """A compose worker that times out exits 0 and stays down with the study unfinished: the
    budget alone ends it. The quick start's file keeps its timeout."""
    from search.spec import load_spec

    ours_file = ROOT / "deploy" / "compose" / "study.yaml"
    ours, quick = (yaml.safe_load(p.read_text())
                   for p in (ours_file, ROOT / "studies" / "fashion_mlp.yaml"))
    assert ours["budget"].pop("timeout_s") is None
    assert quick["budget"].pop("timeout_s") == 330
    assert ours == quick
    assert load_spec(ours_file).budget.timeout_s is None

def artifact_store(service: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(named volume, path inside it) where the service's artifact store is, resolved by
    hpsearch's own rule from the service's environment."""
    from search.storage import artifact_location

    env = service["environment"]
    if "HPSEARCH_ARTIFACTS" in env:
        monkeypatch.setenv("HPSEARCH_ARTIFACTS", env["HPSEARCH_ARTIFACTS"])
    else:
        monkeypatch.delenv("HPSEARCH_ARTIFACTS", raising=False)
    location = artifact_location(env["HPSEARCH_STORAGE"])
    assert location and "://" not in location, location
    inside = IMAGE_WORKDIR / location
    found = [(target, source) for source, target, _ in mounts(service)
             if inside.is_relative_to(target)]
    assert found, f"{inside} is on no volume: it stays in its container"
    target, source = max(found, key=lambda f: len(f[0].parts))  # the innermost mount
    assert source in COMPOSE["volumes"], f"{source} is not a named volume"
    return source, str(inside.relative_to(target))

def test_workers_and_dashboard_share_one_artifact_store(monkeypatch):
    worker = artifact_store(SERVICES["worker"], monkeypatch)
    assert artifact_store(SERVICES["dashboard"], monkeypatch) == worker
    assert not [ro for source, _, ro in mounts(SERVICES["worker"]) if source == worker[0] and ro]
    # Without the shared volume each container keeps its own ./hpsearch-artifacts: refused.
    alone = {**SERVICES["worker"], "environment": {
        k: v for k, v in SERVICES["worker"]["environment"].items() if k != "HPSEARCH_ARTIFACTS"}}
    with pytest.raises(AssertionError, match="on no volume"):
        artifact_store(alone, monkeypatch)

def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]

def test_the_image_runs_as_a_user_who_owns_the_volume_folders():
    steps = _instructions()
    assert ("WORKDIR", str(IMAGE_WORKDIR)) in steps
    (user,) = [args for op, args in steps if op == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0, "numeric, for runAsNonRoot"
    ops = [op for op, _ in steps]
    assert ops.index("USER") > len(ops) - 1 - ops[::-1].index("RUN"), "USER after the last RUN"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert re.search(rf"groupadd --gid {gid} hpsearch\b", runs), runs
    assert re.search(rf"useradd --uid {uid} --gid {gid}\b[^&]* hpsearch\b", runs), runs
    (chown,) = re.findall(r"chown hpsearch:hpsearch ([^&]+)", runs)
    owned = {PurePosixPath(p) for p in chown.split()}
    assert IMAGE_WORKDIR in owned  # files a command writes in its working folder
    for name in hpsearch_services():
        for source, target, _ in mounts(SERVICES[name]):
            if source in COMPOSE["volumes"]:  # a new named volume takes its folder's owner
                assert target in owned, f"{name}: {target} (volume {source}) is root's"

def test_the_extras_are_a_build_argument():
    steps = _instructions()
    (arg,) = [i for i, (op, a) in enumerate(steps) if op == "ARG" and a.startswith("EXTRAS")]
    (install,) = [i for i, (op, a) in enumerate(steps) if op == "RUN" and '".[' in a]
    assert arg < install
    (spec,) = re.findall(r'"(\.\[[^"]*\])"', steps[install][1])
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    extras = set(re.findall(r"^([\w-]+) = \[", section.split("\n[")[0], re.M))
    for given, wanted in (("", ["postgres", "mysql", "dashboard"]),
                          ("s3,ray", ["postgres", "mysql", "dashboard", "s3", "ray"])):
        expanded = subprocess.run(["sh", "-c", f'echo "{spec}"'], env={"EXTRAS": given},
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert expanded == f".[{','.join(wanted)}]"
        assert set(wanted) <= extras
    build = SERVICES["worker"]["build"]
    assert build["context"] == "." and "EXTRAS" in build["args"]

def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")

def test_workers_have_room_in_dev_shm_for_data_loader_workers():
    assert _bytes(SERVICES["worker"]["shm_size"]) >= 1024 ** 3
    assert _bytes("64m") == 64 * 1024 ** 2  # docker's default, too small

def test_every_hpsearch_service_uses_the_same_storage():
    urls = set()
    for name in hpsearch_services():
        service = SERVICES[name]
        command = service["command"]
        if "--storage" in command:
            urls.add(command[command.index("--storage") + 1])
        else:
            urls.add(service["environment"]["HPSEARCH_STORAGE"])
    assert len(urls) == 1, urls
    (url,) = urls
    assert url.startswith("postgresql+psycopg2://hpsearch:")
    assert "@postgres:5432/hpsearch" in url
    pg = SERVICES["postgres"]["environment"]
    assert pg["POSTGRES_USER"] == "hpsearch" and pg["POSTGRES_DB"] == "hpsearch"

def test_no_password_is_written_in_the_file():
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"^\s*-?\s*POSTGRES_PASSWORD\s*[:=]", text, re.M)  # never a value
    for url in re.findall(r"postgresql\S*://\S+", text):
        assert "${POSTGRES_PASSWORD" in url, url
    assert SERVICES["postgres"]["env_file"] == ".env"
    assert (ROOT / ".env.example").exists()

def test_postgres_has_a_volume_and_a_healthcheck():
    pg = SERVICES["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "pgdata" in COMPOSE["volumes"]

def test_workers_reserve_gpus_and_wait_for_the_study():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert worker["depends_on"]["create-study"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "replicas" not in worker.get("deploy", {})  # scaled with --scale
    assert any(v.endswith(":/app/checkpoints") for v in worker["volumes"])

def test_every_hpsearch_service_takes_the_token_from_env_or_refuses_to_start():
    """`${VAR:?message}`: compose stops with the message when .env has no token."""
    for name in hpsearch_services():
        token = SERVICES[name]["environment"]["HPSEARCH_TOKEN"]
        assert re.fullmatch(r"\$\{HPSEARCH_TOKEN:\?[^}]*\.env[^}]*\}", token), (name, token)
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["HPSEARCH_TOKEN"] == "", "no token that works until someone makes one"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored and "/certs/" in ignored

def test_the_dashboard_serves_tls_from_the_certs_folder():
    dash = SERVICES["dashboard"]
    command = dash["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # beyond loopback: TLS and token
    for flag, name in (("--tls-cert", "cert.pem"), ("--tls-key", "key.pem")):
        inside = PurePosixPath(command[command.index(flag) + 1])
        assert inside.name == name
        sources = [(s, ro) for s, t, ro in mounts(dash) if inside.is_relative_to(t)]
        assert sources == [("./certs", True)], sources
    for name in set(hpsearch_services()) - {"dashboard"}:  # only the dashboard holds the key
        assert "./certs" not in [s for s, _, _ in mounts(SERVICES[name])], name

def _certificate_recipe() -> str:
    """The docs' commands that make certs/ (the ```bash block that writes certs/cert.pem)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "certs/cert.pem" in b]
    return block

def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake between the two contexts; raises the client's verification error."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        def serve() -> None:
            try:
                server.wrap_socket(ours, server_side=True).close()
            except (ssl.SSLError, OSError):
                pass  # the client refused: its error is the one to see
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client.wrap_socket(theirs, server_hostname=hostname).close()
        finally:
            theirs.close()
            thread.join(10)

@pytest.mark.skipif(shutil.which("openssl") is None, reason="the docs' recipe runs openssl")
def test_the_docs_recipe_makes_a_certificate_a_client_trusts(tmp_path):
    made = subprocess.run(["bash", "-euc", _certificate_recipe()], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    certs = tmp_path / "certs"
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "cert.pem", certs / "key.pem")  # the files compose names
    client = ssl.create_default_context(cafile=certs / "ca.pem")
    for hostname in ("localhost", "dashboard", "hpsearch-dashboard"):  # compose, Kubernetes
        _handshake(server, client, hostname)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "elsewhere.example")
    with pytest.raises(ssl.SSLCertVerificationError):  # a client without the CA
        _handshake(server, ssl.create_default_context(), "localhost")

def test_dashboard_listens_on_all_interfaces_inside_but_publishes_on_localhost():
    dash = SERVICES["dashboard"]
    command = dash["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert all(p.startswith("127.0.0.1:") for p in dash["ports"])
