"""Nobody in who does not belong: the storage proxy and the dashboard behind TLS and a token,
and a stored spec that workers holding the token run only with its signature.

A CA is made here (trustme); the proxy and the dashboard are the real commands on loopback, the
workers real `hpsearch` processes, the refused client a plain gRPC channel calling every method
of Optuna's storage service.
"""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml

from search._errors import SpecError, StorageError
from search._process import free_port
from search.spec import parse_spec
from search.storage import SPEC_ATTR, SPEC_SIGNATURE_ATTR, open_storage
from search.storage._compat import GRPC_SERVICE, storage_service_methods

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
TOKEN = "tok-3f9a1c-never-printed"
FIT = '''
def fit(params, trial):
    for epoch in range(1, trial.epochs + 1):
        trial.report(epoch, loss=(params["x"] - 1) ** 2 + 1 / epoch)
'''


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA and a certificate for 127.0.0.1 it signed, as PEM files, and a token file."""
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    (folder / "token").write_text(TOKEN + "\n")
    return folder


def env(**more: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HPSEARCH_TOKEN", "HPSEARCH_TLS_CA", "HPSEARCH_STORAGE")}
    return {**clean, **more}


def hp(*args: str, cwd: Path, timeout: int = 120, **more: str) -> subprocess.CompletedProcess:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env(PYTHONPATH=str(cwd), **more))


def served(command: list[str], cwd: Path, ready: str) -> subprocess.Popen:
    """A serving command, once it printed `ready`."""
    out = (cwd / "served.out").open("w")
    proc = subprocess.Popen([HPSEARCH, *command], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT, text=True, env=env())
    deadline = time.monotonic() + 60
    while ready not in (cwd / "served.out").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((cwd / "served.out").read_text())
        time.sleep(0.1)
    return proc


def stopped(proc: subprocess.Popen, cwd: Path) -> str:
    proc.terminate()
    proc.wait(timeout=20)
    return (cwd / "served.out").read_text()


def study_file(cwd: Path, name: str, **changes) -> Path:
    (cwd / "fit.py").write_text(FIT)
    study = {"name": name, "trainer": "fit:fit", "objective": {"metric": "loss"},
             "budget": {"trials": 3, "epochs": 2}, "sampler": {"type": "random", "seed": 0},
             "pruner": {"type": "none"}, "space": {"x": {"low": -2.0, "high": 3.0}}, **changes}
    path = cwd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def dump(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


@pytest.mark.parametrize("command", ["storage-proxy", "dashboard"])
def test_serving_beyond_this_machine_needs_tls_and_a_token(tmp_path, tls, command):
    bare = hp(command, "--host", "0.0.0.0", cwd=tmp_path)
    what = "the storage proxy" if command == "storage-proxy" else "the dashboard"
    assert bare.returncode == 2 and bare.stderr.splitlines() == [
        f"error: --host 0.0.0.0: serving {what} beyond this machine needs TLS (--tls-cert "
        "CERT.pem --tls-key KEY.pem) and a token (--token-file FILE or $HPSEARCH_TOKEN); "
        "--insecure serves without them (see docs/security.md)"]
    no_token = hp(command, "--host", "0.0.0.0", "--tls-cert", str(tls / "cert.pem"),
                  "--tls-key", str(tls / "key.pem"), cwd=tmp_path)
    assert no_token.returncode == 2 and "needs a token (--token-file" in no_token.stderr
    half = hp(command, "--tls-cert", str(tls / "cert.pem"), cwd=tmp_path)
    assert half.returncode == 2 and "--tls-cert needs --tls-key too" in half.stderr
    assert not (tmp_path / "hpsearch.db").exists()  # refused before any storage


@pytest.mark.serial
def test_the_proxy_lets_in_only_the_token_over_tls(tmp_path, tls):
    """A worker with the token completes a study through grpcs://; without it, with another,
    or over plain grpc://, every method of the service is refused and nothing changes."""
    import grpc

    db, port = tmp_path / "proxied.db", free_port()
    proxy = served(["storage-proxy", "--storage", f"sqlite:///{db}", "--port", str(port),
                    "--tls-cert", str(tls / "cert.pem"), "--tls-key", str(tls / "key.pem"),
                    "--token-file", str(tls / "token")], tmp_path, "Ctrl-C stops it")
    url = f"grpcs://127.0.0.1:{port}"
    try:
        run = hp("run", str(study_file(tmp_path, "proxied")), "--storage", url, "--tls-ca",
                 str(tls / "ca.pem"), "--workers", "1", "--gpus", "none", cwd=tmp_path,
                 HPSEARCH_TOKEN=TOKEN)
        assert run.returncode == 0, run.stdout + run.stderr
        before = dump(db)
        trials = [r for r in before if r.startswith('INSERT INTO "trials"')]
        assert len(trials) == 3 and all("'COMPLETE'" in r for r in trials)

        credentials = grpc.ssl_channel_credentials((tls / "ca.pem").read_bytes())
        channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
        methods = storage_service_methods()
        assert len(methods) >= 15 and "SetStudyUserAttribute" in methods
        for metadata in ((), (("authorization", "Bearer wrong"),),
                         (("authorization", TOKEN),)):  # (the token, not as a bearer token)
            for method in methods:
                call = channel.unary_unary(f"/{GRPC_SERVICE}/{method}")
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"", metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        channel.close()
        for bad in ({"HPSEARCH_TOKEN": "wrong"}, {}):
            status = hp("status", "--storage", url, "--tls-ca", str(tls / "ca.pem"),
                        cwd=tmp_path, **bad)
            assert status.returncode == 2, status.stderr
            assert status.stderr.startswith(f"error: the storage proxy at {url} refused this "
                                            "client, which came with"), status.stderr
        os.environ.pop("HPSEARCH_TOKEN", None)
        with pytest.raises(StorageError, match="a proxy serving TLS is reached with grpcs://"):
            open_storage(f"grpc://127.0.0.1:{port}")
        assert dump(db) == before  # nothing read or written by a refused call
    finally:
        out = stopped(proxy, tmp_path)
    assert TOKEN not in out + run.stdout + run.stderr


def test_a_spec_changed_without_the_token_is_refused_by_a_worker_holding_it(tmp_path,
                                                                            monkeypatch):
    """The attack of the issue: the stored spec rewritten (to run a command) by one who can
    write the database but holds no token; and a signed spec copied into another study."""
    from search.run import create_or_load, load

    db = tmp_path / "signed.db"
    url = f"sqlite:///{db}"
    monkeypatch.setenv("HPSEARCH_TOKEN", TOKEN)
    path = study_file(tmp_path, "signed")
    create_or_load(parse_spec(yaml.safe_load(path.read_text())), open_storage(url))
    create_or_load(parse_spec({**yaml.safe_load(path.read_text()), "name": "other"}),
                   open_storage(url))
    monkeypatch.delenv("HPSEARCH_TOKEN")

    storage = optuna.storages.RDBStorage(url)  # the database, without the token
    study_id = storage.get_study_id_from_name("signed")
    stored = json.loads(storage.get_study_user_attrs(study_id)[SPEC_ATTR])
    assert storage.get_study_user_attrs(study_id)[SPEC_SIGNATURE_ATTR]
    trainer = {**stored["spec"]["trainer"], "function": None,
               "command": ["sh", "-c", f"touch {tmp_path / 'pwned'}"]}
    evil = {**stored, "spec": {**stored["spec"], "trainer": trainer}}
    storage.set_study_user_attr(study_id, SPEC_ATTR, json.dumps(evil))
    other_id = storage.get_study_id_from_name("other")
    signed = storage.get_study_user_attrs(study_id)[SPEC_SIGNATURE_ATTR]
    storage.set_study_user_attr(other_id, SPEC_SIGNATURE_ATTR, signed)  # copied over
    storage.remove_session()

    worker = hp("worker", "signed", "--storage", url, "--gpus", "none", cwd=tmp_path,
                HPSEARCH_TOKEN=TOKEN)
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert worker.stderr.splitlines() == [
        "error: study 'signed': its stored spec does not match its signature (changed without "
        "the token, or signed with another token): refusing to run what it names; if the "
        "study file is yours, `hpsearch run STUDY.yaml --create-only` with the token in "
        "$HPSEARCH_TOKEN signs it again"], worker.stderr
    assert not (tmp_path / "pwned").exists()
    assert TOKEN not in worker.stdout + worker.stderr

    create_or_load(parse_spec({**yaml.safe_load(path.read_text()), "name": "unsigned"}),
                   open_storage(url))  # (no token here: no signature)
    monkeypatch.setenv("HPSEARCH_TOKEN", TOKEN)
    with pytest.raises(SpecError, match="study 'unsigned': its stored spec is not signed, and "
                                        "this process holds a token"):
        load("unsigned", open_storage(url))
    with pytest.raises(SpecError, match="study 'other': its stored spec does not match"):
        load("other", open_storage(url))  # a signature is the study's own, not any study's
    # The study file, run again with a new token, signs its spec again (after a token change);
    # a stored spec that differs from the file is not signed.
    monkeypatch.setenv("HPSEARCH_TOKEN", "the-new-token")
    with pytest.raises(SpecError, match="already exists with different settings"):
        create_or_load(parse_spec(yaml.safe_load(path.read_text())), open_storage(url))
    create_or_load(parse_spec({**yaml.safe_load(path.read_text()), "name": "other"}),
                   open_storage(url))
    assert load("other", open_storage(url))[1].name == "other"  # what a worker holding it loads


def _get(url: str, *, context: ssl.SSLContext, headers: dict | None = None
         ) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.serial
def test_the_dashboard_asks_for_the_token_first(tmp_path, tls):
    """Over TLS, with the token: the API refuses without it; Chromium meets the login page,
    is refused a wrong token, and sees the study with the right one."""
    from tests.search_tests.test_browser import _missing

    db = tmp_path / "watched.db"
    assert hp("run", str(study_file(tmp_path, "watched")), "--storage", f"sqlite:///{db}",
              "--gpus", "none", cwd=tmp_path).returncode == 0
    port = free_port()
    dashboard = served(["dashboard", "--storage", f"sqlite:///{db}", "--port", str(port),
                        "--tls-cert", str(tls / "cert.pem"), "--tls-key", str(tls / "key.pem"),
                        "--token-file", str(tls / "token")], tmp_path, "Ctrl-C stops it")
    base = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    try:
        assert _get(f"{base}/api/studies", context=context)[0] == 401
        assert _get(f"{base}/api/studies", context=context,
                    headers={"Authorization": "Bearer wrong"})[0] == 401
        status, body = _get(f"{base}/api/studies", context=context,
                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"watched" in body
        if _missing() is None or os.environ.get("CI"):
            _login_in_chromium(tmp_path, base)
    finally:
        out = stopped(dashboard, tmp_path)
    assert f"at {base}/" in out and TOKEN not in out


def _login_in_chromium(tmp_path: Path, base: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from tests.search_tests.test_browser import CHROMEDRIVER, CHROMIUM, FLAGS, wait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The test's own CA is not in Chromium's store: its certificate errors are let through
    # here (the certificate itself is checked by the urllib calls above).
    for flag in (*FLAGS, "--ignore-certificate-errors",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{base}/dashboard")
        wait(driver, lambda d: d.find_elements(By.ID, "token"), "the login page")
        assert driver.current_url.endswith("/hpsearch-login")
        driver.find_element(By.ID, "token").send_keys("wrong")
        driver.find_element(By.ID, "login").click()
        wait(driver, lambda d: "That is not the token" in d.page_source, "the refusal")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()
        # The cookie is set by the answer to the form: wait for it before the next page.
        wait(driver, lambda d: d.get_cookie("hpsearch_dashboard"), "the login's cookie")
        driver.get(f"{base}/dashboard")
        wait(driver, lambda d: any("watched" in a.text
                                   for a in d.find_elements(By.TAG_NAME, "a")), "the study")
        cookie = driver.get_cookie("hpsearch_dashboard")
        assert cookie["httpOnly"] and cookie["secure"] and TOKEN not in cookie["value"]
    finally:
        driver.quit()
