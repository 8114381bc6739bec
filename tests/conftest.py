"""Shared test settings.

One thread per test process keeps the 2-core machine responsive, and artifacts of studies
whose storage is not a SQLite file (PostgreSQL, MySQL) go to a temporary directory instead of
./hpsearch-artifacts in the checkout. Tests marked `serial` run after the others, alone.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HPSEARCH_ARTIFACTS", tempfile.mkdtemp(prefix="hpsearch-test-artifacts-"))


# Files whose tests run alone, after the rest (scripts/test.sh runs the others in parallel):
# they restart the database server, wait on a study's progress to the second, or start a
# multi-node Ray cluster (on 2 cores beside three other test files, its runs timed out).
SERIAL_FILES = {"test_drills.py", "test_stop_and_delete.py", "test_ray.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
