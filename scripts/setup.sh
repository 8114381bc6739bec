#!/usr/bin/env bash
# Sets up everything hpsearch needs, idempotently: FashionMNIST, a virtualenv in .venv with
# torch from this machine's disk (where pip finds it there) and hpsearch with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# FashionMNIST: Debian's dataset-fashion-mnist puts the four idx .gz files here.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${HPSEARCH_DATA:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: FashionMNIST not found; install Debian's dataset-fashion-mnist or set HPSEARCH_DATA" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.hpsearch-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing hpsearch and its dependencies into .venv (first time: about a minute)"
  # pip's notes about this machine's local package folders are noise here: drop just those.
  pipi() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" \
             2> >(grep -v "^WARNING: Location" >&2); }
  # torch first, pinned to the release this machine holds on disk (no multi-GB download here).
  pipi "torch==2.14.1" "torchvision==0.29.1"
  pipi -e ".[dev,postgres,mysql,dashboard]"
  .venv/bin/python -c "import torch, optuna, search, trainers" # fail here, not in the first test
  touch "$stamp"
fi
