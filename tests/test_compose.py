"""docker-compose.yml stays correct without Docker: every command is a real hpsearch command.

Docker cannot run on the build machines; this parses the file the way compose would use it
and checks each service's command against hpsearch's own argument parser.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from search.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]

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

def test_the_study_file_exists_and_workers_join_it_by_its_name():
    from search.spec import load_spec

    create = SERVICES["create-study"]["command"]
    study_file = next(a for a in create if a.endswith(".yaml"))
    spec = load_spec(ROOT / study_file)
    assert "--create-only" in create
    assert SERVICES["worker"]["command"][2] == spec.name

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

def test_dashboard_listens_on_all_interfaces_inside_but_publishes_on_localhost():
    dash = SERVICES["dashboard"]
    command = dash["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert all(p.startswith("127.0.0.1:") for p in dash["ports"])
