#!/usr/bin/env bash
# flowscore's two entry points for a newcomer:
#   ./run.sh demo   train on a 2D toy, sample with an ODE and an SDE, write plots, print W2 vs its floor
#   ./run.sh test   run the test suite
# Each sets itself up on first use: a virtual environment in .venv, torch (FLOWSCORE_TORCH, default
# torch==2.13.0, skipped when a torch is already importable there), then flowscore with its dev extra.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        echo "[setup] creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[setup] installing ${FLOWSCORE_TORCH:-torch==2.13.0}" >&2
        "$PY" -m pip install -q --disable-pip-version-check "${FLOWSCORE_TORCH:-torch==2.13.0}"
    fi
    local stamp="$VENV/.flowscore-installed"
    local want
    want=$(cat pyproject.toml | cksum)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "[setup] installing flowscore[dev]" >&2
        "$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
        echo "$want" > "$stamp"
    fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
    demo)
        setup
        exec "$PY" -m flowscore demo "$@"
        ;;
    test)
        setup
        exec "$PY" -m pytest -n 2 -q "$@"
        ;;
    *)
        echo "usage: ./run.sh demo | ./run.sh test [pytest args]" >&2
        exit 2
        ;;
esac
