"""Shared test settings: one thread per test process keeps the 2-core machine responsive."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
