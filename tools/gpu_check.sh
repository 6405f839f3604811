#!/usr/bin/env bash
# Validate the GPU path on one H100/H200 in ~8 minutes; writes a JSON report (default gpu_check.json) and
# exits non-zero when a check fails. Checks whose requirements are missing are skipped with the reason.
#   tools/gpu_check.sh [--out gpu_check.json] [--only te_thd_vs_mask sft_te_bf16 ...]
#   srun --gpus=1 apptainer exec --nv klong-train.sif tools/gpu_check.sh      # in the training image
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PYTHON" tools/gpu_check.py "$@"
