#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Chromium for the browser tests (tests/search_tests/test_browser.py): Debian's packages, driven
# by selenium through /usr/bin/chromedriver; no browser is ever downloaded.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium and chromium-driver (browser tests)"
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium not found; the browser tests skip (CI fails them): apt install chromium chromium-driver" >&2
  fi
fi

# PgBouncer for the pooled-connection tests (tests/search_tests/test_pgbouncer.py): Debian's,
# started by the tests themselves as the postgres user (tests/servers.py).
if [ ! -x /usr/sbin/pgbouncer ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's pgbouncer (PgBouncer tests)"
    apt-get update -qq >/dev/null && apt-get install -y -qq pgbouncer >/dev/null
  else
    echo "setup: pgbouncer not found; the PgBouncer tests skip (CI fails them): apt install pgbouncer" >&2
  fi
fi

if [ $# -gt 0 ]; then  # a chosen file or test: as asked
  exec .venv/bin/python -m pytest -q "$@"
fi
# The whole suite: most tests wait on worker processes and the database, so four files run at
# once (a file's tests stay together, in order: some share a module fixture); the `serial`
# ones, which restart the database or wait on a study's progress to the second, then run alone.
.venv/bin/python -m pytest -q -n 4 --dist loadfile -m "not serial" --durations=15
exec .venv/bin/python -m pytest -q -m serial --durations=15
