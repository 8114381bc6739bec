"""benchmarks/scale.py end to end at its smallest: 10 simulated workers on PostgreSQL directly,
one of them SIGKILLed inside a trial. Its line has the documented fields, the budget is met
exactly, no budget lock is left held, no worker ended on an error, and the killed worker's
trial was retried."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.search_tests.conftest import POSTGRES_URL, server_url

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^scale path=direct workers=10 trials_per_s=(?P<rate>[\d.]+) p99_start_ms=[\d.]+ "
    r"over_budget=(?P<over>\d+) under_budget=(?P<under>\d+) locks_left=(?P<locks>\d+) "
    r"errors=(?P<errors>\d+) p50_start_ms=[\d.]+ p50_finish_ms=[\d.]+ p99_finish_ms=[\d.]+ "
    r"server_conns=(?P<conns>\d+) budget=30 killed=(?P<killed>\d+) retried=(?P<retried>\d+) "
    r"failed=(?P<failed>\d+) fails=(?P<fails>\d+) rss_mb_max=\d+ cores_workers=[\d.]+ "
    r"cores_postgres=[\d.]+ cores_path=[\d.]+ cut=(?P<cut>\d+) load1=[\d.]+ "
    r"rollbacks=\d+$", re.MULTILINE)


@pytest.mark.serial  # a dozen processes and a kill timed to a trial: alone, not beside others
def test_scale_benchmark_ten_workers_direct():
    server_url(POSTGRES_URL, "PostgreSQL")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--workers", "10", "--paths",
         "direct", "--min-trials", "30", "--heartbeat-s", "1", "--grace-s", "2",
         "--run-s", "60"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    found = LINE.search(done.stdout)
    assert found, done.stdout + done.stderr[-3000:]
    got = {key: float(value) for key, value in found.groupdict().items()}
    said = found[0] + "\n" + done.stderr[-2000:]
    assert got["rate"] > 0
    assert (got["over"], got["under"], got["locks"], got["errors"], got["cut"]) == (
        0, 0, 0, 0, 0), said
    assert (got["killed"], got["retried"], got["failed"]) == (1, 1, 0), said
    assert got["fails"] >= 1, said  # the killed worker's trial, failed as stale
    assert got["conns"] > 0, said  # sampled while the workers ran
