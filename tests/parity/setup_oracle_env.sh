#!/usr/bin/env bash
# Build the parity-oracle environment: the REAL finetuning-scheduler 2.14.1 on
# Lightning 2.6.6 + CPU torch 2.13.0. Not part of the product; only used by
# tests/parity/gen_golden.py to (re)generate the golden LR trajectories.
#
# Idempotent: re-running it reuses the existing venv and is a no-op when the
# pinned versions are already installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${ORACLE_VENV:-$ROOT/.venv-oracle}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi

# The constraints file pins torch to the CPU wheel in pip's find-links so no
# CUDA build is ever pulled.
"$VENV/bin/python" -m pip install --quiet \
    -c "$ROOT/constraints.txt" \
    "torch==2.13.0" \
    "lightning==2.6.6" \
    "finetuning-scheduler==2.14.1" \
    pyyaml \
    tensorboard

"$VENV/bin/python" - <<'PY'
import torch, lightning, finetuning_scheduler
print("oracle env ready: torch", torch.__version__, "| lightning", lightning.__version__,
      "| finetuning_scheduler", finetuning_scheduler.__version__)
PY
