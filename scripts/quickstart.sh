#!/usr/bin/env bash
# Sets everything up, then runs the FashionMNIST MLP study with the default SQLite storage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hpsearch run studies/fashion_mlp.yaml "$@"
