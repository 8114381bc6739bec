"""Shared test settings.

One thread per test process keeps the 2-core machine responsive, and artifacts of studies
whose storage is not a SQLite file (PostgreSQL, MySQL) go to a temporary directory instead of
./hpsearch-artifacts in the checkout.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HPSEARCH_ARTIFACTS", tempfile.mkdtemp(prefix="hpsearch-test-artifacts-"))
