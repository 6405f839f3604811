#!/usr/bin/env bash
# The README's main job on the embedded default: data stats, then SFT of a tiny Megatron GPT on the
# bundled demo trajectories (CPU, a few minutes; checkpoints under outputs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/klong-data stats
.venv/bin/klong-sft experiment=demo "$@"
