#!/usr/bin/env bash
# The checks that need a GPU, in one call on a lent device machine: tests/test_gpu.py, the CUDA
# test of trainers' data path, and the GPU rows of the benchmarks (trainer_speed: the CUDA step
# against a bare loop; gpu_fill: the quick start's 40 trials packed against 4 workers per GPU;
# streaming_epoch). Logs and figures go to $OUT. About 6 minutes on an H200.
#
# The device machine has CUDA PyTorch but no registry: prepare wheels and data here first,
#   bash scripts/gpu_checks.sh --prepare     # .gpu-wheels/ (cp312) and .gpu-data/ (FashionMNIST)
# then run it there with both carried (the device tool's carry: [".gpu-wheels", ".gpu-data"]):
#   bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# Everything hpsearch needs that the device image lacks (torch, numpy, scipy… are there).
WHEELS="optuna sqlalchemy alembic Mako colorlog pydantic pydantic-core annotated-types
        typing-inspection plotly narwhals cmaes pyyaml"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  # The versions this checkout's .venv is tested with.
  pinned=$(.venv/bin/python -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $WHEELS)
  rm -rf .gpu-wheels
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .gpu-wheels $pinned 2> >(grep -v "^WARNING: Location" >&2)
  mkdir -p .gpu-data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu-data/fashion-mnist/
  echo "prepared: .gpu-wheels ($(ls .gpu-wheels | wc -l) wheels), .gpu-data"
  exit 0
fi

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -m pip install -q --no-index --find-links .gpu-wheels $WHEELS > "$OUT/pip.txt" 2>&1
$PY -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/pip.txt" 2>&1
export HPSEARCH_DATA=$PWD/.gpu-data/fashion-mnist
status=0
run() {  # name, command…: its output to $OUT/name.txt, a one-line verdict here
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  echo "$name: rc=$rc in $((SECONDS - start)) s; $(tail -n 1 "$OUT/$name.txt")"
}
run torch $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
run test_gpu $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  tests/trainers_tests/test_data.py -k "cuda or gpu"
run trainer_speed $PY benchmarks/trainer_speed.py --batch-sizes 256,32 \
  --conv-subset cnn=16384,resnet18=8192
run gpu_fill $PY benchmarks/gpu_fill.py --arms pack,tpg4,auto --out /tmp/gpu_fill
run streaming_epoch $PY benchmarks/streaming_epoch.py --device cuda --workers 8 --rounds 1
grep -E "^[a-z_0-9]+: " "$OUT/trainer_speed.txt" "$OUT/gpu_fill.txt" \
  "$OUT/streaming_epoch.txt" | tail -n 40
exit $status
