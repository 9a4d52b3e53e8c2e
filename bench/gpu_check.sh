#!/usr/bin/env bash
# One device check, one table (bench/gpu_check.py): bf16 vs fp32, xformers vs SDPA, sync-free warm steps,
# CUDA graphs on == off, 14B-64x latency and throughput against their floors, peak memory against the plan.
#
#   bash bench/gpu_check.sh            # on one GPU, under 8 minutes (hard limit: 480 s)
#   bash bench/gpu_check.sh --smoke    # CPU, tiny shapes: the same code paths, as CI runs it
#
# PYTHON overrides the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" bench/gpu_check.py "$@"
