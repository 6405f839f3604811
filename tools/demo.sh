#!/usr/bin/env bash
# The README's main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/klong-data stats
