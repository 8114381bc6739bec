"""The dashboard and the report in a real browser: Debian's chromium, headless, via selenium.

No browser is downloaded: selenium drives /usr/bin/chromium through /usr/bin/chromedriver
(`scripts/setup.sh` installs both as root). Without them the tests skip with the reason; in CI
(`CI` set) they fail instead. Screenshots land in test-output/ for a person to look at.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from search.run import create_or_load
from search.spec import parse_spec
from search.storage import open_storage, quiet_optuna_warnings
from search.storage._artifact_store import ENV_VAR
from search.workers import run_worker
from tests.search_tests.studies import OPTIMIZER_LR_BATCH, WEIGHT_DECAY_GRID, searched

quiet_optuna_warnings()
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
CHROMIUM = os.environ.get("HPSEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HPSEARCH_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")
WAIT_S = 30

def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None

@pytest.fixture
def browser(tmp_path):
    why = _missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the browser tests")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    OUTPUT.mkdir(exist_ok=True)
    yield driver
    driver.quit()

def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition)
    except Exception:
        shot = OUTPUT / f"failed-{what.replace(' ', '-')}.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"timed out waiting for {what} (screenshot: {shot})") from None

def small_study(tmp: Path, monkeypatch) -> tuple[str, Any, Any]:
    """A finished study with complete and pruned trials, run by the real worker."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    url = f"sqlite:///{tmp / 'hp.db'}"
    spec = parse_spec(searched("browsed", tmp, space={**OPTIMIZER_LR_BATCH, **WEIGHT_DECAY_GRID}))
    study = create_or_load(spec, open_storage(url))
    run_worker(study, spec, device="cpu")
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    return url, study, spec

def test_dashboard_shows_the_study_and_a_trials_curve_artifact(browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    from tests.search_tests.test_dashboard import start_dashboard, stop

    url, _, _ = small_study(tmp_path, monkeypatch)
    proc, port = start_dashboard(url, tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{port}/dashboard")
        link = wait(browser, lambda d: next((a for a in d.find_elements(By.TAG_NAME, "a")
                                             if "browsed" in a.text), None), "the study link")
        browser.save_screenshot(str(OUTPUT / "dashboard-studies.png"))
        study_url = link.get_attribute("href")
        link.click()
        wait(browser, lambda d: d.current_url.rstrip("/") == study_url.rstrip("/"),
             "the study page")
        browser.get(f"{study_url.rstrip('/')}/trials")
        # Open a pruned trial from the trial list.
        item = wait(browser, lambda d: next(
            (e for e in d.find_elements(By.XPATH, "//*[starts-with(normalize-space(.), "
                                                  "'Trial ') and contains(., 'Pruned')]")
             if e.text.split("\n")[0].startswith("Trial ") and len(e.text) < 40), None),
            "a pruned trial in the list")
        number = item.text.split("\n")[0].split()[1]
        item.click()
        heading = wait(browser, lambda d: next(
            (h for h in d.find_elements(By.XPATH, "//h1|//h2|//h3|//h4")
             if h.text.startswith(f"Trial {number} (trial_id=")), None), "the trial's page")
        trial_id = heading.text.split("trial_id=")[1].rstrip(")")
        # Its artifacts: the curve images, served by the dashboard and decoded by the browser.
        images = wait(browser, lambda d: [
            i for i in d.find_elements(By.TAG_NAME, "img")
            if f"/artifacts/1/{trial_id}/" in (i.get_attribute("src") or "")
            and int(i.get_attribute("naturalWidth") or 0) > 0], "the trial's artifact images")
        assert len(images) == 3  # curves, lr, gradient norms
        section = browser.find_element(By.XPATH, "//*[normalize-space(.)='Artifacts']")
        # Down to the artifacts, and back to the left edge (a wide attribute scrolls the page).
        browser.execute_script(
            "arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -80);"
            "document.querySelectorAll('*').forEach(e => { if (e.scrollLeft) e.scrollLeft = 0; });"
            "window.scrollTo(0, window.scrollY);", section)
        time.sleep(0.3)
        browser.save_screenshot(str(OUTPUT / "dashboard-trial-artifacts.png"))
        names = browser.find_element(By.TAG_NAME, "body").text
        assert "curves.svg" in names and "metrics.json" in names
        src = next(i.get_attribute("src") for i in images)
        with urllib.request.urlopen(src, timeout=10) as r:
            svg = r.read().decode()
        assert "<svg" in svg and f"trial #{number}" in svg
    finally:
        stop(proc, tmp_path)

def test_report_opens_offline_with_its_plots_rendered(browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    from search.views import build_report

    url, study, spec = small_study(tmp_path, monkeypatch)
    out = OUTPUT / "report.html"  # kept: the page the screenshots show
    out.write_text(build_report(study, spec, storage=url), encoding="utf-8")
    browser.get(out.as_uri())
    divs = wait(browser, lambda d: (lambda found: found if len(found) >= 8 and all(
        div.find_elements(By.CSS_SELECTOR, "svg.main-svg") for div in found) else None)(
        d.find_elements(By.CLASS_NAME, "plotly-graph-div")), "every plot drawn")
    browser.save_screenshot(str(OUTPUT / "report-top.png"))
    curves = browser.find_element(By.XPATH, "//h2[contains(., 'Validation loss')]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start', inline: 'nearest'});",
                           curves)
    time.sleep(0.3)
    browser.save_screenshot(str(OUTPUT / "report-curves.png"))
    # Real marks, not empty axes: lines of the curves and bars of the importances.
    traces = browser.find_elements(By.CSS_SELECTOR, ".plotly-graph-div g.trace")
    assert len(traces) >= 10
    assert browser.execute_script("return typeof Plotly") == "object"  # inlined, not fetched
    assert len(divs) >= 8
