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
# they restart the database server, or wait on a study's progress to the second.
SERIAL_FILES = {"test_drills.py", "test_stop_and_delete.py"}


# Files whose tests share a module-scoped fixture (a Ray cluster, a finished study): the
# parallel part keeps each on one worker, where the others' tests spread one by one.
GROUPED_FILES = {"test_ray.py", "test_artifacts.py", "test_example_own_model.py",
                 "test_report.py", "test_plugins.py", "test_streaming.py", "test_space.py",
                 "test_lr_find.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
        if item.path.name in GROUPED_FILES:
            group = f"{item.path.parent.name}/{item.path.name}"
            item.add_marker(pytest.mark.xdist_group(name=group))
