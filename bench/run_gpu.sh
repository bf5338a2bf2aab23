#!/usr/bin/env bash
# The GPU acceptance run: every GPU path of the suite through its own command lines (launch.py benchmark modes,
# main.py with AMP/NHWC/EMA/resume, classify.py, model2onnx.py, the bench scripts against timm, multiproc.py on
# gloo and NCCL, --jit compile, DALI, QAT), with the numbers, in at most 8 minutes on one H200:
#
#   bash bench/run_gpu.sh OUT_DIR                  # one GPU
#   bash bench/run_gpu.sh --quick OUT_DIR          # the same steps on the CPU at toy sizes (or QUICK=1)
#   bash bench/run_gpu.sh -h                       # --steps, --step-timeout, --budget
#
# Writes OUT_DIR/summary.md, summary.json (PASS/FAIL/SKIP per step, the reason, the numbers) and
# logs/<NN>-<step>.log; exits 1 when a step failed. Installs nothing: DALI and Model Optimizer steps are
# SKIP when they do not import. Python: $PYTHON, else .venv/bin/python when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
command -v "$py" >/dev/null || { echo "run_gpu.sh: no Python at '$py' (set PYTHON)" >&2; exit 2; }
exec "$py" bench/gpu_acceptance.py "$@"
